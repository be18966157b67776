"""The kernel launchers themselves: row split of dW, determinism, fp32 precision, poisoning, offsets."""

import pytest
import torch
import triton.language as tl

from fastmlp import functional as F
from fastmlp.kernels import debug, linear_act as kernels
from reference import assert_close, reference

pytestmark = pytest.mark.usefixtures("triton_backend")


def _problem(M, K, N, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device, dtype)
    b = torch.randn(N, generator=gen).to(device, dtype)
    g = torch.randn(M, N, generator=gen).to(device, dtype)
    return x, w, b, g


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_grad_weight_row_split(device, split):
    x, w, b, g = _problem(150, 40, 36, device)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    dw, db = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=split)
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert_close(dw, rdw, torch.float32, f"dW split={split}")
    assert_close(db, rdb, torch.float32, f"db split={split}")


@pytest.mark.parametrize("compute_weight,compute_bias", [(True, False), (False, True)])
def test_grad_weight_only_what_is_asked(device, compute_weight, compute_bias):
    x, w, b, g = _problem(45, 19, 27, device)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    dw, db = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, compute_weight, compute_bias, False, split=2)
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert (dw is None) != compute_weight and (db is None) != compute_bias
    if compute_weight:
        assert_close(dw, rdw, torch.float32, "dW")
    if compute_bias:
        assert_close(db, rdb, torch.float32, "db")


@pytest.mark.parametrize("split", [None, 3])
def test_grad_weight_is_deterministic(device, split):
    x, w, b, g = _problem(300, 48, 40, device, dtype=torch.float16)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    first = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=split)
    for _ in range(2):
        again = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=split)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_split_choice_fills_the_gpu_and_keeps_chunks_long():
    cpu = torch.device("cpu")
    assert kernels.choose_split(64, 4, 32, cpu) == 1  # few rows: no split
    assert kernels.choose_split(65536, 1, 32, cpu) == 8  # 2 x 4 "multiprocessors" on CPU
    assert kernels.choose_split(65536, 100, 32, cpu) == 1  # enough tiles already


class _KernelSpy:
    """Stands in for a jit kernel: records launch arguments, optionally drops the last program."""

    def __init__(self, kernel, drop_last_program=False):
        self.kernel, self.drop, self.launches = kernel, drop_last_program, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            g = tuple(grid)
            if self.drop:
                g = (g[0] - 1,) + g[1:]
            return self.kernel[g](*args, **kwargs)
        return launch


