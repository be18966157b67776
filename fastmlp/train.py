"""fit(): the training loop.

The loop itself is small: per epoch, choose how a step runs, run it on every batch, read the
epoch's losses back once, call the callbacks. How a step runs is a strategy object, one per job,
each with the same contract (``start_epoch()``, ``step(inputs, target)`` -> loss or None,
``take_loss_sum()``):

* :class:`AutogradStep` (here): the stock step, for any model and optimizer;
* :class:`fastmlp.cpu_step.CPUStep`: on CPU, plain MLPs without the autograd engine;
* :class:`fastmlp.graph_step.GraphStep`: on CUDA, the whole step captured in a CUDA graph.

What a stock loop spends its time on besides the math, and what fit does instead: per-step host
syncs (``loss.item()`` for logging): losses stay on the device and are read once per epoch; the
Python and launch overhead around a small step: the CPU step and the graph step above.

History: ``history["loss"]`` is the mean over the epoch's batches of the loss as ``loss_fn``
returns it (under torch.distributed: over every rank's batches), ``history["samples_per_s"]`` the
samples trained per second of wall time (all ranks together), ``history["time_s"]`` the epoch's
wall time.
"""

import contextlib
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from fastmlp.cpu_step import CPUStep
from fastmlp.graph_step import GraphStep, capture_stream, graph_refusal

__all__ = ["fit", "AutogradStep"]


