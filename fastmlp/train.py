"""fit(): the training loop, lean on CPU and captured in a CUDA graph on GPUs.

What a stock loop spends its time on, besides the math, and what fit does instead:

* Per-step host syncs (``loss.item()`` for logging): losses stay on the device, summed there, and
  are read once per epoch.
* Python and launch overhead of forward + loss + backward + optimizer (dozens of kernels, each a
  few microseconds to launch, for an MLP step that computes for a few microseconds on a GPU): on
  CUDA, with static shapes, the whole step is captured once in a CUDA graph and replayed, one
  launch per step. The graph needs

  - a warm-up on a side stream first (lazy init, cuBLAS workspaces, Triton compiles and
    autotuning must not happen inside the capture): the first full batches are trained eagerly
    there;
  - static tensors: inputs are copied into fixed buffers; the gradients are kept between steps
    (zeroed in place inside the graph instead of set to None), so autograd accumulates into the
    same memory and the optimizer sees the same addresses (fastmlp.SGD's pointer table);
  - hyperparameters fixed in it: before each replay fit compares the optimizer's param_groups with
    the captured ones; a changed float lr of fastmlp.SGD is written into the device tensor its
    kernel reads (:meth:`fastmlp.SGD.sync_lr`), any other change re-captures the graph.

  The short last batch of an epoch has another shape and runs eagerly. The graph is cached per
  (model, optimizer, loss, shapes), so calling fit(epochs=1) repeatedly reuses it.

History: ``history["loss"]`` is the mean over the epoch's batches of the loss as ``loss_fn``
returns it (under torch.distributed: over every rank's batches), ``history["samples_per_s"]`` the
samples trained per second of wall time (all ranks together), ``history["time_s"]`` the epoch's
wall time.
"""

import contextlib
import sys
import time
import weakref
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

__all__ = ["fit"]

_GRAPH_WARMUP_STEPS = 3
_GRAPH_WARMUP_STEPS_DDP = 11  # torch's documented minimum before capturing a DDP step
_graph_cache = weakref.WeakKeyDictionary()  # model -> _GraphStep


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _dist_world():
    """(world_size, rank) of the initialised default process group, or (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _split_batch(batch, device):
    """(inputs, target) from a loader's batch: [x, y] (or [x1, ..., xk, y]), moved to `device`."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("fit: every batch must be a list or tuple (inputs..., target), as "
                        "TensorLoader(x, y) or DataLoader(TensorDataset(x, y)) yields")
    tensors = [t if t.device == device else t.to(device, non_blocking=True) for t in batch]
    return tensors[:-1], tensors[-1]


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)      # DataLoader with a DistributedSampler
    elif hasattr(getattr(loader, "batch_sampler", None), "sampler") and \
            hasattr(loader.batch_sampler.sampler, "set_epoch"):
        loader.batch_sampler.sampler.set_epoch(epoch)


def _hparams(optimizer) -> tuple:
    """Everything in param_groups but the params; tensors by identity (their values may change)."""
    return tuple(tuple((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v)
                       for k, v in group.items() if k != "params")
                 for group in optimizer.param_groups)


def _lr_only_change(before: tuple, after: tuple) -> bool:
    if len(before) != len(after):
        return False
    for gb, ga in zip(before, after):
        db, da = dict(gb), dict(ga)
        if db.keys() != da.keys() or any(db[k] != da[k] for k in db if k != "lr"):
            return False
    return True


def _graph_capable(model, optimizer, cuda_graph) -> bool:
    """cuda_graph="auto": CUDA, an optimizer whose step is capturable, no DDP (see fit)."""
    if cuda_graph is False:
        return False
    if _model_device(model).type != "cuda":
        if cuda_graph is True:
            raise ValueError("fit(cuda_graph=True) needs the model on a CUDA device")
        return False
    if cuda_graph is True:
        return True
    if _is_ddp(model):
        return False
    return isinstance(optimizer, torch.optim.SGD) or bool(optimizer.defaults.get("capturable"))


