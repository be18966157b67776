"""Float64 torch reference for the fused layer, and the error measure the tests use."""

import torch

# Relative norm error allowed per dtype (fp64 runs the same kernels exactly, up to summation order).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute norm when expected is all zeros)."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in the result (an unwritten, poisoned element?)"
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


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
