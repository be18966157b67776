"""Float64 torch reference for the fused layer, the error measure the tests use, and stable seeds."""

import zlib

import torch


def case_seed(*parts) -> int:
    """A seed that is the same in every process for the same case: a crc32 digest of the parts'
    repr (Python's hash() of a str is salted per process, so it draws other inputs each run)."""
    return zlib.crc32(repr(parts).encode())

# Relative norm error allowed per dtype (fp64 runs the same kernels exactly, up to summation order).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def runs_kernels(device, dtype) -> bool:
    """Whether fastmlp's Triton kernels compute for tensors of `dtype` on `device` under the
    current backend (float64 on a GPU and the torch backend take torch's ops): what a test
    expects FusedMLP.path() to say."""
    import fastmlp.backend

    return fastmlp.backend.uses_triton(torch.device(device), dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute norm when expected is all zeros)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in the result (an unwritten, poisoned element?)"
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


# How far past torch's own error in the same dtype a result may be: torch itself, in a 16-bit
# dtype, is far from float64 on small or ill-conditioned problems (bf16 tanh's dX through a Y
# rounded near |y| = 1), and fastmlp must be as good as torch, not better than torch can be.
TORCH_ERROR_FACTOR = 4


def tolerance(dtype, torch_error, tol=None):
    """max(the dtype's bar (or `tol`), TORCH_ERROR_FACTOR x torch's own relative error in that
    dtype on the same inputs): the fixed bar still holds wherever torch itself meets it."""
    bar = TOLERANCE[dtype] if tol is None else tol
    return max(bar, TORCH_ERROR_FACTOR * torch_error)


def assert_close(actual, expected, dtype, what="", tol=None):
    """Relative norm error under the dtype's tolerance (or `tol`, e.g. for fp32 through TF32)."""
    tol = TOLERANCE[dtype] if tol is None else tol
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e} for {dtype}"


def reference(x, weight, bias, activation, grad_out):
    """(y, dx, dw, db) of act(x Wᵀ + b) computed by torch in float64 from the same inputs.

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


def tolerances_against_torch(x, weight, bias, activation, grad_out, expected, dtype, tol=None):
    """Per result of `reference` (y, dx, dw, db): :func:`tolerance` from torch's own error in
    `dtype` on these inputs (None where `expected` holds None)."""
    own = torch_in_dtype(x, weight, bias, activation, grad_out)
    return [None if e is None else tolerance(dtype, rel_err(o, e), tol) for o, e in zip(own, expected)]
