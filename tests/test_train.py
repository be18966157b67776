"""fastmlp.fit, the loop: same weights as the stock loop, learns, no per-step syncs, callbacks,
checkpoints, and which step strategy each epoch gets (the strategies themselves:
test_cpu_step.py, test_graph_step.py)."""

import copy
import io
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastmlp
from train_helpers import max_rel_err as _max_rel_err
from train_helpers import regression_data as _regression_data
from train_helpers import seed_like as _seed_like
from train_helpers import stock_loop as _stock_loop


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fit_matches_stock_loop(fused, reduction, momentum):
    x, y = _regression_data()
    stock = _seed_like()
    ours = copy.deepcopy(stock)
    if fused:
        fastmlp.fuse(ours)
    lr = 1e-3 if reduction == "sum" else 0.05
    stock_losses = _stock_loop(stock, x, y, nn.MSELoss(reduction=reduction),
                               torch.optim.SGD(stock.parameters(), lr=lr, momentum=momentum), 3, 16)
    history = fastmlp.fit(ours, fastmlp.TensorLoader(x, y, batch_size=16),  # 200 = 12*16 + 8
                          nn.MSELoss(reduction=reduction),
                          fastmlp.SGD(ours.parameters(), lr=lr, momentum=momentum),
                          epochs=3, progress=False)
    assert _max_rel_err(ours, stock) < 1e-5
    assert len(history["loss"]) == 3 and len(history["samples_per_s"]) == 3
    for got, want in zip(history["loss"], stock_losses):
        assert got == pytest.approx(want, rel=1e-5)
    assert all(r > 0 for r in history["samples_per_s"])
    assert stock_losses[-1] < stock_losses[0]


def test_fit_with_dataloader_and_torch_sgd():
    x, y = _regression_data()
    stock = _seed_like()
    ours = copy.deepcopy(stock)
    _stock_loop(stock, x, y, nn.MSELoss(), torch.optim.SGD(stock.parameters(), lr=0.05), 2, 32)
    fastmlp.fit(ours, DataLoader(TensorDataset(x, y), batch_size=32), nn.MSELoss(),
                torch.optim.SGD(ours.parameters(), lr=0.05), epochs=2, progress=False)
    assert _max_rel_err(ours, stock) < 1e-5


