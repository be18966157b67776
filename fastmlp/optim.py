"""fastmlp.SGD: torch.optim.SGD's semantics and state_dict, with a one-launch update on CUDA.

It subclasses torch.optim.SGD, so the constructor, the checks, ``param_groups`` (with all of
torch's keys), ``state[p]["momentum_buffer"]``, ``state_dict``/``load_state_dict``, LR schedulers
and ``isinstance(opt, torch.optim.SGD)`` are torch's own: state dicts load both ways. Only
``step`` differs, in how the same update is computed:

* CUDA parameters (or CPU ones with fastmlp's backend forced to "triton", under Triton's
  interpreter): the multi-tensor Triton kernel of fastmlp.kernels.sgd, one launch per dtype for
  all parameters of a group. The learning rate is read from a device tensor (the group's own lr if
  it is a tensor on that device, else a cached one-element copy), so the step can be captured in a
  CUDA graph; call :meth:`SGD.sync_lr` before replaying after changing a float lr.
  :meth:`SGD.lr_tensors` says, per group, which tensors those are (None for a group torch's
  implementation updates: its lr is a number, frozen in a captured graph).
* Otherwise (CPU parameters; on CUDA float64 or non-contiguous parameters, sparse gradients,
  the "torch" backend; DTensor parameters, as FSDP2 and tensor parallel make them, on every
  device): torch's own implementations. torch picks the per-tensor loop on CPU by
  default; its fused kernel is one call for the whole group and measured faster or equal here
  (bench/NOTES.md), so a dense group of one dtype whose parameters all have momentum buffers, or
  none has (the fused kernel's first-step rule is all-or-nothing), calls ``torch._fused_sgd_``
  directly, without torch.optim.sgd.sgd's per-step grouping. Anything else goes through ``torch.optim.sgd.sgd``. A group's explicit
  ``foreach``/``fused``/``differentiable`` setting is obeyed and goes to torch unchanged, on
  every device.
"""

import torch
from torch.optim.sgd import sgd as _torch_sgd

from fastmlp import backend

__all__ = ["SGD"]


# torch's fused CPU SGD kernel: fp32 and fp64 only. For bf16/fp16 (torch 2.13, CPU) it updates
# only the elements past the last full vector and leaves the rest unchanged, so half-precision
# parameters take torch's foreach/for-loop update instead.
_FUSED_CPU_DTYPES = (torch.float32, torch.float64)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _subclassed(params) -> bool:
    """Whether a parameter is a tensor subclass: a DTensor (FSDP2's shards, tensor-parallel
    weights) has no storage of the whole tensor for the Triton kernel to update, and no
    sharding rule for torch._fused_sgd_; torch's foreach and per-tensor updates dispatch
    through it (shard by shard, redistributing a gradient of another placement)."""
    return any(type(p) not in _PLAIN for p in params)


def _fused_cpu_ok(params, grads, bufs, momentum) -> bool:
    if _subclassed(params):
        return False
    if any(g.is_sparse for g in grads):
        return False
    if not all(p.dtype == params[0].dtype and p.dtype in _FUSED_CPU_DTYPES for p in params):
        return False
    if momentum != 0:
        have = [b is not None for b in bufs]
        return all(have) or not any(have)
    return True


def _cpu_fused_step(group, params, grads, bufs) -> None:
    """torch's fused SGD kernel called directly: torch.optim.sgd._fused_sgd for the case
    _fused_cpu_ok admits (one device, one dtype, dense, no grad scaler), minus its per-step
    grouping by device and dtype, which costs more than the update on a small model."""
    momentum = group["momentum"]
    is_first_step = momentum != 0 and all(b is None for b in bufs)
    if is_first_step:
        for i, g in enumerate(grads):
            bufs[i] = torch.empty_like(g)
    torch._fused_sgd_(params, grads, [] if momentum == 0 else bufs,
                      weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
                      dampening=group["dampening"], nesterov=group["nesterov"],
                      maximize=group["maximize"], is_first_step=is_first_step)


