"""Multi-tensor SGD: one Triton launch updates every parameter of one dtype.

torch.optim.SGD's update, per parameter p with gradient g (all in fp32 registers here):

    g = -g                        if maximize
    g = g + weight_decay * p      if weight_decay != 0
    b = g                         if momentum != 0 and this is p's first step (no buffer yet)
    b = momentum * b + (1 - dampening) * g       if momentum != 0 otherwise
    g = g + momentum * b  (nesterov)  or  g = b  if momentum != 0
    p = p - lr * g

Why one launch. An MLP step on the seed's shapes is microseconds of math; a launch per tensor (or
the five foreach launches of torch's multi-tensor path) is most of the optimizer's time. Here every
program looks up which tensor and which block of it to update in a small int64 table on the
device, then streams that block once: p, g and b are each read once and p and b written once.

Why a table of raw pointers and not flattened buffers. The parameters belong to the user's model
and their gradients are allocated by autograd; copying them into one flat buffer and back would
cost more than the update. A pointer table leaves every tensor where it is. It is built on the
host and copied to the device once, then reused for as long as the same tensors (same addresses)
come back, which is every step of a training loop that keeps its gradients (and always inside a
CUDA graph, whose replays reuse the addresses captured). The table is keyed on the addresses, so a
new tensor (e.g. a gradient re-allocated after ``zero_grad(set_to_none=True)``) gets a new table:
correct, at the price of one small host-to-device copy.

Why one table per slot and not a shared LRU. The caller names each launch's slot (fastmlp.SGD:
param group index, device, dtype) and the launcher keeps that slot's current table, replaced
only when the slot's tensors change. A shared LRU of a fixed size evicted another slot's table
whenever a model had more slots than the LRU (9 single-parameter groups against 8 entries:
every step rebuilt every table, a pinned allocation and a host-to-device copy each, and a
CUDA-graph capture, which must not build one, failed).

Why lr is read from device memory. A CUDA graph freezes its kernel arguments; a learning rate
passed by value would be frozen with them. Loaded from a one-element tensor, it can change between
replays (LR schedulers) by writing that tensor.

Precision: each element is updated in fp32 and rounded once to the parameter's dtype (fp32, fp16
or bf16), for the parameter and for the momentum buffer, like torch's fused SGD kernel (torch's
foreach path rounds after every op; for fp32 the two agree to an ulp or so).

Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (the tests do that).
"""

import torch
import triton
import triton.language as tl

from . import debug
from .launch import device_guard, round_to