def _blobs(n=600, d=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    return centers[labels] + torch.randn(n, d, generator=g), labels


@pytest.mark.parametrize("fused", [False, True])
def test_cross_entropy_classification_learns(fused):
    x, labels = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    if fused:
        fastmlp.fuse(model)
    loader = fastmlp.TensorLoader(x[:500], labels[:500], batch_size=32, shuffle=True)
    history = fastmlp.fit(model, loader, nn.CrossEntropyLoss(),
                          fastmlp.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=8,
                          progress=False)
    with torch.no_grad():
        acc = (model(x[500:]).argmax(1) == labels[500:]).float().mean().item()
    assert acc > 0.95, f"held-out accuracy {acc:.3f}"
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def test_no_host_sync_per_step(monkeypatch):
    """Reading a value back (item/tolist/float) happens per epoch, never per step."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    x, y = _regression_data(n=320)
    model = fastmlp.fuse(_seed_like())
    epochs, steps_per_epoch = 3, 20
    loader = fastmlp.TensorLoader(x, y, batch_size=16, shuffle=True)
    assert len(loader) == steps_per_epoch
    fastmlp.fit(model, loader, nn.MSELoss(), fastmlp.SGD(model.parameters(), lr=0.01),
                epochs=epochs, progress=False)
    # per epoch: the loader's two seed draws (DataLoader parity, CPU) and the one stats read
    assert calls["n"] <= 3 * epochs, f"{calls['n']} read-backs for {epochs * steps_per_epoch} steps"


def test_callbacks_stop_early_and_see_logs():
    x, y = _regression_data()
    model = _seed_like()
    seen = []

    class Recorder:
        def on_epoch_end(self, epoch, logs):
            seen.append(dict(logs))

    history = fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=50), nn.MSELoss(),
                          fastmlp.SGD(model.parameters(), lr=0.01), epochs=10, progress=False,
                          callbacks=[Recorder(), lambda epoch, logs: epoch == 2])
    assert len(history["loss"]) == 3
    assert [s["epoch"] for s in seen] == [0, 1, 2]
    assert seen[-1]["loss"] == history["loss"][-1]
    assert set(seen[0]) >= {"epoch", "loss", "samples_per_s", "time_s"}


def test_set_epoch_is_called():
    x, y = _regression_data(n=64)
    loader = fastmlp.TensorLoader(x, y, batch_size=8, shuffle=True, rank=0, world_size=2)
    model = _seed_like()
    fastmlp.fit(model, loader, nn.MSELoss(), fastmlp.SGD(model.parameters(), lr=0.01), epochs=3,
                start_epoch=4, progress=False)
    assert loader.epoch == 6


def test_progress_bar_only_on_a_terminal(monkeypatch):
    x, y = _regression_data(n=64)
    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty, progress in ((False, True), (True, False), (True, True)):
        stream = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=8), nn.MSELoss(), opt,
                    epochs=2, progress=progress)
        out = stream.getvalue()
        if tty and progress:
            assert "epoch 2/2" in out and "loss=" in out and "samples_per_s=" in out
        else:
            assert out == ""


def test_checkpoint_round_trip(tmp_path):
    x, y = _regression_data()
    loss_fn = nn.MSELoss()

    def make():
        model = fastmlp.fuse(_seed_like())
        return model, fastmlp.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-3)

    loader = fastmlp.TensorLoader(x, y, batch_size=32)
    model_a, opt_a = make()
    fastmlp.fit(model_a, loader, loss_fn, opt_a, epochs=2, progress=False)
    fastmlp.save_checkpoint(tmp_path / "ckpt.pt", model_a, opt_a, epoch=2)
    fastmlp.fit(model_a, loader, loss_fn, opt_a, epochs=2, start_epoch=2, progress=False)

    model_b, opt_b = make()
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    for p in model_b.parameters():
        p.data.normal_()
    state = fastmlp.load_checkpoint(tmp_path / "ckpt.pt", model_b, opt_b)
    assert state["epoch"] == 2
    assert opt_b.state_dict()["state"].keys() == opt_a.state_dict()["state"].keys()
    fastmlp.fit(model_b, loader, loss_fn, opt_b, epochs=2, start_epoch=2, progress=False)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    # the checkpoint also loads into plain nn.Linear models and torch.optim.SGD
    plain = _seed_like()
    torch_opt = torch.optim.SGD(plain.parameters(), lr=1.0)
    fastmlp.load_checkpoint(tmp_path / "ckpt.pt", plain, torch_opt)
    assert torch_opt.param_groups[0]["momentum"] == 0.9


def test_argument_errors():
    x, y = _regression_data(n=16)
    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    loader = fastmlp.TensorLoader(x, y, batch_size=8)
    with pytest.raises(ValueError, match="cuda_graph"):
        fastmlp.fit(model, loader, nn.MSELoss(), opt, cuda_graph="yes", progress=False)
    with pytest.raises(ValueError, match="CUDA"):
        fastmlp.fit(model, loader, nn.MSELoss(), opt, cuda_graph=True, progress=False)
    with pytest.raises(TypeError, match="list or tuple"):
        fastmlp.fit(model, [x[:8]], nn.MSELoss(), opt, progress=False)


@pytest.mark.parametrize("make,what", [
    (lambda x, y: (x.numpy(), y.numpy()), r"input 0 \(element 0 of the batch\) is a numpy.ndarray"),
    (lambda x, y: (x, y.numpy()), r"the target \(element 1 of the batch\) is a numpy.ndarray"),
    (lambda x, y: (x.tolist(), y.tolist()), r"input 0 \(element 0 of the batch\) is a list"),
    (lambda x, y: [x, 3.0], r"the target \(element 1 of the batch\) is a float"),
])
def test_batches_that_are_not_tensors_are_named(make, what):
    """A loader yielding numpy arrays or lists (no default collate) is a TypeError that says what
    came and what fit needs, before any step (not an AttributeError from inside the loop)."""
    x, y = _regression_data(n=16)
    model = _seed_like()
    before = copy.deepcopy(model.state_dict())
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    loader = [make(x[i:i + 8], y[i:i + 8]) for i in (0, 8)]
    with pytest.raises(TypeError, match=what) as info:
        fastmlp.fit(model, loader, nn.MSELoss(), opt, progress=False)
    assert "(inputs..., target) torch tensors" in str(info.value)
    assert "torch.from_numpy" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))


# ---------------------------------------------------------------------------------------------
# Which step strategy an epoch gets
# ---------------------------------------------------------------------------------------------
def _chooser(model, optimizer, device="cpu", cuda_graph="auto", cpu_fast_path=True):
    from fastmlp.train import _StepChooser

    return _StepChooser(model, nn.MSELoss(), optimizer, torch.device(device), cuda_graph,
                        cpu_fast_path)


def test_cpu_epochs_get_the_cpu_step_or_autograd():
    from fastmlp.cpu_step import CPUStep
    from fastmlp.train import AutogradStep

    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    assert isinstance(_chooser(model, opt).for_epoch(), CPUStep)
    assert isinstance(_chooser(model, opt, cpu_fast_path=False).for_epoch(), AutogradStep)
    assert isinstance(_chooser(nn.Sequential(nn.Linear(3, 3), nn.Softplus()), opt).for_epoch(),
                      AutogradStep)
    with pytest.raises(ValueError, match="CUDA"):
        _chooser(model, opt, cuda_graph=True).for_epoch()


def test_the_step_is_chosen_again_each_epoch():
    """A forward hook a callback registers after epoch 0 runs in epoch 1: the CPU step, which
    would skip it, is not reused."""
    x, y = _regression_data(n=64)
    model = _seed_like()
    calls = []

    def add_hook(epoch, logs):
        if epoch == 0:
            model[0].register_forward_hook(lambda m, i, o: calls.append(epoch))

    fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=16), nn.MSELoss(),
                fastmlp.SGD(model.parameters(), lr=0.01), epochs=2, progress=False,
                callbacks=[add_hook])
    assert len(calls) == 4


def test_cuda_epochs_capture_unless_the_step_cannot_be():
    """On CUDA (the decision only: nothing runs), auto captures a capturable SGD step; one whose
    update would read a GPU tensor hyperparameter back as a number (here an lr on a non-CPU
    device, as torch.optim.SGD's foreach step does with .item()) trains eagerly, said once
    with a warning; cuda_graph=True refuses it with a ValueError."""
    import warnings

    from fastmlp.graph_step import GraphStep
    from fastmlp.train import AutogradStep

    model = _seed_like()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for cuda_graph in ("auto", True):
        assert isinstance(_chooser(model, opt, "cuda", cuda_graph).for_epoch(), GraphStep)
    assert isinstance(_chooser(model, opt, "cuda", False, cpu_fast_path=False).for_epoch(),
                      AutogradStep)
    opt.param_groups[0]["lr"] = torch.tensor(0.01, device="meta")   # stands for a GPU tensor
    chooser = _chooser(model, opt, "cuda", cpu_fast_path=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [chooser.for_epoch() for _ in range(3)]
    assert all(isinstance(s, AutogradStep) for s in steps)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "lr is a tensor on meta" in str(caught[0].message)
    with pytest.raises(ValueError, match="cannot be captured.*lr is a tensor on meta"):
        _chooser(model, opt, "cuda", True).for_epoch()


def test_cuda_epochs_with_a_python_hook_train_eagerly_and_say_why():
    """A hook runs Python a graph replay would skip (an EMA in an optimizer step post-hook
    here): auto trains those epochs eagerly, with one warning naming the hook; once removed,
    the next epoch captures; True refuses with a ValueError naming it."""
    import warnings

    from fastmlp.graph_step import GraphStep
    from fastmlp.train import AutogradStep

    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)

    def ema_after_step(optimizer, args, kwargs):
        return None

    handle = opt.register_step_post_hook(ema_after_step)
    chooser = _chooser(model, opt, "cuda", cpu_fast_path=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = [chooser.for_epoch() for _ in range(2)]
    assert all(isinstance(s, AutogradStep) for s in steps)
    assert len(caught) == 1 and "optimizer step post-hook on SGD: " in str(caught[0].message)
    assert "ema_after_step" in str(caught[0].message)
    with pytest.raises(ValueError, match="cannot be captured.*ema_after_step"):
        _chooser(model, opt, "cuda", True).for_epoch()
    handle.remove()
    assert isinstance(chooser.for_epoch(), GraphStep)


def test_fit_through_triton_kernels_matches_torch(triton_backend):
    """The whole fastmlp stack through its Triton kernels (interpreter on CPU, native on CUDA):
    fused layers forward/backward and the multi-tensor SGD, against the same fit on torch ops."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(24, 8, generator=g), torch.randn(24, 3, generator=g)
    ref = _seed_like(8, 16, 3, device=device)
    ours = fastmlp.fuse(copy.deepcopy(ref))
    with fastmlp.use_backend("torch"):
        fastmlp.fit(ref, fastmlp.TensorLoader(x, y, batch_size=8, device=device), nn.MSELoss(),
                    torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), epochs=2,
                    progress=False, cuda_graph=False)
    opt = fastmlp.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    fastmlp.fit(ours, fastmlp.TensorLoader(x, y, batch_size=8, device=device), nn.MSELoss(), opt,
                epochs=2, progress=False, cuda_graph=False)
    assert opt._launcher is not None, "the Triton SGD kernel did not run"
    assert _max_rel_err(ours, ref) < 1e-5
