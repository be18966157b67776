"""The two numbers behind every workload: GEMM FLOPs and the minimum bytes that must move.

They turn a measured time into TFLOP/s and into a fraction of a floor time, so a result can be
judged against the hardware rather than only against another library. Counting rules (also in
bench/NOTES.md):

* FLOPs count the matrix products only (2·M·K·N per GEMM); bias, ReLU, loss and SGD are
  elementwise and add well under 1 % at every shape here.
* Minimum bytes count each tensor that must be read or written once, at the element size of the
  workload's dtype, assuming perfect fusion (the pre-activation never reaches memory, the ReLU
  mask is read back from Y). Real kernels may move more; none can move less.
* The floor is max(FLOPs / peak compute, bytes / peak bandwidth), with datasheet peaks until the
  run measures its own (the report quotes the measured matmul peak beside it).
"""

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

# H100 SXM5 datasheet figures (dense, no sparsity). Datasheet, not measured: the report's
# "% of peak" uses the matmul peak measured in the same run instead.
H100_SXM_DATASHEET = {
    "name": "NVIDIA H100 SXM5 (datasheet)",
    "tflops": {"fp32": 67.0, "tf32": 495.0, "fp16": 989.0, "bf16": 989.0},
    "hbm_tb_per_s": 3.35,
}

ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimum bytes of one timed call."""

    flops: int
    min_bytes: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.min_bytes + other.min_bytes)

    def __mul__(self, times: int) -> "Cost":
        return Cost(self.flops * times, self.min_bytes * times)


def layer_forward(m: int, k: int, n: int, e: int, bias: bool = True) -> Cost:
    """Y = act(X Wᵀ + b): read X [m,k], W [n,k], b [n]; write Y [m,n]."""
    return Cost(2 * m * k * n, e * (m * k + n * k + m * n + (n if bias else 0)))


def layer_backward(m: int, k: int, n: int, e: int, grad_input: bool, bias: bool = True) -> Cost:
    """dX = (G⊙mask) W (if wanted), dW = (G⊙mask)ᵀ X, db = Σ G⊙mask.

    Reads G and Y (the mask) once, W only for dX, X for dW; writes dX, dW and db.
    """
    flops = 2 * m * k * n * (2 if grad_input else 1)
    reads = 2 * m * n + m * k + (n * k if grad_input else 0)
    writes = n * k + (n if bias else 0) + (m * k if grad_input else 0)
    return Cost(flops, e * (reads + writes))


def sgd_update(params: int, e: int) -> Cost:
    """p -= lr·g for `params` elements: read p and g, write p (no FLOPs counted)."""
    return Cost(0, e * 3 * params)


def mlp_cost(batch: int, dims: Sequence[int], dtype: str, pass_: str, input_grad: bool) -> Cost:
    """Cost of one call of a chain of Linear layers dims[0] → dims[1] → … on `batch` rows.

    pass_ is "fwd", "fwd+bwd" or "step" (fwd+bwd plus an SGD update of every weight and bias).
    input_grad says whether the first layer's input needs a gradient (a hidden layer does, a
    model's data does not).
    """
    e = ELEMENT_BYTES[dtype]
    total = Cost(0, 0)
    params = 0
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        total = total + layer_forward(batch, k, n, e)
        if pass_ in ("fwd+bwd", "step"):
            total = total + layer_backward(batch, k, n, e, grad_input=input_grad or i > 0)
        params += n * k + n
    if pass_ == "step":
        total = total + sgd_update(params, e)
    return total


def fused_stack_cost(batch: int, dims: Sequence[int], dtype: str, pass_: str) -> Cost:
    """A whole MLP as one fused computation (fastmlp.FusedMLP's floor): the FLOPs of mlp_cost
    (the data needs no gradient), but the only bytes that must move are X in and Y out, each
    parameter read (and, with backward, its gradient written), and the output gradient G read:
    the hidden activations can stay on-chip or be recomputed. FusedMLP itself also writes one
    [batch, width] tensor per hidden layer forward and a dZ per layer backward (bench/NOTES.md)."""
    e = ELEMENT_BYTES[dtype]
    flops = mlp_cost(batch, dims, dtype, pass_, input_grad=False).flops
    params = sum(n * k + n for k, n in zip(dims[:-1], dims[1:]))
    elements = batch * dims[0] + batch * dims[-1] + params
    if pass_ in ("fwd+bwd", "step"):
        elements += batch * dims[-1] + params + (params if pass_ == "step" else 0)
    return Cost(flops, e * elements)


def gated_cost(tokens: int, dims: Tuple[int, ...], dtype: str, pass_: str) -> Cost:
    """FLOPs and minimum bytes of the gated op (dims = (K, H)) or of the gated MLP block
    (dims = (K, H, N): then the down projection H -> N), no biases, counted as costs.py counts a
    layer: every GEMM's FLOPs; each tensor an op reads or writes once, with perfect fusion inside
    each op, and what the op's design saves for backward (fastmlp/gated.py: G and U).

    Gated op forward: reads X [M, K], W_g and W_u [H, K], writes Y [M, H], and when training G
    and U [M, H]. Backward: reads dY, G, U, the weights (for dX) and X (for dW); writes dX, dW_g,
    dW_u. Down projection: a Linear without activation (forward reads Y and W_d, writes the
    output; backward reads its gradient, W_d and Y, writes dY and dW_d).
    """
    e = ELEMENT_BYTES[dtype]
    m, k, h = tokens, dims[0], dims[1]
    train = pass_ != "fwd"
    flops = 2 * m * k * 2 * h
    elements = m * k + 2 * h * k + m * h + (2 * m * h if train else 0)
    if train:
        flops += 2 * 2 * m * k * 2 * h
        elements += 3 * m * h + 2 * h * k + m * k + m * k + 2 * h * k
    if len(dims) == 3:
        n = dims[2]
        flops += 2 * m * h * n
        elements += m * h + n * h + m * n
        if train:
            flops += 2 * 2 * m * h * n
            elements += m * n + n * h + m * h + m * h + n * h
    return Cost(flops, e * elements)


def floor_seconds(cost: Cost, dtype: str, peaks: Dict = H100_SXM_DATASHEET) -> Tuple[float, str]:
    """The shortest time the cost allows at the given peaks, and which side binds."""
    compute = cost.flops / (peaks["tflops"][dtype] * 1e12)
    memory = cost.min_bytes / (peaks["hbm_tb_per_s"] * 1e12)
    return (compute, "compute") if compute >= memory else (memory, "memory")
