"""fit's step on CUDA: forward + loss + backward + optimizer.step captured in a CUDA graph.

Contract with fit (fastmlp/train.py), the same for every step strategy:

* :func:`graph_refusal` says, before each epoch, whether the step may be captured at all;
* ``GraphStep(model, loss_fn, optimizer, fallback)``; ``start_epoch()`` before an epoch's first
  batch re-validates a graph captured earlier (between epochs callbacks and the caller may have
  changed what it baked in); ``step(inputs, target)`` trains on one batch and returns its loss,
  or None for a replayed batch, whose loss is added to a device-side sum instead;
  ``take_loss_sum()`` hands that sum over (and resets it) at the epoch's end. ``fallback`` is the
  autograd step (gradients zeroed in place), used for the warm-up steps and for batches of
  another shape than the epoch's first (the short last batch).

Why a graph. An MLP step on a GPU computes for microseconds and launches dozens of kernels, each
costing a few microseconds to launch: replayed from one graph, the step is one launch. A graph
freezes what its kernels read: addresses, and every argument passed by value. So

* warm-up steps run first on a side stream: lazy init, cuBLAS workspaces, Triton compiles and
  autotuning, first momentum buffers and fastmlp.SGD's pointer tables must not happen inside a
  capture (nothing may be allocated or copied to the device for the first time there). The
  capture runs on that same stream, made on the model's device and passed to
  ``torch.cuda.graph(stream=...)``: without it torch captures on one class-wide stream made on
  whichever device was current at the process's first capture, and a capture for a model on
  another GPU records nothing (pytorch#87894). A DDP model warms up and is captured on the
  stream fit is called under instead, which must be the one DDP was constructed under (see
  :func:`graph_refusal`);
* inputs are copied into static buffers; the gradients are kept between steps (zeroed in place
  inside the graph), so autograd accumulates into the same memory every replay;
* everything the graph reads or writes outside its own memory pool is recorded at capture
  (:meth:`CapturedStep.state`) and compared before the graph is trusted again, and held alive
  until it is dropped (:meth:`CapturedStep.keepalive`): see CapturedStep;
* the capture runs in ``capture_error_mode="thread_local"``: in the default "global" mode a CUDA
  call that is illegal during a capture invalidates it from any thread, and a DataLoader with
  ``pin_memory=True`` has a thread allocating pinned memory (cudaHostAlloc) whenever it stages a
  batch. Only this thread's calls are restricted now; the pin thread's are not captured;
* a replay runs no Python: a step with Python hooks (module, tensor or optimizer-step hooks, an
  EMA update in a step post-hook, say) would run them once, at capture, and never again, so it
  is not captured (:func:`graph_refusal`); neither is an optimizer torch would refuse to
  capture (a param group with ``capturable=False``);
* a capture that fails leaves nothing behind: the half-recorded graph is dropped, warm-up is
  re-armed, and the error propagates (:meth:`CapturedStep.capture`).

The graph is cached per model (for as long as the model lives, with the same optimizer and loss
module, for one batch shape, dtype and device), so calling fit(epochs=1) repeatedly reuses it;
after ``model.to(another_device)`` the next fit warms up and captures anew, with a stream and a
loss sum on the new device.
"""

import weakref
from typing import NamedTuple, Optional

import torch
from torch import nn

from fastmlp.cpu_step import python_hooks

__all__ = ["GraphStep", "CapturedStep", "graph_refusal", "uncapturable_reason"]

_WARMUP_STEPS = 3
_WARMUP_STEPS_DDP = 11  # torch's documented minimum before capturing a DDP step
# DDP's reducer collects runtime stats (CUDA timing events, read back later) on its first 10
# iterations and then every sample_rate-th (default 100); set this high before a capture so no
# capture (a re-capture too) lands on a sampled iteration. Private API, in torch since 1.9
# (pytorch#53145), called only if present.
_DDP_LOGGING_SAMPLE_RATE = 1 << 30
_SGD_NUMBERS = ("lr", "momentum", "dampening", "weight_decay")
_cache = weakref.WeakKeyDictionary()  # model -> CapturedStep


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