@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_follows_torch_matmul_precision(device, monkeypatch, precision, expected):
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        F.linear_relu(*_problem(8, 8, 8, device)[:3])
    finally:
        torch.set_float32_matmul_precision(previous)
    assert spy.launches[-1]["DOT_PRECISION"] == expected


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this torch has no fp32_precision API")
@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_fp32_follows_the_newer_precision_api(device, monkeypatch, setting, expected):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" makes get_float32_matmul_precision()
    raise; fastmlp reads the setting in a way that works with either API."""
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = setting
    try:
        F.linear_relu(*_problem(8, 8, 8, device)[:3])
    finally:
        matmul.fp32_precision = previous
    assert spy.launches[-1]["DOT_PRECISION"] == expected


def test_poisoned_outputs_catch_an_unwritten_tile(device, monkeypatch):
    """With one program dropped, the NaN poison shows up: the net the other tests rely on works."""
    assert debug.POISON_OUTPUTS
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel",
                        _KernelSpy(kernels.linear_act_fwd_kernel, drop_last_program=True))
    x, w, b, _ = _problem(70, 20, 40, device)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    assert torch.isnan(y).any()


def test_int64_tile_offsets_path(device, monkeypatch):
    """The int64 tile-offset variant (used when a stride is huge) computes the same results."""
    monkeypatch.setattr(kernels, "_offset_dtype", lambda *a, **k: tl.int64)
    x, w, b, g = _problem(37, 29, 33, device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = F.linear_relu(x, w, b)
    y.backward(g)
    ry, rdx, rdw, rdb = reference(x, w, b, "relu", g)
    for got, ref, name in ((y, ry, "y"), (x.grad, rdx, "dX"), (w.grad, rdw, "dW"), (b.grad, rdb, "db")):
        assert_close(got, ref, torch.float32, name)


def test_offset_dtype_switches_for_huge_strides():
    class Fake:
        def __init__(self, *strides):
            self._s = strides

        def stride(self):
            return self._s

    assert kernels._offset_dtype(Fake(1024, 1)) == tl.int32
    assert kernels._offset_dtype(Fake(2**23, 1)) == tl.int64
    assert kernels._offset_dtype(Fake(1, 1), extra_strides=(2**23,)) == tl.int64


def test_huge_bias_stride_takes_int64_offsets(device, monkeypatch):
    """A bias viewed with a stride of 2**23 elements: rn * stride_b passes int32 within a tile,
    so the forward launch takes int64 tile offsets, and reads the right elements."""
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    stride, N = 2**23, 3
    storage = torch.randn((N - 1) * stride + 1, device=device)
    b = storage.as_strided((N,), (stride,))
    x, w, _, _ = _problem(5, 7, N, device)
    y = F.linear_relu(x, w, b)
    assert spy.launches[-1]["OFFSET_DTYPE"] == tl.int64
    want = torch.relu(x.double().cpu() @ w.double().cpu().t() + b.double().cpu())
    assert_close(y, want, torch.float32, "y")


@pytest.mark.gpu
def test_int64_addressing_past_2_pow_31_elements():
    """X with more than 2**31 elements: rows past the int32 range are computed correctly."""
    M, K, N = 2**21 + 3, 1024, 16
    x = torch.empty(M, K, device="cuda", dtype=torch.float16)
    x[:-8].fill_(0.01)
    x[-8:] = torch.randn(8, K, device="cuda", dtype=torch.float16)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16) / 32
    y, _ = kernels.linear_act_forward(x, w, None, "relu", 0.0, False, False)
    ref = torch.relu(x[-8:].double() @ w.double().t())
    assert_close(y[-8:], ref, torch.float16, "last rows")


@pytest.mark.gpu
def test_autotuned_configs_agree(monkeypatch):
    """With autotuning on, whatever config wins gives a correct result (several bucketed shapes)."""
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    for M, K, N in ((64, 1000, 100), (4096, 256, 256), (513, 777, 129)):
        x, w, b, g = _problem(M, K, N, "cuda", dtype=torch.bfloat16)
        x, w, b = (t.requires_grad_() for t in (x, w, b))
        y = F.linear_relu(x, w, b)
        y.backward(g)
        ry, rdx, rdw, rdb = reference(x, w, b, "relu", g)
        for got, ref, name in ((y, ry, "y"), (x.grad, rdx, "dX"), (w.grad, rdw, "dW"), (b.grad, rdb, "db")):
            assert_close(got, ref, torch.bfloat16, f"{M}x{K}->{N} {name}")


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_gemm_candidate_matches(device, monkeypatch, activation, bias):
    """The unfused cuBLAS candidate the GPU autotuner may pick computes the same function."""
    from fastmlp.kernels import tuning

    picked = []
    monkeypatch.setattr(tuning, "pick_config",
                        lambda key, candidates, dev, run: picked.append(key[0]) or tuning.TORCH_GEMM)
    x, w, b, g = _problem(41, 30, 22, device)
    b = b if bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fn = F.linear_relu if activation == "relu" else F.linear
    y = fn(x, w, b)
    y.backward(g)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, g)
    assert sorted(set(picked)) == ["dw", "dx", "fwd"]
    for got, ref, name in ((y, ry, "y"), (x.grad, rdx, "dX"), (w.grad, rdw, "dW")):
        assert_close(got, ref, torch.float32, name)
    if bias:
        assert_close(b.grad, rdb, torch.float32, "db")
    assert len(leaves) == 3 if bias else 2


def test_torch_gemm_candidate_ignores_autocast_in_backward(device, monkeypatch):
    """An fp32 layer whose backward runs inside an autocast region (loss.backward() under
    autocast, which PyTorch discourages but allows) still gets fp32-exact gradients."""
    from fastmlp.kernels import tuning

    monkeypatch.setattr(tuning, "pick_config", lambda key, candidates, dev, run: tuning.TORCH_GEMM)
    x, w, b, g = _problem(41, 30, 22, device)
    w.requires_grad_()
    b.requires_grad_()
    y = F.linear_relu(x, w, b)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=low):
        y.backward(g)
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert w.grad.dtype == b.grad.dtype == torch.float32
    assert_close(w.grad, rdw, torch.float32, "dW")
    assert_close(b.grad, rdb, torch.float32, "db")


def test_gpu_candidates_end_with_the_torch_gemm(monkeypatch):
    from fastmlp.kernels import tuning

    monkeypatch.setattr(tuning, "_INTERPRET", False)  # the lists a compiled (GPU) run gets
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
        for capability in ((8, 0), (9, 0)):
            configs = tuning.candidate_configs(dtype, precision, capability)
            assert configs[-1] is tuning.TORCH_GEMM and configs[0] is not tuning.TORCH_GEMM
            assert all(isinstance(c, tuning.TileConfig) for c in configs[:-1])


class _FakeCuda:
    type = "cuda"


def test_autotuner_times_every_candidate_skips_misfits_and_caches(monkeypatch):
    """pick_config's choice logic (it runs only on GPUs), with timings faked."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    from fastmlp.kernels import tuning

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setattr(tuning, "_best", {})
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg == "too-big":
            raise OutOfResources(300000, 232448, "shared memory")
        return times[cfg]

    candidates = ["a", "too-big", "b", "c"]
    assert tuning.pick_config(("k",), candidates, _FakeCuda(), run) == "b"
    assert calls == candidates
    assert tuning.pick_config(("k",), candidates, _FakeCuda(), run) == "b"  # cached: no timing
    assert len(calls) == 4

    monkeypatch.setattr(tuning, "_capturing", lambda device: True)  # inside CUDA-graph capture
    assert tuning.pick_config(("k2",), candidates, _FakeCuda(), run) == "a" and ("k2",) not in tuning._best
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "0")
    assert tuning.pick_config(("k3",), candidates, _FakeCuda(), run) == "a" and len(calls) == 4

    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    with pytest.raises(RuntimeError, match="no kernel config fits"):
        tuning.pick_config(("k4",), ["too-big", "too-big"], _FakeCuda(), run)
    with pytest.raises(ZeroDivisionError):  # any other failure is a bug: it propagates
        tuning.pick_config(("k5",), ["a", "b"], _FakeCuda(), lambda cfg: 1 / 0)


def test_shape_buckets():
    from fastmlp.kernels import tuning

    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 64, 65, 1000, 1024)] == [0, 1, 2, 4, 64, 128, 1024, 1024]


def test_launchers_run_under_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: a launcher given cuda:1 tensors while cuda:0 is
    current must switch to cuda:1 first (checked with the CUDA calls stubbed out)."""
    from fastmlp.kernels import launch

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class FakeTensor:
        def __init__(self, device):
            self.device = torch.device(device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    wrapped = launch.on_first_tensors_device(lambda t, *a: "launched")
    assert wrapped(FakeTensor("cuda:1")) == "launched" and entered == [torch.device("cuda:1")]
    assert wrapped(FakeTensor("cuda:0")) == "launched" and len(entered) == 1  # already current
    assert wrapped(FakeTensor("cpu")) == "launched" and len(entered) == 1
    for name in ("linear_act_forward", "linear_act_grad_input", "linear_act_grad_weight"):
        assert getattr(kernels, name).__wrapped__ is not None  # every launcher is guarded