def _call_callback(cb, epoch: int, logs: Dict) -> bool:
    if hasattr(cb, "on_epoch_end"):
        return bool(cb.on_epoch_end(epoch, logs))
    return bool(cb(epoch, logs))


# --------------------------------------------------------------------------------------------
# The CPU step without autograd, for the MLPs fastmlp is about
# --------------------------------------------------------------------------------------------
_REDUCTIONS = {"mean": 1, "sum": 2}  # at::Reduction, as the aten loss ops take it


class _ManualMLPStep:
    """forward + loss + backward of a plain MLP with the aten ops autograd itself would call.

    On a CPU, a seed-sized step (64x1000 -> 100 -> 10) computes for ~0.2-0.3 ms, and the autograd
    engine, module calls and custom-op dispatch around it cost about as much again. For the models
    this project is about, an ``nn.Sequential`` of nn.Linear / FusedLinear / FusedLinearReLU /
    nn.ReLU / nn.Identity trained with MSELoss or CrossEntropyLoss, the backward is a fixed
    sequence of a few matrix products, so fit runs that sequence directly: the same forward ops
    as the modules (addmm, relu), the same backward ops as autograd (mse_loss_backward,
    nll_loss_backward + _log_softmax_backward_data, threshold_backward, mm, sum), the gradients
    stored in ``p.grad`` as autograd stores them; then ``optimizer.step()`` as usual.

    Anything else takes autograd: other modules or losses, any module/parameter hook (global
    ones too), autocast, parameters of mixed dtypes, non-2-D inputs, fastmlp's backend forced to
    "triton", ``fit(cpu_fast_path=False)``.
    """

    def __init__(self, layers, loss_fn):
        self.layers = layers          # [(weight, bias or None, relu: bool)]
        self.loss_fn = loss_fn
        self.dtype = layers[0][0].dtype
        self.ce = isinstance(loss_fn, nn.CrossEntropyLoss)
        self.reduction = _REDUCTIONS[loss_fn.reduction]
        self.one = torch.ones((), dtype=self.dtype)
        self.params = [t for w, b, _ in layers for t in (w, b) if t is not None]
        self.views = None   # see prepare()

    @classmethod
    def build(cls, model, loss_fn):
        from fastmlp import backend
        from fastmlp.nn import FusedLinear, FusedLinearReLU

        if type(model) is not nn.Sequential or backend.get_backend() == "triton":
            return None
        if type(loss_fn) is nn.MSELoss:
            if loss_fn.reduction not in _REDUCTIONS:
                return None
        elif type(loss_fn) is nn.CrossEntropyLoss:
            if loss_fn.weight is not None or loss_fn.label_smoothing != 0 or \
                    loss_fn.reduction not in _REDUCTIONS:
                return None
        else:
            return None
        mod = torch.nn.modules.module
        if any(getattr(mod, name, None) for name in (
                "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs")):
            return None
        layers = []
        for m in [model, loss_fn, *model.children()]:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
                    getattr(m, "_backward_pre_hooks", None):
                return None
        for m in model.children():
            t = type(m)
            if t in (nn.Linear, FusedLinear, FusedLinearReLU):
                layers.append([m.weight, m.bias, t is FusedLinearReLU])
            elif t is nn.ReLU:
                if not layers:
                    return None
                layers[-1][2] = True
            elif t is not nn.Identity:
                return None
        if not layers:
            return None
        params = [t for w, b, _ in layers for t in (w, b) if t is not None]
        if any(p.device.type != "cpu" or p.dtype != params[0].dtype or not p.requires_grad
               or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
               or not p.is_floating_point() for p in params):
            return None
        return cls([tuple(layer) for layer in layers], loss_fn)

    def accepts(self, inputs, target) -> bool:
        if len(inputs) != 1 or torch.is_autocast_enabled("cpu") or not torch.is_grad_enabled():
            return False
        x = inputs[0]
        if x.dim() != 2 or x.dtype != self.dtype or x.device.type != "cpu" or x.requires_grad \
                or target.requires_grad:
            return False
        if self.ce:
            return target.dim() == 1 and target.dtype == torch.int64
        return target.shape == (x.shape[0], self.layers[-1][0].shape[0]) and \
            target.dtype == self.dtype

    def prepare(self, own_grads: bool) -> None:
        """Get ready for an epoch of steps; fit calls this at the start of each.

        Detached views of the weights (and of their transposes), with the parameters they
        belong to and whether a ReLU follows: the ops on the views record no
        autograd graph without a grad-mode switch per step, and the views share the
        parameters' storage, so every update shows through. Made per epoch, since in between
        a callback may have swapped a parameter's .data.

        own_grads: the steps will run with replace_grads=True. The current gradients are
        dropped (zero_grad(set_to_none=True), which the first step would amount to anyway),
        so that the ones the steps allocate belong to this epoch alone, and later steps
        overwrite them in place: reusing the same memory each step is faster than a fresh
        allocation (~0.2 ms per seed step, measured here), and no tensor the caller holds gets
        overwritten.
        """
        self.views = [(w.detach(), w.detach().t(), None if b is None else b.detach(), relu, w, b)
                      for w, b, relu in self.layers]
        if own_grads:
            for p in self.params:
                p.grad = None

    def __call__(self, x, target, replace_grads=False):
        """One step's loss (a 0-dim tensor); the gradients land in the parameters' .grad.

        replace_grads: store them over whatever .grad holds, as zero_grad(set_to_none=True)
        followed by autograd would (fit says so when the optimizer owns exactly these
        parameters); otherwise accumulate like autograd does.
        """
        acts = [x]
        h = x
        for w, w_t, b, relu, _, _ in self.views:
            h = torch.addmm(b, h, w_t) if b is not None else h.mm(w_t)
            if relu:
                h = torch.relu_(h)
            acts.append(h)
        aten = torch.ops.aten
        if self.ce:
            lsm = torch.log_softmax(h, 1)
            loss, total_weight = aten.nll_loss_forward(lsm, target, None, self.reduction,
                                                       self.loss_fn.ignore_index)
            g = aten.nll_loss_backward(self.one, lsm, target, None, self.reduction,
                                       self.loss_fn.ignore_index, total_weight)
            g = aten._log_softmax_backward_data(g, lsm, 1, self.dtype)
        else:
            loss = _mse_loss(h, target, self.reduction)
            g = aten.mse_loss_backward(self.one, h, target, self.reduction)
        i = len(self.views)
        for w, _, _, relu, w_param, b_param in reversed(self.views):
            i -= 1
            if relu:
                g = aten.threshold_backward(g, acts[i + 1], 0)
            g_t = g.t()
            if not replace_grads:
                _accumulate(w_param, g_t.mm(acts[i]))
                if b_param is not None:
                    _accumulate(b_param, g.sum(0))
            else:
                # After an epoch's first step the gradients are this epoch's own (prepare):
                # write them in place.
                grad = w_param.grad
                if grad is None:
                    w_param.grad = g_t.mm(acts[i])
                else:
                    torch.mm(g_t, acts[i], out=grad)
                if b_param is not None:
                    grad = b_param.grad
                    if grad is None:
                        b_param.grad = g.sum(0)
                    else:
                        torch.sum(g, 0, out=grad)
            if i > 0:
                g = g.mm(w)
        return loss


