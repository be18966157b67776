"""How fastmlp decides that a result is right: torch in float64 as the reference, a relative-norm
error, and a tolerance per dtype that is never tighter than torch's own error.

The project's tests and the GPU check use exactly these (a user can check a layer of their own
the same way, as with ``torch.testing``)::

    from fastmlp import testing

    y64, dx64, dw64, db64 = testing.reference(x, w, b, "gelu", grad_out)
    testing.assert_close(y, y64, x.dtype, "forward")

Why a relative norm error, ‖actual − expected‖ / ‖expected‖: fused kernels add the same products
in another order than cuBLAS or torch's CPU GEMM, so single elements near 0 may differ in relative
terms while the result as a whole is as accurate as torch's; the norm ratio compares the whole.
Why torch's own error enters the tolerance: in a 16-bit dtype torch itself is far from float64 on
small or ill-conditioned problems (bf16 tanh's dX through a Y rounded near |y| = 1), and fastmlp
has to be as good as torch there, not better than torch can be (:func:`tolerance`).

Imports only torch and fastmlp (no pytest): the GPU check and user code can use it as it is.
"""

import contextlib
import zlib
from typing import Iterator, List, NamedTuple, Optional

import torch

# Relative norm error allowed per dtype (float64 runs the same kernels exactly, up to summation
# order). fp32 here means IEEE fp32 products (torch's default "highest" matmul precision).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# fp32 through TF32 (torch.backends.cuda.matmul.allow_tf32, or a "high" matmul precision) keeps
# 10 mantissa bits: ~3e-4 relative norm error at the tests' sizes, well under this.
TF32_TOLERANCE = 2e-3
# How far past torch's own error in the same dtype a result may be (see tolerance()).
TORCH_ERROR_FACTOR = 4


def case_seed(*parts) -> int:
    """A seed that is the same in every process for the same case: a crc32 digest of the parts'
    repr (Python's hash() of a str is salted per process, so it would draw other inputs each run)."""
    return zlib.crc32(repr(parts).encode())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute norm when expected is all zeros).

    Fails on a NaN in `actual`: kernels' outputs are NaN-poisoned before launch in the tests, so
    a NaN there is an element a kernel never wrote (or a NaN it made where torch has none)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in the result (an unwritten, poisoned element?)"
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def tolerance(dtype, torch_error, tol=None):
    """max(the dtype's bar (or `tol`), TORCH_ERROR_FACTOR x torch's own relative error in that
    dtype on the same inputs): the fixed bar still holds wherever torch itself meets it."""
    bar = TOLERANCE[dtype] if tol is None else tol
    return max(bar, TORCH_ERROR_FACTOR * torch_error)


class Comparison(NamedTuple):
    """One assert_close: what was compared, in which dtype, the error and the tolerance."""

    what: str
    dtype: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error < self.tolerance


_RECORDERS: List[List[Comparison]] = []


@contextlib.contextmanager
def record_comparisons() -> Iterator[List[Comparison]]:
    """Collect every :func:`assert_close` made inside the block (failing ones included, before
    they raise), so that a report can say how close to its tolerance each result came (the GPU
    check's "worst error as a multiple of the tolerance"). Blocks may nest; each gets its own."""
    log: List[Comparison] = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def assert_close(actual, expected, dtype, what="", tol=None):
    """Relative norm error under the dtype's tolerance (or `tol`, e.g. TF32_TOLERANCE for fp32
    through TF32, or a :func:`tolerance` from torch's own error)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    err = rel_err(actual, expected)
    if _RECORDERS:
        entry = Comparison(str(what), str(dtype).replace("torch.", ""), err, float(tol))
        for log in _RECORDERS:
            log.append(entry)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e} for {dtype}"


def reference(x, weight, bias, activation, grad_out):
    """(y, dx, dw, db) of act(x Wᵀ + b) computed by torch in float64, on the CPU, from the same
    inputs (db None without a bias).

    activation: what fastmlp.functional.linear_act takes (None, a name, a torch module); the
    activation is torch's own op (fastmlp.activations' torch_forward), differentiated by autograd.
    """
    from fastmlp import activations

    name, alpha = activations.resolve(activation)
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weight.detach().double().cpu().requires_grad_()
    b64 = bias.detach().double().cpu().requires_grad_() if bias is not None else None
    y = torch.nn.functional.linear(x64, w64, b64)
    y = activations.get(name).torch_forward(y, alpha)
    y.backward(grad_out.detach().double().cpu())
    return y.detach(), x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def torch_in_dtype(x, weight, bias, activation, grad_out):
    """(y, dx, dw, db) of stock torch (F.linear, then the activation's torch op, autograd) in the
    inputs' own dtype and on their device: what torch's implementation reaches there."""
    from fastmlp import activations

    name, alpha = activations.resolve(activation)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = torch.nn.functional.linear(*leaves)
    y = activations.get(name).torch_forward(y, alpha)
    y.backward(grad_out.detach().to(y.dtype))
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def tolerances_against_torch(x, weight, bias, activation, grad_out, expected, dtype,
                             tol: Optional[float] = None):
    """Per result of `reference` (y, dx, dw, db): :func:`tolerance` from torch's own error in
    `dtype` on these inputs (None where `expected` holds None)."""
    own = torch_in_dtype(x, weight, bias, activation, grad_out)
    return [None if e is None else tolerance(dtype, rel_err(o, e), tol) for o, e in zip(own, expected)]


__all__ = ["TOLERANCE", "TF32_TOLERANCE", "TORCH_ERROR_FACTOR", "Comparison", "assert_close",
           "case_seed", "record_comparisons", "reference", "rel_err", "tolerance",
           "tolerances_against_torch", "torch_in_dtype"]