class AutogradStep:
    """zero_grad, forward, loss, backward, optimizer.step: the stock step.

    keep_grads: zero the gradients in place instead of setting them to None, so they keep their
    memory (on CUDA: fastmlp.SGD's pointer table is then built once, and a graph captured after
    these steps sees the same addresses); on CPU set_to_none is cheaper.
    """

    def __init__(self, model, loss_fn, optimizer, keep_grads: bool):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.keep_grads = keep_grads

    def start_epoch(self) -> None:
        pass

    def step(self, inputs, target) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        loss = self.loss_fn(self.model(*inputs), target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def take_loss_sum(self) -> None:
        return None


class _StepChooser:
    """Picks each epoch's step strategy (see the module docstring).

    Per epoch, because between epochs callbacks may change what the choice depends on (the
    model's modules and hooks, the optimizer's hyperparameters and hooks). A graph that cannot
    be captured under cuda_graph="auto" is said once per fit call, as a warning naming why.
    """

    def __init__(self, model, loss_fn, optimizer, device, cuda_graph, cpu_fast_path):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.device, self.cuda_graph, self.cpu_fast_path = device, cuda_graph, cpu_fast_path
        self.autograd = AutogradStep(model, loss_fn, optimizer, keep_grads=device.type == "cuda")
        self.graph = None     # GraphStep, made on the first epoch that captures
        self.warned = False

    def for_epoch(self):
        refusal = graph_refusal(self.model, self.optimizer, self.cuda_graph, self.device,
                                self.loss_fn)
        if refusal is None:
            if self.graph is None:
                self.graph = GraphStep(self.model, self.loss_fn, self.optimizer, self.autograd,
                                       stream=capture_stream(self.model, self.device))
            return self.graph
        if refusal and not self.warned:
            self.warned = True
            warnings.warn(f"fastmlp.fit: training with eager steps, not a CUDA graph: {refusal}",
                          RuntimeWarning, stacklevel=3)
        if self.cpu_fast_path:
            cpu = CPUStep.build(self.model, self.loss_fn, self.optimizer, self.autograd)
            if cpu is not None:
                return cpu
        return self.autograd


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------
def fit(model: nn.Module, loader: Iterable, loss_fn: Callable, optimizer: torch.optim.Optimizer,
        epochs: int = 1, *, cuda_graph="auto", progress: bool = True,
        callbacks: Iterable = (), start_epoch: int = 0,
        cpu_fast_path: bool = True) -> Dict[str, List[float]]:
    """Train `model` for `epochs` passes over `loader`; return the per-epoch history.

    Args:
        model: any nn.Module (fused or not, DDP-wrapped or not); called as ``model(*inputs)``.
        loader: yields [inputs..., target] batches (TensorLoader, DataLoader, ...); batches on
            another device than the model are moved to it. ``set_epoch(epoch)`` is called on it
            (or on its sampler) before each epoch.
        loss_fn: ``loss_fn(output, target)`` -> scalar tensor (MSELoss, CrossEntropyLoss, ...).
        optimizer: any torch optimizer; fastmlp.SGD runs its one-launch kernel on CUDA.
        epochs: number of epochs.
        cuda_graph: "auto" captures the step in a CUDA graph when the model is on CUDA, the
            optimizer is an SGD (torch's or fastmlp's) or has ``capturable=True``, and the model
            is not DDP-wrapped. A step that cannot be captured trains eagerly instead, with one
            warning naming why: an SGD whose update would read a GPU tensor hyperparameter back
            as a number (a host sync, e.g. torch.optim.SGD's default foreach step with a CUDA
            tensor lr), a param group with ``capturable=False``, or a Python hook the step runs
            (module forward/backward hooks, global ones too, parameter hooks, optimizer step
            pre/post hooks: a replay runs no Python, so they would run only at capture). True
            captures whenever the model is on CUDA and raises a ValueError for a step that
            cannot be captured. DDP is captured only under True, with NCCL, after torch's
            documented 11 warm-up steps, and on the stream fit is called under, which must be
            the side stream DDP was constructed under (PyTorch's CUDA-graph notes):
            ``s = torch.cuda.Stream()``, ``with torch.cuda.stream(s): model = DDP(model)`` and
            ``fastmlp.fit(model, ..., cuda_graph=True)`` inside the same ``with``; on the
            default stream it is a ValueError (not yet run on a GPU). False never.
        progress: a tqdm bar per epoch (rank 0 only, and only when stderr is a terminal).
        callbacks: each called after every epoch as ``cb(epoch, logs)`` or
            ``cb.on_epoch_end(epoch, logs)`` with logs {"epoch", "loss", "samples_per_s",
            "time_s"}; a true return value stops training.
        start_epoch: the first epoch's number (for set_epoch and the logs) when resuming.
        cpu_fast_path: on CPU, run recognised MLPs (an nn.Sequential of Linear / FusedLinear /
            FusedLinearReLU, each optionally followed by one activation module fastmlp knows,
            and Identity; MSELoss or CrossEntropyLoss; no hooks) with the aten backward ops
            called directly instead of through autograd (same ops, same gradients; see
            fastmlp.cpu_step); False always uses autograd.

    Returns:
        {"loss": [...], "samples_per_s": [...], "time_s": [...]}, one entry per epoch run.
    """
    if epochs < 0:
        raise ValueError(f"fit: epochs must be >= 0, got {epochs}")
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"fit: cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    callbacks = list(callbacks)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    world_size, rank = _dist_world()
    graph_refusal(model, optimizer, cuda_graph, device, loss_fn)   # cuda_graph=True's errors first
    steps = _StepChooser(model, loss_fn, optimizer, device, cuda_graph, cpu_fast_path)
    history = {"loss": [], "samples_per_s": [], "time_s": []}
    show = bool(progress) and rank == 0 and sys.stderr.isatty()
    model.train()
    # CUDA streams, graphs and Triton launches use the current device: make it the model's.
    device_scope = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with device_scope:
        for epoch in range(start_epoch, start_epoch + epochs):
            _set_epoch(loader, epoch)
            step = steps.for_epoch()
            step.start_epoch()
            bar = _progress_bar(loader, epoch, start_epoch + epochs) if show else None
            t0 = time.perf_counter()
            losses, n_steps, n_samples = [], 0, 0
            for batch in loader:
                inputs, target = _split_batch(batch, device)
                loss = step.step(inputs, target)
                if loss is not None:
                    losses.append(loss)
                n_steps += 1
                n_samples += target.shape[0]
                if bar is not None:
                    bar.update(target.shape[0])
            loss_sum, n_steps, n_samples = _epoch_totals(losses, step.take_loss_sum(), n_steps,
                                                         n_samples, device, world_size)
            elapsed = time.perf_counter() - t0
            logs = {"epoch": epoch,
                    "loss": loss_sum / n_steps if n_steps else float("nan"),
                    "samples_per_s": n_samples / elapsed if elapsed > 0 else float("inf"),
                    "time_s": elapsed}
            for key in history:
                history[key].append(logs[key])
            if bar is not None:
                bar.set_postfix(loss=f"{logs['loss']:.4g}",
                                samples_per_s=f"{logs['samples_per_s']:,.0f}")
                bar.close()
            # every callback runs, even after one has asked to stop
            if any([_call_callback(cb, epoch, logs) for cb in callbacks]):
                break
    return history


# --------------------------------------------------------------------------------------------
# The loop's helpers
# --------------------------------------------------------------------------------------------
def _dist_world():
    """(world_size, rank) of the initialised default process group, or (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _split_batch(batch, device):
    """(inputs, target) from a loader's batch: [x, y] (or [x1, ..., xk, y]), moved to `device`.

    Every element must be a torch.Tensor. A numpy array (or a list) is refused with a TypeError
    naming what came, rather than converted: DataLoader's default collate already turns numpy
    into tensors, so a loader yielding numpy is one that skipped it, and a silent
    torch.as_tensor per step would pick dtypes (numpy's float64) the model may not have.
    """
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(f"fit: every batch must be a list or tuple of torch tensors (inputs..., "
                        f"target), as TensorLoader(x, y) or DataLoader(TensorDataset(x, y)) "
                        f"yields; got {_type_name(batch)}")
    for i, t in enumerate(batch):
        if not isinstance(t, torch.Tensor):
            what = "the target" if i == len(batch) - 1 else f"input {i}"
            raise TypeError(f"fit: every batch must be (inputs..., target) torch tensors; "
                            f"{what} (element {i} of the batch) is a {_type_name(t)}. Convert "
                            f"it in the loader (torch.from_numpy, torch.as_tensor), or use "
                            f"fastmlp.TensorLoader or a DataLoader, whose default collate "
                            f"makes tensors")
    tensors = [t if t.device == device else t.to(device, non_blocking=True) for t in batch]
    return tensors[:-1], tensors[-1]


def _type_name(obj) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)      # DataLoader with a DistributedSampler
    elif hasattr(getattr(loader, "batch_sampler", None), "sampler") and \
            hasattr(loader.batch_sampler.sampler, "set_epoch"):
        loader.batch_sampler.sampler.set_epoch(epoch)


def _epoch_totals(losses, device_sum: Optional[torch.Tensor], n_steps, n_samples, device,
                  world_size):
    """(sum of the epoch's losses, steps, samples) over all ranks: the one read per epoch.

    losses: the steps' returned losses (0-dim, on the device); device_sum: the sum of the rest
    (a graph's replays), or None.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    if losses:
        if len({loss.dtype for loss in losses}) == 1:
            total += torch.stack(losses).double().sum()  # exact: fp32 -> fp64
        else:
            total += torch.stack([loss.double() for loss in losses]).sum()
    if device_sum is not None:
        total += device_sum.double()
    stats = torch.stack([total.reshape(()),
                         torch.tensor(float(n_steps), device=device, dtype=torch.float64),
                         torch.tensor(float(n_samples), device=device, dtype=torch.float64)])
    if world_size > 1:
        on = stats if torch.distributed.get_backend() != "gloo" else stats.cpu()
        torch.distributed.all_reduce(on)
        stats = on
    loss_sum, steps, samples = stats.tolist()
    return loss_sum, steps, samples


def _call_callback(cb, epoch: int, logs: Dict) -> bool:
    if hasattr(cb, "on_epoch_end"):
        return bool(cb.on_epoch_end(epoch, logs))
    return bool(cb(epoch, logs))


def _progress_bar(loader, epoch, total_epochs):
    from tqdm.auto import tqdm  # imported only when a bar is shown

    total = getattr(loader, "num_samples", None)            # TensorLoader: this rank's samples
    if total is None:
        try:
            total = len(loader.dataset)                          # DataLoader
        except (AttributeError, TypeError):
            total = None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{total_epochs}", unit=" samples",
                unit_scale=True, leave=True, mininterval=0.25, dynamic_ncols=True)
