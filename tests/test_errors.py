"""Bad input raises a ValueError/TypeError that names the problem, before any kernel runs."""

import pytest
import torch

import fastmlp
from fastmlp import functional as F


@pytest.mark.parametrize("fn", [F.linear_relu, F.linear])
@pytest.mark.parametrize("args,error,words", [
    ((torch.randn(4, 5), torch.randn(3, 6), None), ValueError, ["last dimension is 5", "in_features=6"]),
    ((torch.randn(4, 5), torch.randn(3, 5, 1), None), ValueError, ["weight must be 2-D", "(3, 5, 1)"]),
    ((torch.randn(4, 5), torch.randn(3, 5), torch.randn(4)), ValueError, ["bias must have shape (3,)", "(4,)"]),
    ((torch.randn(4, 5), torch.randn(3, 5), torch.randn(3, 1)), ValueError, ["bias must have shape"]),
    ((torch.ones(4, 5, dtype=torch.int64), torch.randn(3, 5), None), TypeError, ["input has dtype torch.int64"]),
    ((torch.randn(4, 5), torch.randn(3, 5).half(), None), TypeError, ["torch.float32", "torch.float16"]),
    ((torch.randn(4, 5), torch.randn(3, 5), torch.randn(3).double()), TypeError, ["bias torch.float64"]),
    ((torch.randn(4, 5), torch.randn(3, 5, device="meta"), None), ValueError, ["different devices", "meta"]),
    ((torch.tensor(1.0), torch.randn(3, 5), None), ValueError, ["at least 1 dimension"]),
    (([[1.0] * 5], torch.randn(3, 5), None), TypeError, ["input must be a torch.Tensor"]),
])
def test_bad_input_is_named(fn, args, error, words):
    with pytest.raises(error) as info:
        fn(*args)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_input_on_the_triton_path(triton_backend):
    with pytest.raises(ValueError, match="in_features=6"):
        F.linear_relu(torch.randn(4, 5), torch.randn(3, 6))


def test_module_with_wrong_input_width():
    layer = fastmlp.FusedLinearReLU(10, 3)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(2, 9))


def test_unknown_activation_and_backend():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        fastmlp.FusedLinearFunction.apply(torch.randn(2, 3), torch.randn(4, 3), None, "swish")
    with pytest.raises(ValueError, match="unknown fastmlp backend 'cuda'"):
        fastmlp.set_backend("cuda")


@pytest.mark.parametrize("activation,error,words", [
    ("swish", ValueError, ["unknown activation 'swish'", "gelu_tanh"]),
    (torch.nn.ELU(), ValueError, ["ELU(alpha=1.0)", "is not one fastmlp fuses"]),
    (torch.nn.GELU, TypeError, ["activation must be None, a name", "got type"]),
    (3, TypeError, ["got int"]),
])
def test_bad_activation_is_named(activation, error, words):
    for make in (lambda: fastmlp.FusedLinear(3, 4, activation=activation),
                 lambda: F.linear_act(torch.randn(2, 3), torch.randn(4, 3), None, activation)):
        with pytest.raises(error) as info:
            make()
        for word in words:
            assert word in str(info.value), str(info.value)


def test_non_finite_activation_parameter_is_refused():
    with pytest.raises(ValueError, match="finite float"):
        fastmlp.FusedLinearFunction.apply(torch.randn(2, 3), torch.randn(4, 3), None,
                                          "leaky_relu", float("nan"))


def test_backend_switch_restores_previous():
    assert fastmlp.get_backend() == "auto"
    with fastmlp.use_backend("torch"):
        assert fastmlp.get_backend() == "torch"
        with fastmlp.use_backend("triton"):
            assert fastmlp.get_backend() == "triton"
        assert fastmlp.get_backend() == "torch"
    assert fastmlp.get_backend() == "auto"


@pytest.mark.parametrize("x_shape,w_shape,b_shape,words", [
    ((4, 5), (3, 5), (1, 1, 3), ["bias must have shape (3,), (1, 3), (1,) or ()", "(1, 1, 3)"]),
    ((4, 5), (3, 5), (3, 1), ["bias must have shape", "(3, 1)"]),
    ((4, 5), (), None, ["weight must be 2-D", "or 1-D", "()"]),
    ((4, 5), (5,), (3,), ["with a 1-D weight (5,)", "bias (3,)"]),
    ((4, 5), (5,), (1,), ["with a 1-D weight (5,)", "bias (1,)"]),
    ((4, 5), (5,), (), ["with a 1-D weight (5,)", "input (4, 5)"]),
])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_shapes_f_linear_refuses_are_refused(x_shape, w_shape, b_shape, words, backend_name):
    """Shapes torch.nn.functional.linear refuses are a ValueError naming them, on both backends
    (F.linear's refusal checked too, so this list stays what torch refuses)."""
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    b = torch.randn(b_shape) if b_shape is not None else None
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, w, b)
    with fastmlp.use_backend(backend_name):
        for fn in (F.linear, F.linear_relu, lambda *a: F.linear_act(*a, activation="tanh")):
            with pytest.raises(ValueError) as info:
                fn(x, w, b)
            for word in words:
                assert word in str(info.value), str(info.value)


def test_a_per_row_bias_is_refused_by_name():
    """F.linear's addmm adds a [M, N] 'bias' row by row for a 2-D input; that is not a bias
    the kernels add (one value per output feature), so it is refused rather than misread."""
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(4, 3)
    assert torch.nn.functional.linear(x, w, b).shape == (4, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\), \(1, 3\).*got \(4, 3\)"):
        F.linear_relu(x, w, b)