# --------------------------------------------------------------------------------------------
# Whether the step may be captured
# --------------------------------------------------------------------------------------------
def uncapturable_reason(optimizer) -> Optional[str]:
    """Why the optimizer's step cannot be captured in a CUDA graph, or None if it can.

    An SGD hyperparameter held in a tensor on a GPU, where the update takes it as a number:
    torch's foreach and per-tensor SGD pass it on as ``alpha=-lr`` (``.item()``), every
    implementation tests ``momentum != 0`` and converts weight_decay and dampening to floats: a
    host sync, which a capture cannot contain (it fails the capture). Allowed: an lr the update
    reads from device memory, that is fastmlp.SGD's kernel on that device
    (:meth:`fastmlp.SGD.lr_tensors` returns the very tensor) or torch's fused SGD with the lr on
    its parameters' device (its kernel loads it). A CPU tensor is read without a sync: its value
    is captured as a number, and CapturedStep compares it.

    Other optimizers: a param group with ``capturable=False`` (torch's Adam, AdamW, ... check
    every group when their step is captured, and raise); one without that key is taken at its
    word.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        for gi, group in enumerate(optimizer.param_groups):
            if "capturable" in group and not group["capturable"]:
                return (f"param group {gi} of {type(optimizer).__name__} has capturable=False "
                        f"(torch raises when such a step is captured; make the optimizer with "
                        f"capturable=True, every param group included)")
        return None
    lr_tensors = getattr(optimizer, "lr_tensors", None)
    for gi, group in enumerate(optimizer.param_groups):
        for key in _SGD_NUMBERS:
            value = group.get(key)
            if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
                continue
            if key == "lr" and _reads_lr_tensor(gi, group, value, lr_tensors):
                continue
            return (f"param group {gi}'s {key} is a tensor on {value.device}, which "
                    f"{type(optimizer).__name__}'s update reads back as a number (.item(), a host "
                    f"sync a CUDA graph cannot contain)")
    return None


def _reads_lr_tensor(gi, group, lr, lr_tensors) -> bool:
    """True if this group's update reads the device tensor `lr` itself (see uncapturable_reason).
    Decided, like fastmlp.SGD.lr_tensors, from the parameters with a gradient, or from all of
    them before the first step."""
    if lr_tensors is not None:
        read = lr_tensors(gi)
        if read is not None:
            return all(t is lr for t in read)
    params = [p for p in group["params"] if p.grad is not None] or list(group["params"])
    return bool(group.get("fused")) and all(p.device == lr.device for p in params)


def _on_default_stream(device: torch.device) -> bool:
    return torch.cuda.current_stream(device) == torch.cuda.default_stream(device)


def capture_stream(model: nn.Module, device: torch.device):
    """The stream fit warms up and captures `model`'s step on, if not a side stream of its own.

    A DDP model: the current stream at fit's entry. DDP's reducer holds the parameters'
    AccumulateGrad nodes, tagged with the stream DDP was constructed on, and PyTorch's
    CUDA-graph notes require DDP be constructed under a side stream and the step be captured
    there: ``with torch.cuda.stream(s): model = DDP(model); fit(model, ..., cuda_graph=True)``.
    None for any other model (CapturedStep makes its own side stream on the model's device).
    """
    return torch.cuda.current_stream(device) if _is_ddp(model) else None


def graph_refusal(model: nn.Module, optimizer, cuda_graph, device: torch.device,
                  loss_fn=None) -> Optional[str]:
    """None if fit captures the step of `model` (on `device`) now, else why not ("" for auto's
    documented rules, which need no warning: not on CUDA, DDP, an optimizer neither SGD nor
    capturable).

    Refused besides: an SGD update reading a GPU tensor hyperparameter back as a number, a
    param group with ``capturable=False`` (:func:`uncapturable_reason`), and any Python hook the
    step would run (``fastmlp.cpu_step.python_hooks``): a replay runs no Python, so a hook
    would run once, at capture, and never again (and one reading a value back fails the
    capture). Under "auto" fit then trains eagerly, with one warning naming the cause.

    cuda_graph=True insists: a step that cannot be captured is a ValueError, not a fallback;
    for a DDP model also fit called on the default stream (see :func:`capture_stream`).
    """
    if cuda_graph is False:
        return ""
    if device.type != "cuda":
        if cuda_graph is True:
            raise ValueError("fit(cuda_graph=True) needs the model on a CUDA device")
        return ""
    if cuda_graph is not True:
        if _is_ddp(model):
            return ""
        if not isinstance(optimizer, torch.optim.SGD) and \
                not any(g.get("capturable") for g in optimizer.param_groups):
            return ""
    reason = uncapturable_reason(optimizer)
    if reason is None:
        hook = python_hooks(model, loss_fn, optimizer)
        if hook is not None:
            reason = (f"the step runs {hook}; a CUDA graph replay runs no Python, so it would "
                      f"run once, at capture, and never on the replays")
    if cuda_graph is True:
        if reason is not None:
            raise ValueError(f"fit(cuda_graph=True): the step cannot be captured: {reason}")
        if _is_ddp(model) and _on_default_stream(device):
            raise ValueError(
                "fit(cuda_graph=True) with a DistributedDataParallel model was called on the "
                "default CUDA stream; PyTorch's CUDA-graph notes require DDP be constructed "
                "under a side stream and its step captured there (its reducer's AccumulateGrad "
                "nodes are bound to the construction stream): s = torch.cuda.Stream(); "
                "with torch.cuda.stream(s): model = DDP(model); fastmlp.fit(model, ..., "
                "cuda_graph=True)")
        return None
    return reason


# --------------------------------------------------------------------------------------------
# One captured step and what it baked in
# --------------------------------------------------------------------------------------------
def _number(v):
    """A hyperparameter as a graph sees it: a number by value; a tensor by identity (a graph
    reading it from device memory sees in-place changes), plus its value if it is on the CPU
    (the update reads that value as a number, which the graph then keeps)."""
    if not isinstance(v, torch.Tensor):
        return v
    if v.device.type == "cpu":
        return ("tensor", id(v), tuple(v.reshape(-1).tolist()))
    return ("tensor", id(v))


def _hparams(optimizer) -> tuple:
    """Everything in param_groups but the params (see _number)."""
    return tuple(tuple((k, _number(v)) for k, v in group.items() if k != "params")
                 for group in optimizer.param_groups)


class GraphState(NamedTuple):
    """What a captured step depends on, recorded at capture and compared before each epoch."""
    hparams: tuple     # per group: (key, value) pairs, see _number
    addresses: tuple   # data_ptr of parameters, gradients (0: None), optimizer state tensors
    lr_reads: tuple    # per group: None (lr taken as a number) or the data_ptr of each device
                       # lr tensor the update reads (0: none yet), see fastmlp.SGD.lr_tensors


class CapturedStep:
    """forward + loss + backward + optimizer.step for one batch shape: warm-up, capture, replay.

    A graph bakes in what lives outside it, so that is recorded at capture (:meth:`state`) and
    compared before the graph is trusted again (:meth:`revalidate`, at every epoch start;
    between two steps of an epoch nothing else runs):

    * the optimizer's hyperparameters, which reach the kernels as arguments, frozen at capture.
      A changed lr alone is accepted for the groups whose update reads it from a device tensor
      (fastmlp.SGD's kernel: :meth:`fastmlp.SGD.lr_tensors`), after :meth:`fastmlp.SGD.sync_lr`
      wrote it there; any other change, and an lr change of any group torch's implementation
      updates, means a new capture;
    * the addresses of every tensor it reads or writes that is not its own: parameters,
      gradients, optimizer state, the device lr tensors (a ``zero_grad(set_to_none=True)``, a
      loaded optimizer state_dict, a swapped ``.data`` or an optimizer whose lr cache was
      rebuilt leave the graph pointing at freed memory). Those tensors are held until the
      graph is dropped (:meth:`keepalive`), and so are fastmlp.SGD's pointer tables, which its
      small cache could otherwise free.

    A change makes the graph be captured again after two eager warm-up steps: the first may
    create state (gradients, momentum buffers) and build fastmlp.SGD's first-step table, the
    second builds the steady-state table the capture will use.

    Invariant: ``graph`` is None or a complete capture, and ``captured_state``/``keepalive``
    belong to that graph (None/() without one): a graph is published only when its capture
    succeeded, and whatever drops it drops them too (:meth:`_drop`).

    One device: the step's side stream and loss sum live on `device` (fit keys its cached step
    by the batches' device too, so a model moved to another GPU gets a new CapturedStep).
    `stream`: the stream to warm up and capture on (see :func:`capture_stream`); None: a side
    stream of its own, made on `device` on first use.
    """

    REWARM_STEPS = 2

    def __init__(self, model, loss_fn, optimizer, key, device=None, stream=None):
        # The model only by weak reference: this object lives in a cache keyed (weakly) by the
        # model, and a strong reference back would keep both alive forever.
        self._model = weakref.ref(model)
        self.loss_fn, self.optimizer, self.key = loss_fn, optimizer, key
        self.device = torch.device(device) if device is not None else \
            next((p.device for p in model.parameters()), torch.device("cpu"))
        self.warmup_left = _WARMUP_STEPS_DDP if _is_ddp(model) else _WARMUP_STEPS
        self.graph = None
        self.static_inputs = self.static_target = None
        self.loss_sum = None      # device scalar: sum of the replayed steps' losses
        self.warm_state = None    # state() after the last warm-up step
        self.captured_state = None
        self.keepalive = ()       # what the graph points into, held while it exists
        self.side_stream = stream  # warm-up and capture stream (None: made on first use)

    def stream(self):
        """The stream warm-ups and the capture run on: one stream for both, on self.device."""
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(device=self.device)
        return self.side_stream

    # -- what the graph depends on ------------------------------------------------------------
    def _referenced(self) -> list:
        """The optimizer's and the model's parameters, each followed by its gradient (None if
        unset) and the optimizer's state tensors for it."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        model = self._model()
        if model is not None:
            params += list(model.parameters())
        out = []
        for p in params:
            out += [p, p.grad]
            out += [v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return out

    def _lr_reads(self) -> list:
        """Per group: None, or the device lr tensors its update reads (fastmlp.SGD.lr_tensors)."""
        lr_tensors = getattr(self.optimizer, "lr_tensors", None)
        if lr_tensors is None:
            return [None] * len(self.optimizer.param_groups)
        return [lr_tensors(gi) for gi in range(len(self.optimizer.param_groups))]

    def state(self) -> GraphState:
        addresses = tuple(0 if t is None else t.data_ptr() for t in self._referenced())
        lr_reads = tuple(None if read is None else tuple(0 if t is None else t.data_ptr() for t in read)
                         for read in self._lr_reads())
        return GraphState(_hparams(self.optimizer), addresses, lr_reads)

    def _held_by_graph(self) -> tuple:
        """The tensors a captured graph points into (referenced tensors, device lr tensors,
        tensor hyperparameters) and fastmlp.SGD's pointer tables."""
        held = [t for t in self._referenced() if t is not None]
        held += [t for read in self._lr_reads() if read for t in read if t is not None]
        held += [v for g in self.optimizer.param_groups for k, v in g.items()
                 if k != "params" and isinstance(v, torch.Tensor)]
        launcher = getattr(self.optimizer, "_launcher", None)
        plans = tuple(launcher._plans.values()) if launcher is not None else ()
        return tuple(held) + plans

    def _sync_lr(self) -> None:
        """fastmlp.SGD: write the current lrs into the device tensors its kernel (and so a graph
        replay) reads."""
        if hasattr(self.optimizer, "sync_lr"):
            self.optimizer.sync_lr()

    @staticmethod
    def compatible(before: GraphState, now: GraphState) -> bool:
        """True if a step captured (or warmed up) in state `before` is right in state `now`: the
        same, or the same addresses with only lrs changed, each in a group whose update reads
        its lr from a device tensor (synced before `now` was taken)."""
        if before == now:
            return True
        if before.addresses != now.addresses or before.lr_reads != now.lr_reads or \
                len(before.hparams) != len(now.hparams):
            return False
        for gb, ga, reads in zip(before.hparams, now.hparams, now.lr_reads):
            db, da = dict(gb), dict(ga)
            if db.keys() != da.keys() or any(db[k] != da[k] for k in db if k != "lr"):
                return False
            if db.get("lr") != da.get("lr") and reads is None:
                return False   # torch's update: the old lr is a number inside the graph
        return True

    def _drop(self) -> None:
        """Forget the graph and everything recorded for it; warm up again before a capture."""
        self.graph = None
        self.captured_state = None
        self.keepalive = ()
        self.warmup_left = max(self.warmup_left, self.REWARM_STEPS)

    def revalidate(self) -> None:
        """Keep the captured graph only if nothing it baked in has changed (see the class)."""
        if self.graph is None:
            return
        self._sync_lr()
        now = self.state()
        if self.compatible(self.captured_state, now):
            self.captured_state = now
            return
        self._drop()

    def rewarm_if_changed(self) -> None:
        """Right before a capture: warm up again if something changed since the warm-up (an
        epoch boundary may lie between them, and a callback may have run there)."""
        self._sync_lr()
        if self.warm_state is None or not self.compatible(self.warm_state, self.state()):
            self.warmup_left = max(self.warmup_left, self.REWARM_STEPS)

    # -- running it ---------------------------------------------------------------------------
    def warmup_step(self, inputs, target, fallback):
        """An ordinary training step on the capture stream (real data, really trained)."""
        stream = self.stream()
        current = torch.cuda.current_stream(self.device)
        if stream != current:
            stream.wait_stream(current)
        with torch.cuda.stream(stream):
            loss = fallback.step(inputs, target)
        if stream != current:
            current.wait_stream(stream)
        self.warmup_left -= 1
        self.warm_state = self.state()
        return loss

    def capture(self, inputs, target):
        """Record one step (it does not run: replay() runs it, on this batch too).

        Recorded into a local graph, published with its state and keepalive only if the
        capture completes: an exception inside (out of memory, a host sync, a table or lr the
        optimizer would build inside the capture) leaves a half-recorded graph that must never
        be replayed. Then the graph is dropped, warm-up re-armed and the exception re-raised.
        """
        model, loss_fn, optimizer = self._model(), self.loss_fn, self.optimizer
        self.static_inputs = [t.clone() for t in inputs]
        self.static_target = target.clone()
        if self.loss_sum is None:
            self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        if _is_ddp(model) and hasattr(model, "_set_ddp_runtime_logging_sample_rate"):
            model._set_ddp_runtime_logging_sample_rate(_DDP_LOGGING_SAMPLE_RATE)
        torch.cuda.synchronize(self.device)
        caller_stream = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream(), capture_error_mode="thread_local"):
                optimizer.zero_grad(set_to_none=False)   # in place: the grads keep their addresses
                loss = loss_fn(model(*self.static_inputs), self.static_target)
                loss.backward()
                optimizer.step()
                self.loss_sum.add_(loss.detach().float())
        except BaseException:
            self._drop()
            # torch.cuda.graph.__exit__ calls capture_end() before restoring the caller's
            # stream, and capture_end raises after a failed capture: the capture stream would
            # stay current for everything the caller runs next.
            if torch.cuda.current_stream(self.device) != caller_stream:
                torch.cuda.set_stream(caller_stream)
            raise
        self.graph = graph
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


def cached(model: nn.Module) -> Optional[CapturedStep]:
    """The CapturedStep fit keeps for `model`, if any."""
    return _cache.get(model)


# --------------------------------------------------------------------------------------------
# The step strategy
# --------------------------------------------------------------------------------------------
def _shape_key(inputs, target) -> tuple:
    """What a captured step is specific to: each tensor's shape, dtype and device (the device
    too: the step's stream, loss sum and graph live on one GPU)."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in (*inputs, target))


class GraphStep:
    """The epoch's batches of its first batch's shape through a CapturedStep, the others
    through the fallback (see the module docstring). `stream`: see :func:`capture_stream`."""

    def __init__(self, model, loss_fn, optimizer, fallback, stream=None):
        self.model, self.loss_fn, self.optimizer, self.fallback = model, loss_fn, optimizer, fallback
        self.stream = stream
        captured = _cache.get(model)
        if captured is not None and (captured.optimizer is not optimizer
                                     or captured.loss_fn is not loss_fn):
            captured = None
        if captured is not None and stream is not None and stream.device == captured.device:
            captured.side_stream = stream   # later warm-ups and captures: this fit's stream
        self.captured = captured
        self.full_shape = None   # the epoch's first batch sets the static shape

    def start_epoch(self) -> None:
        self.full_shape = None
        if self.captured is not None:
            self.captured.revalidate()   # callbacks or the caller may have changed its inputs

    def step(self, inputs, target) -> Optional[torch.Tensor]:
        key = _shape_key(inputs, target)
        if self.full_shape is None:
            self.full_shape = key
        if key != self.full_shape:
            return self.fallback.step(inputs, target)
        captured = self.captured
        if captured is None or captured.key != key:
            captured = self.captured = CapturedStep(self.model, self.loss_fn, self.optimizer, key,
                                                    device=target.device, stream=self.stream)
            _cache[self.model] = captured
        if captured.graph is None and captured.warmup_left == 0:
            captured.rewarm_if_changed()
        if captured.warmup_left > 0:
            return captured.warmup_step(inputs, target, self.fallback)
        if captured.graph is None:
            captured.capture(inputs, target)
        captured.replay(inputs, target)
        return None

    def take_loss_sum(self) -> Optional[torch.Tensor]:
        return None if self.captured is None else self.captured.take_loss_sum()