# torch.nn.functional.mse_loss's kernel without its Python-side checks (broadcast warning,
# reduction-string parsing): accepts() has already made sure the shapes are equal.
_mse_loss = torch._C._nn.mse_loss


def _accumulate(param, grad):
    """Store a gradient the way autograd's AccumulateGrad does: set it, or add to an existing one."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


# --------------------------------------------------------------------------------------------
# The captured step
# --------------------------------------------------------------------------------------------
class _GraphStep:
    """forward + loss + backward + optimizer.step captured once, replayed per batch.

    A graph bakes in two things that live outside it, so both are recorded at capture
    (:meth:`state`) and compared before the graph is trusted again (:meth:`revalidate`, at
    every epoch start; between two steps of an epoch nothing else runs):

    * the optimizer's hyperparameters (kernel arguments, frozen at capture);
    * the addresses of every tensor it reads or writes that is not its own: parameters,
      gradients, optimizer state (a ``zero_grad(set_to_none=True)``, a loaded optimizer
      state_dict or a parameter's swapped ``.data`` between fit calls leave the graph pointing
      at freed memory). The tensors themselves are held until the graph is dropped, and so
      are fastmlp.SGD's pointer tables, which its small cache could otherwise free.

    A change makes the graph be captured again after two eager warm-up steps: the first may
    create state (gradients, momentum buffers) and build fastmlp.SGD's first-step table, the
    second builds the steady-state table the capture will use; nothing may be allocated or
    copied to the device for the first time inside a capture.
    """

    REWARM_STEPS = 2

    def __init__(self, model, loss_fn, optimizer, key):
        # The model only by weak reference: this object lives in a cache keyed (weakly) by the
        # model, and a strong reference back would keep both alive forever.
        self._model = weakref.ref(model)
        self.loss_fn, self.optimizer, self.key = loss_fn, optimizer, key
        self.warmup_left = _GRAPH_WARMUP_STEPS_DDP if _is_ddp(model) else _GRAPH_WARMUP_STEPS
        self.graph = None
        self.static_inputs = self.static_target = None
        self.loss_sum = None      # device scalar: sum of the replayed steps' losses
        self.warm_state = None    # state() after the last warm-up step
        self.captured_state = None
        self.keepalive = ()       # tensors and SGD plans the graph points into
        self.side_stream = None   # made on first use, on the model's device

    def _referenced(self) -> list:
        """What a captured step reads or writes outside its own memory pool: the optimizer's and
        the model's parameters, each followed by its gradient (None if unset) and the
        optimizer's state tensors for it."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        model = self._model()
        if model is not None:
            params += list(model.parameters())
        out = []
        for p in params:
            out += [p, p.grad]
            out += [v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return out

    def _held_by_graph(self) -> tuple:
        """The tensors a captured graph points into, and fastmlp.SGD's pointer tables, whose
        small cache could otherwise free one the graph reads."""
        launcher = getattr(self.optimizer, "_launcher", None)
        plans = tuple(launcher._plans.values()) if launcher is not None else ()
        return tuple(t for t in self._referenced() if t is not None) + plans

    def state(self) -> tuple:
        """(hyperparameters, addresses of parameters, gradients and optimizer state)."""
        addresses = tuple(0 if t is None else t.data_ptr() for t in self._referenced())
        return _hparams(self.optimizer), addresses

    def _sync_lr(self) -> None:
        """fastmlp.SGD: write the current lrs into the device tensors its kernel (and so a graph
        replay) reads; a changed float lr then needs no re-capture."""
        if hasattr(self.optimizer, "sync_lr"):
            self.optimizer.sync_lr()

    def _compatible(self, before: tuple, now: tuple) -> bool:
        """True if a step captured (or warmed up) in state `before` is right in state `now`:
        the same, or the same addresses with only fastmlp.SGD float lrs changed (synced)."""
        return before == now or (before[1] == now[1] and hasattr(self.optimizer, "sync_lr")
                                 and _lr_only_change(before[0], now[0]))

    def revalidate(self) -> None:
        """Keep the captured graph only if nothing it baked in has changed (see the class)."""
        if self.graph is None:
            return
        self._sync_lr()
        now = self.state()
        if self._compatible(self.captured_state, now):
            self.captured_state = now
            return
        self.graph = None
        self.keepalive = ()
        self.warmup_left = max(self.warmup_left, self.REWARM_STEPS)

    def rewarm_if_changed(self) -> None:
        """Right before a capture: warm up again if something changed since the warm-up (an
        epoch boundary may lie between them, and a callback may have run there)."""
        self._sync_lr()
        if self.warm_state is None or not self._compatible(self.warm_state, self.state()):
            self.warmup_left = max(self.warmup_left, self.REWARM_STEPS)

    def warmup_step(self, inputs, target, eager_step):
        """An ordinary training step on the side stream (real data, really trained)."""
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(device=target.device)
        stream = self.side_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = eager_step(inputs, target, keep_grads=True)
        torch.cuda.current_stream().wait_stream(stream)
        self.warmup_left -= 1
        self.warm_state = self.state()
        return loss

    def capture(self, inputs, target):
        model, loss_fn, optimizer = self._model(), self.loss_fn, self.optimizer
        self.static_inputs = [t.clone() for t in inputs]
        self.static_target = target.clone()
        if self.loss_sum is None:
            self.loss_sum = torch.zeros((), dtype=torch.float32, device=target.device)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            optimizer.zero_grad(set_to_none=False)   # in place: the grads keep their addresses
            loss = loss_fn(model(*self.static_inputs), self.static_target)
            loss.backward()
            optimizer.step()
            self.loss_sum.add_(loss.detach().float())
        self.captured_state = self.state()
        self.keepalive = self._held_by_graph()

    def replay(self, inputs, target):
        """Copy the batch into the static inputs and replay the captured step."""
        for s, t in zip(self.static_inputs, inputs):
            s.copy_(t, non_blocking=True)
        self.static_target.copy_(target, non_blocking=True)
        self.graph.replay()

    def take_loss_sum(self) -> Optional[torch.Tensor]:
        if self.loss_sum is None:
            return None
        out = self.loss_sum.clone()
        self.loss_sum.zero_()
        return out


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
            is not DDP-wrapped; True captures whenever the model is on CUDA (DDP included, with
            NCCL, after torch's documented 11 warm-up steps; PyTorch's CUDA-graph notes also
            require the DDP module to be constructed under a side stream,
            ``with torch.cuda.stream(torch.cuda.Stream()): model = DDP(model)``; not yet run on a
            GPU); False never.
        progress: a tqdm bar per epoch (rank 0 only, and only when stderr is a terminal).
        callbacks: each called after every epoch as ``cb(epoch, logs)`` or
            ``cb.on_epoch_end(epoch, logs)`` with logs {"epoch", "loss", "samples_per_s",
            "time_s"}; a true return value stops training.
        start_epoch: the first epoch's number (for set_epoch and the logs) when resuming.
        cpu_fast_path: on CPU, run recognised MLPs (an nn.Sequential of Linear / FusedLinear /
            FusedLinearReLU / ReLU / Identity, MSELoss or CrossEntropyLoss, no hooks) with the
            aten backward ops called directly instead of through autograd (same ops, same
            gradients; see _ManualMLPStep); False always uses autograd.

    Returns:
        {"loss": [...], "samples_per_s": [...], "time_s": [...]}, one entry per epoch run.
    """
    if epochs < 0:
        raise ValueError(f"fit: epochs must be >= 0, got {epochs}")
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"fit: cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    callbacks = list(callbacks)
    device = _model_device(model)
    world_size, rank = _dist_world()
    use_graph = _graph_capable(model, optimizer, cuda_graph)
    history = {"loss": [], "samples_per_s": [], "time_s": []}

    manual = _ManualMLPStep.build(model, loss_fn) if cpu_fast_path and not use_graph else None

    lean_step = None   # the optimizer's own step without its per-call costs; per epoch

    def eager_step(inputs, target, keep_grads=False):
        nonlocal lean_step
        if lean_step is not None and manual.accepts(inputs, target):
            loss = manual(inputs[0], target, replace_grads=True)
            lean_step()
            return loss
        # keep_grads: zero in place so that the gradients keep their memory (graph mode)
        optimizer.zero_grad(set_to_none=not keep_grads)
        if manual is not None and manual.accepts(inputs, target):
            loss = manual(inputs[0], target)
        else:
            loss = loss_fn(model(*inputs), target)
            loss.backward()
        optimizer.step()
        if lean_step is not None:
            # step() may have made state the lean step holds (first momentum buffers): renew it
            lean_step = optimizer._cpu_step_plan(manual.params)
        return loss.detach()

    # On CUDA the gradients stay allocated between steps (zeroed in place): fastmlp.SGD's pointer
    # table is then built once instead of every step. On CPU set_to_none is cheaper.
    keep_grads = device.type == "cuda"
    graph_step = None
    if use_graph:
        graph_step = _graph_cache.get(model)
        if graph_step is not None and (graph_step.optimizer is not optimizer
                                       or graph_step.loss_fn is not loss_fn):
            graph_step = None

    show = bool(progress) and rank == 0 and sys.stderr.isatty()
    model.train()
    # CUDA streams, graphs and Triton launches use the current device: make it the model's.
    device_scope = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with device_scope:
        for epoch in range(start_epoch, start_epoch + epochs):
            _set_epoch(loader, epoch)
            if graph_step is not None:
                graph_step.revalidate()   # callbacks or the caller may have changed its inputs
            if manual is not None:
                plan = getattr(optimizer, "_cpu_step_plan", None)
                lean_step = plan(manual.params) if plan is not None else None
                manual.prepare(own_grads=lean_step is not None)
            bar = _progress_bar(loader, epoch, start_epoch + epochs) if show else None
            eager_losses = []
            n_samples = n_steps = 0
            full_shape = None
            t0 = time.perf_counter()
            for batch in loader:
                inputs, target = _split_batch(batch, device)
                n = target.shape[0]
                if use_graph:
                    shape_key = tuple((tuple(t.shape), t.dtype) for t in (*inputs, target))
                    if full_shape is None:
                        full_shape = shape_key    # the first batch of an epoch sets the static shape
                    if shape_key == full_shape:
                        if graph_step is None or graph_step.key != shape_key:
                            graph_step = _GraphStep(model, loss_fn, optimizer, shape_key)
                            _graph_cache[model] = graph_step
                        if graph_step.graph is None and graph_step.warmup_left == 0:
                            graph_step.rewarm_if_changed()
                        if graph_step.warmup_left > 0:
                            eager_losses.append(graph_step.warmup_step(inputs, target, eager_step))
                        else:
                            if graph_step.graph is None:
                                graph_step.capture(inputs, target)  # records, does not run
                            graph_step.replay(inputs, target)
                    else:
                        eager_losses.append(eager_step(inputs, target, keep_grads=True))
                else:
                    eager_losses.append(eager_step(inputs, target, keep_grads=keep_grads))
                n_samples += n
                n_steps += 1
                if bar is not None:
                    bar.update(n)

            # The one read per epoch: sum of losses, steps and samples (over all ranks).
            total = torch.zeros((), dtype=torch.float64, device=device)
            if eager_losses:
                if len({l.dtype for l in eager_losses}) == 1:
                    total += torch.stack(eager_losses).double().sum()  # exact: fp32 -> fp64
                else:
                    total += torch.stack([l.double() for l in eager_losses]).sum()
            if graph_step is not None:
                graph_sum = graph_step.take_loss_sum()
                if graph_sum is not None:
                    total += graph_sum.double()
            stats = torch.stack([total.reshape(()), torch.tensor(float(n_steps), device=device,
                                                                 dtype=torch.float64),
                                 torch.tensor(float(n_samples), device=device, dtype=torch.float64)])
            if world_size > 1:
                backend = torch.distributed.get_backend()
                on = stats if backend != "gloo" else stats.cpu()
                torch.distributed.all_reduce(on)
                stats = on
            loss_sum, steps, samples = stats.tolist()
            elapsed = time.perf_counter() - t0
            mean_loss = loss_sum / steps if steps else float("nan")
            rate = samples / elapsed if elapsed > 0 else float("inf")
            history["loss"].append(mean_loss)
            history["samples_per_s"].append(rate)
            history["time_s"].append(elapsed)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4g}", samples_per_s=f"{rate:,.0f}")
                bar.close()
            logs = {"epoch": epoch, "loss": mean_loss, "samples_per_s": rate, "time_s": elapsed}
            stop = False
            for cb in callbacks:
                stop = _call_callback(cb, epoch, logs) or stop
            if stop:
                break
    return history


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