class SGD(torch.optim.SGD):
    """Drop-in for torch.optim.SGD (same arguments, same trajectory, same state_dict)."""

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._init_runtime()

    def _init_runtime(self):
        self._launcher = None   # fastmlp.kernels.sgd.MultiTensorSGD, made on first Triton step
        self._lr_cache = {}     # (group index, device) -> (float lr, one-element fp32 tensor)

    def __setstate__(self, state):
        # Two callers. pickle/deepcopy: a new object with torch's state only
        # (Optimizer.__getstate__), so the caches are built here. Optimizer.load_state_dict: this
        # live optimizer, and its caches stay. A captured CUDA graph reads the lr tensors and
        # pointer tables in them; dropped, the graph would read freed memory and sync_lr would no
        # longer reach it. Both stay valid: entries are keyed by group index and addresses and
        # re-checked against the loaded values at every step and sync_lr.
        super().__setstate__(state)
        if "_lr_cache" not in self.__dict__:
            self._init_runtime()

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _uses_triton(group, params, grads) -> bool:
        """The Triton kernel takes dense, contiguous fp32/fp16/bf16 tensors, nothing exotic."""
        if group["foreach"] or group["fused"] or group["differentiable"]:
            return False  # the caller asked for one of torch's implementations: obey it
        if _subclassed(params) or any(g.is_sparse for g in grads):
            return False
        if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16)
               or not p.is_contiguous() for p in params):
            return False
        return backend.uses_triton(params[0].device, params[0].dtype)

    def lr_tensors(self, group_index: int):
        """The device tensors this group's next step reads its lr from; None if it takes a number.

        For whoever captures the step in a CUDA graph (fastmlp.fit). A group the Triton kernel
        updates loads its lr from device memory at every replay, so a new lr reaches the graph
        (sync_lr, or an lr tensor on the device written in place) and these tensors are what the
        graph points into. A group that torch's implementation updates (float64 or non-contiguous
        parameters, sparse gradients, foreach/fused/differentiable asked for, the "torch" backend,
        CPU parameters) takes its lr as a number, which a graph keeps as captured: None. Decided
        as :meth:`step` decides, from the parameters that have a gradient now, or from all of
        the group's if none has one yet (what a first step would see).

        One entry per device of those parameters, in order of first appearance: the group's lr
        itself if it is a tensor on that device, else the cached copy the kernel reads, or None
        if that copy does not exist yet (no kernel step since this optimizer was built): a graph
        cannot be reading it. () for a group without parameters.
        """
        group = self.param_groups[group_index]
        params = [p for p in group["params"] if p.grad is not None] or list(group["params"])
        if not params:
            return ()
        if not self._uses_triton(group, params, [p.grad for p in params if p.grad is not None]):
            return None
        lr = group["lr"]
        out = []
        for device in dict.fromkeys(p.device for p in params):
            if isinstance(lr, torch.Tensor) and lr.device == device:
                out.append(lr)
            else:
                entry = self._lr_cache.get((group_index, device))
                out.append(None if entry is None else entry[1])
        return tuple(out)

    def _lr_tensor(self, group_index, lr, device) -> torch.Tensor:
        """The group's lr as a one-element tensor on `device` that the kernel reads."""
        if isinstance(lr, torch.Tensor):
            if lr.device == device:
                return lr
            lr = lr.item()
        entry = self._lr_cache.get((group_index, device))
        if (entry is None or entry[0] != float(lr)) and device.type == "cuda" and \
                torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fastmlp.SGD: the learning rate changed (or was never used) right before a CUDA "
                "graph capture; run one step outside the capture first, or call sync_lr()")
        if entry is None:
            t = torch.tensor([float(lr)], dtype=torch.float32, device=device)
            self._lr_cache[(group_index, device)] = (float(lr), t)
            return t
        cached, t = entry
        if cached != float(lr):
            t.fill_(float(lr))
            self._lr_cache[(group_index, device)] = (float(lr), t)
        return t

    def sync_lr(self) -> None:
        """Write every group's current float lr into the device tensors the kernel reads.

        ``step`` does this itself; a CUDA graph replay runs no Python, so whoever replays a
        captured step (fastmlp.fit does) calls this first when an lr may have changed.
        """
        for (gi, device), (cached, t) in list(self._lr_cache.items()):
            lr = self.param_groups[gi]["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device == device:
                    continue   # the kernel reads this very tensor
                lr = lr.item()  # a tensor elsewhere (CPU): its value may have changed in place
            if float(lr) != cached:
                self._lr_tensor(gi, lr, device)

    # ---------------------------------------------------------------------------------------
    def _cpu_step_plan(self, params):
        """A function doing what ``self.step()`` would, minus its per-call machinery, or None.

        For fit's CPU fast path, which stores a fresh gradient in every one of `params` before
        each call. On the seed model ``Optimizer.step``'s machinery around the update costs
        several times the update itself (bench/NOTES.md): the profiler record, hook dispatch, and
        _init_group's per-parameter checks and state lookups. Those checks are made here once,
        and fit asks again at every epoch; between two of its steps nothing else runs, so what
        they checked still holds.

        None (use step()) for whatever step() would treat differently: a subclass, step
        hooks, a patched ``step`` other than an LR scheduler's call counter, AMP's grad
        scaling, foreach/fused/differentiable asked for, a tensor lr, non-CPU or mixed dtypes,
        momentum buffers on some parameters only, param_groups whose parameters are not
        exactly `params`, the Triton backend forced on.
        """
        from torch.optim import optimizer as torch_optimizer

        if type(self) is not SGD:
            return None
        patched = self.__dict__.get("step")
        if patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False):
            return None
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or \
                torch_optimizer._global_optimizer_pre_hooks or \
                torch_optimizer._global_optimizer_post_hooks:
            return None
        if getattr(self, "grad_scale", None) is not None or \
                getattr(self, "found_inf", None) is not None:
            return None
        grouped = [p for group in self.param_groups for p in group["params"]]
        if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
            return None
        plans = []
        for group in self.param_groups:
            ps = list(group["params"])
            if not ps:
                continue
            if group["foreach"] or group["fused"] or group["differentiable"] or \
                    isinstance(group["lr"], torch.Tensor):
                return None
            if any(p.device.type != "cpu" for p in ps) or \
                    backend.uses_triton(ps[0].device, ps[0].dtype):
                return None
            bufs = [self.state[p].get("momentum_buffer") if p in self.state else None
                    for p in ps]
            if not _fused_cpu_ok(ps, [], bufs, group["momentum"]):
                return None
            plans.append((group, ps, bufs))
        if patched is not None:
            self._opt_called = True   # what the scheduler's wrapper records; it is a flag

        def step():
            for group, ps, bufs in plans:
                first = group["momentum"] != 0 and bufs[0] is None
                _cpu_fused_step(group, ps, [p.grad for p in ps], bufs)
                if first:  # the buffers were just made: step() keeps them in the state
                    for p, b in zip(ps, bufs):
                        self.state[p]["momentum_buffer"] = b
        return step

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step over every parameter with a gradient (the closure as torch's)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for gi, group in enumerate(self.param_groups):
            params, grads, bufs = [], [], []
            has_sparse = self._init_group(group, params, grads, bufs)
            if not params:
                continue
            if group["differentiable"]:
                # torch's differentiable path needs grad mode as torch.optim.SGD.step sets it.
                with torch.set_grad_enabled(True):
                    self._torch_step(group, params, grads, bufs, has_sparse, None, None)
            elif self._uses_triton(group, params, grads):
                self._triton_step(gi, group, params, grads, bufs)
            else:
                choice = None
                if group["foreach"] is None and group["fused"] is None and not has_sparse:
                    if params[0].device.type == "cpu" and \
                            getattr(self, "grad_scale", None) is None and \
                            _fused_cpu_ok(params, grads, bufs, group["momentum"]):
                        choice = (False, True)
                if choice == (False, True) and not isinstance(group["lr"], torch.Tensor):
                    _cpu_fused_step(group, params, grads, bufs)
                else:
                    self._torch_step(group, params, grads, bufs, has_sparse, *(choice or (None, None)))
            if group["momentum"] != 0:
                for p, b in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = b
        return loss

    def _torch_step(self, group, params, grads, bufs, has_sparse, foreach, fused):
        _torch_sgd(
            params, grads, bufs,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            has_sparse_grad=has_sparse,
            foreach=group["foreach"] if foreach is None else foreach,
            fused=group["fused"] if fused is None else fused,
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))

    def _triton_step(self, gi, group, params, grads, bufs):
        if self._launcher is None:
            from fastmlp.kernels.sgd import MultiTensorSGD  # imports triton: only when it runs
            self._launcher = MultiTensorSGD()
        momentum = group["momentum"]
        # One launch per (device, dtype): a model of one dtype on one GPU is one launch.
        by_kind = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        for (device, dtype), idx in by_kind.items():
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            bs = [bufs[i] for i in idx] if momentum != 0 else None
            if not all(g.is_contiguous() for g in gs):
                gs = [g.contiguous() for g in gs]
            new_bufs = self._launcher.step(
                ps, gs, bs, self._lr_tensor(gi, group["lr"], device),
                weight_decay=group["weight_decay"], momentum=momentum,
                dampening=group["dampening"], nesterov=group["nesterov"],
                maximize=group["maximize"],
                # one pointer table kept per (group, device, dtype), rebuilt only when its
                # tensors change: any number of groups steps without rebuilding (and a CUDA
                # graph can be captured over them)
                slot=(gi, device, dtype))
            if momentum != 0:
                for i, b in zip(idx, new_bufs):
                    bufs[i] = b
