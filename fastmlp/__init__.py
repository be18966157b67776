"""fastmlp: fused Triton Linear(+bias)+activation layers, forward and backward, for PyTorch MLPs.

Public API:
    fastmlp.ACTIVATIONS                        the activation names the kernels fuse
    fastmlp.functional.linear_act / linear_relu / linear
                                               fused ops with torch.nn.functional.linear's signature
    fastmlp.functional.gated_linear / gated_linear_packed
                                               act(x W_g^T + b_g) * (x W_u^T + b_u): SwiGLU, GeGLU, ...
    fastmlp.FusedLinear(..., activation=...) / FusedLinearReLU
                                               drop-in modules (state_dicts interchange with nn.Linear)
    fastmlp.GatedMLP(in, hidden, out, layout=...) / GatedMLP.from_module(block)
                                               a gated MLP block (SwiGLU, ...), state_dict as the model's
    fastmlp.fuse(module)                       fuse Linear -> activation pairs in an existing model
    fastmlp.FusedLinearFunction                the autograd.Function behind them
    fastmlp.GatedLinearFunction                the autograd.Function behind the gated op
    fastmlp.use_backend / get_backend          choose "auto", "triton" or "torch" (also FASTMLP_BACKEND)
"""

from fastmlp._kernels_path import ensure_kernels_importable as _ensure_kernels_importable

_ensure_kernels_importable(__path__)

from fastmlp import functional  # noqa: E402
from fastmlp.backend import get_backend, set_backend, use_backend  # noqa: E402
from fastmlp.data import TensorLoader  # noqa: E402
from fastmlp.nn import FusedLinear, FusedLinearReLU, GatedMLP  # noqa: E402
from fastmlp.fusion import fuse  # noqa: E402
from fastmlp.mlp import FusedMLP  # noqa: E402
from fastmlp.ops import ACTIVATIONS, FusedLinearFunction  # noqa: E402
from fastmlp.gated import GatedLinearFunction  # noqa: E402
from fastmlp.optim import SGD  # noqa: E402
from fastmlp.train import fit  # noqa: E402
from fastmlp.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fastmlp import sharding as _sharding  # noqa: E402

_sharding.install()   # DTensor sharding rules for the ops, once torch.distributed.tensor is imported

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "functional",
    "FusedLinear",
    "FusedLinearReLU",
    "FusedLinearFunction",
    "GatedLinearFunction",
    "GatedMLP",
    "fuse",
    "FusedMLP",
    "get_backend",
    "set_backend",
    "use_backend",
    "TensorLoader",
    "SGD",
    "fit",
    "save_checkpoint",
    "load_checkpoint",
]