BLOCK = 2048  # elements per program: 8 fp32 per thread with 4 warps, two 16-byte vectors each
_TENSOR_COLS = 5  # param ptr, grad ptr, buffer ptr (0: none), numel, first-step flag

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, first, offs, mask, lr,
               weight_decay, momentum, one_minus_dampening,
               DTYPE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    """Update one block of p (and of its momentum buffer); mask is None for a full block."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        # On a first step the buffer is fresh memory: never read it, it becomes a copy of g.
        # (A branch on the scalar, not a scalar folded into the load mask: newer interpreters
        # reject a mask mixing a tensor with a loaded scalar.)
        if first != 0:
            b = g
        else:
            b_old = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
            b = b_old * momentum + one_minus_dampening * g
        b = round_to(b, DTYPE)
        tl.store(b_ptr + offs, b, mask=mask)
        b = b.to(tl.float32)  # the update uses the buffer as stored, as torch does
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    tl.store(p_ptr + offs, round_to(p, DTYPE), mask=mask)


@triton.jit
def _sgd_kernel(tensor_table, block_table, lr_ptr,
                weight_decay, momentum, one_minus_dampening,
                DTYPE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # Which tensor this program updates, and where its block starts inside that tensor.
    tensor_id = tl.load(block_table + 2 * pid)
    start = tl.multiple_of(tl.load(block_table + 2 * pid + 1), BLOCK)  # the host makes it so
    row = tensor_table + tensor_id * 5
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))  # unused without momentum
    numel = tl.load(row + 3)
    first = tl.load(row + 4)
    if ALIGNED:  # every tensor starts 16-byte aligned (checked on the host)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
    lr = tl.load(lr_ptr).to(tl.float32)
    offs = start + tl.arange(0, BLOCK)
    # Full blocks go without a mask: `offs < numel` with numel read from memory would tell the
    # compiler nothing about where the mask changes, and it would fall back to one scalar load
    # per element instead of 16-byte vectors. Only a tensor's last block needs the mask.
    if start + BLOCK <= numel:
        _sgd_block(p_ptr, g_ptr, b_ptr, first, offs, None, lr,
                   weight_decay, momentum, one_minus_dampening,
                   DTYPE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE)
    else:
        _sgd_block(p_ptr, g_ptr, b_ptr, first, offs, offs < numel, lr,
                   weight_decay, momentum, one_minus_dampening,
                   DTYPE, HAS_WEIGHT_DECAY, HAS_MOMENTUM, NESTEROV, MAXIMIZE)


class _Plan:
    """The device tables for one list of tensors (kept alive while a CUDA graph may use them).

    key: the addresses, sizes and first-step flags the tables were built from."""

    def __init__(self, key, table: torch.Tensor, n_tensors: int, n_blocks: int, aligned: bool):
        self.key = key
        self.table = table
        self.tensor_table = table[: n_tensors * _TENSOR_COLS]
        self.block_table = table[n_tensors * _TENSOR_COLS:]
        self.n_blocks = n_blocks
        self.aligned = aligned


class MultiTensorSGD:
    """Launcher keeping one pointer table per slot, one instance per optimizer.

    ``step(params, grads, bufs, lr, ..., slot=...)``: params, grads of one dtype and device; bufs
    a list of momentum buffers (a None entry is allocated here and filled with g by the kernel,
    torch's first-step rule), or None when momentum is 0. Returns the list of buffers. ``slot``
    names the caller's launch (fastmlp.SGD: (group index, device, dtype)); its table is rebuilt
    only when that slot's tensors change (see the module docstring). ``_plans``: slot -> _Plan,
    the tables a captured graph may point into.
    """

    def __init__(self):
        self._plans = {}

    def _plan(self, slot, key, params, grads, bufs, first, device):
        plan = self._plans.get(slot)
        if plan is not None and plan.key == key:
            return plan
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "fastmlp.SGD: the parameters, gradients or momentum buffers have new addresses "
                "inside CUDA graph capture; run one step before capturing and keep the gradients "
                "between steps (zero_grad(set_to_none=False)) so the pointer table is built "
                "outside the graph (fastmlp.fit does this)")
        rows, blocks = [], []
        aligned = True
        for i, (p, g) in enumerate(zip(params, grads)):
            b = bufs[i] if bufs is not None else None
            ptrs = (p.data_ptr(), g.data_ptr(), b.data_ptr() if b is not None else 0)
            aligned = aligned and all(x % 16 == 0 for x in ptrs)
            n = p.numel()
            rows.extend((*ptrs, n, int(first[i]) if first is not None else 0))
            for start in range(0, n, BLOCK):
                blocks.extend((i, start))
        host = torch.tensor(rows + blocks, dtype=torch.int64)
        if device.type == "cuda":
            # From pinned memory the copy is asynchronous; from pageable memory CUDA would first
            # wait for the stream to drain (a host sync in the middle of the step).
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        plan = _Plan(key, table, len(params), len(blocks) // 2, aligned)
        self._plans[slot] = plan   # the slot's old table goes, unless a captured graph holds it
        return plan

    def step(self, params, grads, bufs, lr: torch.Tensor, *, weight_decay: float, momentum: float,
             dampening: float, nesterov: bool, maximize: bool, slot=None):
        if not params:
            return bufs
        dtype, device = params[0].dtype, params[0].device
        if dtype not in _TL_DTYPES:
            raise TypeError(f"fastmlp SGD kernel: unsupported dtype {dtype}")
        for p, g in zip(params, grads):
            if p.dtype != dtype or g.dtype != dtype or p.device != device or g.device != device:
                raise ValueError("fastmlp SGD kernel: one launch takes tensors of one dtype and device")
            if not (p.is_contiguous() and g.is_contiguous()) or p.shape != g.shape:
                raise ValueError("fastmlp SGD kernel: params and grads must be contiguous, same shape")
        has_momentum = momentum != 0
        first = None
        if has_momentum:
            first = [b is None for b in bufs]
            # torch's first step: the buffer becomes a copy of the (decayed) gradient. The kernel
            # writes it; the allocation is NaN-poisoned under debug.POISON_OUTPUTS to prove it.
            bufs = [debug.new_output(p.shape, dtype=dtype, device=device) if b is None else b
                    for p, b in zip(params, bufs)]
            for b, p in zip(bufs, params):
                if b.dtype != dtype or not b.is_contiguous() or b.shape != p.shape:
                    raise ValueError("fastmlp SGD kernel: momentum buffers must be contiguous and "
                                     "match their parameter's shape and dtype")
        key = tuple((p.data_ptr(), g.data_ptr(), bufs[i].data_ptr() if has_momentum else 0,
                     p.numel(), first[i] if has_momentum else False)
                    for i, (p, g) in enumerate(zip(params, grads)))
        if slot is None:
            slot = (device, dtype)
        plan = self._plan(slot, key, params, grads, bufs, first, device)
        if lr.device != device:
            raise ValueError(f"fastmlp SGD kernel: lr tensor on {lr.device}, params on {device}")
        with device_guard(device):  # Triton launches on the current device
            _sgd_kernel[(plan.n_blocks,)](
                plan.tensor_table, plan.block_table, lr,
                float(weight_decay), float(momentum), float(1.0 - dampening),
                DTYPE=_TL_DTYPES[dtype], HAS_WEIGHT_DECAY=weight_decay != 0,
                HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                ALIGNED=plan.aligned, BLOCK=BLOCK, num_warps=4)
        return bufs
