"""The whole narrow MLP on the Triton backend: the launchers of kernels/mlp_kernels.py.

``mlp_forward`` and ``mlp_backward`` (what fastmlp/mlp_ops.py's custom ops call) pack the middle
layers' weights into one zero-padded [L-1, H, H] buffer, launch the fused forward or dX-chain
kernel over row tiles, and the grouped weight-gradient kernel for the first, the middle and the
last layers. ``fused_candidates`` says whether a stack can run fully fused on a device, from the
tables and rules of kernels/configs.py and the device's compute capability and shared memory.
The math, the shapes and the rounding are described in kernels/mlp_kernels.py.

The kernels and the config tables are importable from here too (``mlp.mlp_fwd_kernel``,
``mlp.FUSED_CONFIGS``, ...): the launchers call the kernels through this module's names.
"""

import functools
from typing import List, Optional, Tuple

import torch

from fastmlp.kernels import configs, tuning
from fastmlp.kernels.activation_jit import forward_of, grad_of
from fastmlp.kernels.configs import (  # noqa: F401  (re-exported: the tables' public names)
    DW_CONFIGS, FUSED_CONFIGS, MATH_CONFIGS, FusedConfig, dtype_class, padded_width)
from fastmlp.kernels.debug import new_output
from fastmlp.kernels.launch import acc_torch_dtype, capability as _capability, cdiv
from fastmlp.kernels.launch import lane_offset_dtype, multiprocessors as _multiprocessors
from fastmlp.kernels.launch import offset_dtype as _offset_dtype, on_first_tensors_device
from fastmlp.kernels.launch import precision as _precision, shared_memory as _shared_memory
from fastmlp.kernels.mlp_kernels import mlp_bwd_kernel, mlp_fwd_kernel, mlp_grad_weight_kernel


# ----------------------------------------------------------------------------------------------
# Which configs a stack may launch with on a device
# ----------------------------------------------------------------------------------------------
def fused_candidates(dtype: torch.dtype, allow_tf32: Optional[bool], hidden: int,
                     device: torch.device, activation: str = "relu") -> Optional[List[FusedConfig]]:
    """The fused configs for a stack of hidden width `hidden` (max over layers) with hidden
    activation `activation` on `device`, or None when the stack cannot run fully fused there
    (configs.fused_configs: past the width limit, or a GPU the tables were not checked for).
    allow_tf32=None (not known yet): fp32 configs only where both fp32 modes have them."""
    interpreter = tuning.interpreter_enabled()
    if not interpreter and device.type != "cuda":
        return None
    return configs.fused_configs(dtype, allow_tf32, hidden, activation, _capability(device),
                                 _shared_memory(device), interpreter)


def _dw_candidates(dtype: torch.dtype, allow_tf32: bool, device: torch.device):
    return configs.fused_dw_configs(dtype, allow_tf32, _capability(device), _shared_memory(device),
                                    tuning.interpreter_enabled())


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def pack_middle(weights: List[torch.Tensor], biases: Optional[List[torch.Tensor]],
                width: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The middle layers' weights as one contiguous [L-1, width, width] buffer (biases
    [L-1, width]), zero-padded where a layer is narrower than `width` (the padded width H):
    one stack when all are full width."""
    middle = weights[1:-1]
    ref = weights[0]
    if not middle:
        return ref.new_zeros((0, width, width)), (ref.new_zeros((0, width)) if biases else None)
    if all(w.shape == (width, width) for w in middle):
        w_mid = torch.stack(middle)
        b_mid = torch.stack(biases[1:-1]) if biases else None
        return w_mid, b_mid
    w_mid = ref.new_zeros((len(middle), width, width))
    b_mid = ref.new_zeros((len(middle), width)) if biases else None
    for i, w in enumerate(middle):
        w_mid[i, :w.shape[0], :w.shape[1]] = w
        if biases:
            b_mid[i, :w.shape[0]] = biases[i + 1]
    return w_mid, b_mid


@functools.lru_cache(maxsize=64)
def _widths(widths: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The hidden widths as an int32 tensor on `device`, made once per model shape (a copy to the
    GPU per call would cost a launch, and cannot happen inside a CUDA-graph capture)."""
    return torch.tensor(widths, dtype=torch.int32, device=device)


def _key(name, x, precision, *dims):
    return (name, x.device, _capability(x.device), x.dtype, precision) + tuple(dims)


@on_first_tensors_device
def mlp_forward(x: torch.Tensor, weights: List[torch.Tensor], biases: Optional[List[torch.Tensor]],
                activation: str, alpha: float, out_activation: str, out_alpha: float,
                save: bool, save_preact: bool, save_out_preact: bool, allow_tf32: bool,
                config: Optional[FusedConfig] = None):
    """(Y [M, N_OUT], saved [L, M, H], Z_out [M, N_OUT]) of the stack, fully fused.

    x [M, K_IN]; weights in nn.Linear layout, at least two; biases one per weight, or None.
    `saved` holds each hidden layer's output (its pre-activation with `save_preact`) when `save`
    (else it is empty); Z_out is the output layer's pre-activation with `save_out_preact` (else
    empty). H = padded_width(max hidden width): saved's rows are whole tiles, each layer's
    units past its width hold act(0); the caller checked that fused_candidates() has configs.
    """
    M, K_IN = x.shape
    widths = [w.shape[0] for w in weights[:-1]]
    hidden = max(widths)
    num_mid = len(weights) - 2
    w_in, w_out = weights[0], weights[-1]
    N_OUT = w_out.shape[0]
    dtype, device = x.dtype, x.device
    H = padded_width(hidden)
    y = new_output((M, N_OUT), dtype=dtype, device=device)
    saved = new_output((len(widths), M, H) if save else (0,), dtype=dtype, device=device)
    z_out = new_output((M, N_OUT) if save_out_preact else (0,), dtype=dtype, device=device)
    if M == 0:
        return y, saved, z_out
    w_mid, b_mid = pack_middle(weights, biases, H)
    acc, precision, upcast = _precision(dtype, allow_tf32)
    has_bias = biases is not None
    b_in = biases[0].contiguous() if has_bias else w_in
    b_out = biases[-1].contiguous() if has_bias else w_in
    b_mid = b_mid if has_bias else w_mid

    def launch(cfg: FusedConfig):
        mlp_fwd_kernel[(cdiv(M, cfg.block_m),)](
            x, w_in, b_in, w_mid, b_mid, w_out, b_out, _widths(tuple(widths), device), y,
            saved if save else y,
            z_out if save_out_preact else y,
            M, K_IN, widths[0], widths[-1], N_OUT, num_mid, M * H,
            x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1),
            w_out.stride(0), w_out.stride(1), y.stride(0), y.stride(1),
            ACTIVATION=forward_of(activation), ALPHA=alpha,
            OUT_ACTIVATION=forward_of(out_activation), OUT_ALPHA=out_alpha,
            HAS_BIAS=has_bias, SAVE=save, SAVE_PREACT=save_preact, SAVE_OUT_PREACT=save_out_preact,
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast,
            OFFSET_DTYPE=_offset_dtype(x, w_in, w_out, y),
            H=H, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if config is None:
        key = _key("mlp-fwd", x, precision, tuning.bucket(M), K_IN, hidden, N_OUT, num_mid,
                   activation, alpha, out_activation, out_alpha, has_bias, save, save_preact,
                   save_out_preact)
        config = tuning.pick_config(
            key, fused_candidates(dtype, allow_tf32, hidden, device, activation), device, launch)
    launch(config)
    return y, saved, z_out


def _grad_weight(a: torch.Tensor, b: torch.Tensor, b_activation: str, b_alpha: float,
                 compute_dw: bool, compute_db: bool, allow_tf32: bool, split: Optional[int]):
    """(dW [G, N, K], db [G, N]) = (A[g]ᵀ B[g], Σ_rows A[g]) for A [G, M, N], B [G, M, K] (views
    of any strides); B_ACTIVATION applied to B's tiles first. Deterministic for a given config."""
    G, M, N = a.shape
    K = b.shape[2]
    dtype, device = a.dtype, a.device
    kernel_dw = compute_dw and K > 0
    if M == 0 or N == 0 or not (kernel_dw or compute_db):
        return a.new_zeros((G, N, K)), a.new_zeros((G, N))
    acc, precision, upcast = _precision(dtype, allow_tf32)
    offset_dtype = lane_offset_dtype((*a.stride()[1:], *b.stride()[1:], K))  # K: dW's rows

    def run(cfg, chunks):
        tiles = cdiv(N, cfg.block_rows) * (cdiv(K, cfg.block_cols) if kernel_dw else 1)
        if chunks is None:
            # ~2 waves of programs, every chunk at least 4 row steps long
            wanted = max(1, (2 * _multiprocessors(device)) // (tiles * G))
            chunks = min(wanted, max(1, cdiv(M, 4 * cfg.block_red)))
        rows_per_split = cdiv(cdiv(M, chunks), cfg.block_red) * cfg.block_red
        chunks = cdiv(M, rows_per_split)
        out_dtype = dtype if chunks == 1 else acc_torch_dtype(acc)
        dw = new_output((chunks, G, N, K) if kernel_dw else (1,), dtype=out_dtype, device=device)
        db = new_output((chunks, G, N) if compute_db else (1,), dtype=out_dtype, device=device)
        mlp_grad_weight_kernel[(tiles, chunks, G)](
            a, b, dw, db, M, N, K, rows_per_split,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            G * N * K, N * K, G * N, N,
            B_ACTIVATION=forward_of(b_activation), B_ALPHA=b_alpha, COMPUTE_DW=kernel_dw, COMPUTE_DB=compute_db,
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_M=cfg.block_red,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        # chunks > 1: the fp32 partial sums added in a fixed order, rounded once
        dw = (dw[0] if chunks == 1 else dw.sum(0).to(dtype)) if kernel_dw else a.new_zeros((G, N, K))
        db = (db[0] if chunks == 1 else db.sum(0).to(dtype)) if compute_db else None
        return dw, db

    key = _key("mlp-dw", a, precision, tuning.bucket(M), tuning.bucket(N), tuning.bucket(K), G,
               b_activation, kernel_dw, compute_db)
    cfg = tuning.pick_config(key, _dw_candidates(dtype, allow_tf32, device), device,
                             lambda c: run(c, split))
    return run(cfg, split)


@on_first_tensors_device
def mlp_backward(grad: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
                 saved: torch.Tensor, s_out: Optional[torch.Tensor],
                 activation: str, alpha: float, out_activation: str, out_alpha: float,
                 saved_is_preact: bool, needs: Tuple[bool, ...], allow_tf32: bool,
                 config: Optional[FusedConfig] = None, split: Optional[int] = None):
    """Every gradient of the stack from G = dL/dY: (dX, dW_in, db_in, dW_mid, db_mid, dW_out,
    db_out), None where `needs` (the same seven flags) says no.

    saved and the activation flags are what mlp_forward was given; s_out is what the output
    activation's derivative reads (Y or Z_out; None for "none"). dW_mid [L-1, H, H] and
    db_mid [L-1, H] are padded like the packed weights: the caller slices each layer out.
    `split` fixes the number of row chunks of the weight gradients (tests).
    """
    needs_dx, needs_w_in, needs_b_in, needs_w_mid, needs_b_mid, needs_w_out, needs_b_out = needs
    M, N_OUT = grad.shape
    K_IN = x.shape[1]
    widths = [w.shape[0] for w in weights[:-1]]
    L, hidden = len(widths), max(widths)
    H = padded_width(hidden)
    num_mid = L - 1
    w_in, w_out = weights[0], weights[-1]
    dtype, device = grad.dtype, grad.device
    acc, precision, upcast = _precision(dtype, allow_tf32)
    if saved.shape != (L, M, H) or not saved.is_contiguous():
        raise ValueError(f"fastmlp mlp_backward: saved has shape {tuple(saved.shape)} and strides "
                         f"{saved.stride()}; expected a contiguous {(L, M, H)} (mlp_forward's)")

    has_out_act = out_activation != "none"
    if has_out_act:  # one offset tile serves G, S_out and dZ_out: all contiguous
        grad, s_out = grad.contiguous(), s_out.contiguous()
    dz = new_output((L, M, H), dtype=dtype, device=device)
    dz_out = new_output((M, N_OUT), dtype=dtype, device=device) if has_out_act else grad
    dx = new_output((M, K_IN), dtype=dtype, device=device) if needs_dx else None
    if M > 0:
        w_mid, _ = pack_middle(weights, None, H)

        def launch(cfg: FusedConfig):
            mlp_bwd_kernel[(cdiv(M, cfg.block_m),)](
                grad, s_out if has_out_act else grad, dz_out, saved, dz, w_in, w_mid, w_out,
                _widths(tuple(widths), device), dx if needs_dx else grad,
                M, K_IN, widths[0], widths[-1], N_OUT, num_mid, M * H,
                grad.stride(0), grad.stride(1), w_in.stride(0), w_in.stride(1),
                w_out.stride(0), w_out.stride(1),
                dx.stride(0) if needs_dx else 0, dx.stride(1) if needs_dx else 0,
                ACTIVATION_GRAD=grad_of(activation), ALPHA=alpha,
                OUT_ACTIVATION_GRAD=grad_of(out_activation), OUT_ALPHA=out_alpha,
                COMPUTE_DX=needs_dx,
                ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast,
                OFFSET_DTYPE=_offset_dtype(grad, w_in, w_out, *([dx] if needs_dx else [])),
                H=H, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
                BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        cfg = config
        if cfg is None:
            key = _key("mlp-bwd", grad, precision, tuning.bucket(M), K_IN, hidden, N_OUT, num_mid,
                       activation, alpha, out_activation, out_alpha, needs_dx)
            cfg = tuning.pick_config(
                key, fused_candidates(dtype, allow_tf32, hidden, device, activation), device, launch)
        launch(cfg)

    # Weight gradients: plain GEMMs of the masked gradients dZ with each layer's input.
    b_act = activation if saved_is_preact else "none"  # recompute Y_l = act(Z_l) from saved Z_l
    dw_in = db_in = dw_mid = db_mid = dw_out = db_out = None
    if needs_w_in or needs_b_in:
        dw, db = _grad_weight(dz[:1, :, :widths[0]], x.unsqueeze(0), "none", 0.0,
                              needs_w_in, needs_b_in, allow_tf32, split)
        dw_in, db_in = dw[0] if needs_w_in else None, db[0] if needs_b_in else None
    if num_mid and (needs_w_mid or needs_b_mid):
        dw_mid, db_mid = _grad_weight(dz[1:], saved[:-1], b_act, alpha, needs_w_mid, needs_b_mid,
                                      allow_tf32, split)
        dw_mid, db_mid = dw_mid if needs_w_mid else None, db_mid if needs_b_mid else None
    if needs_w_out or needs_b_out:
        dw, db = _grad_weight(dz_out.unsqueeze(0), saved[-1:, :, :widths[-1]], b_act, alpha,
                              needs_w_out, needs_b_out, allow_tf32, split)
        dw_out, db_out = dw[0] if needs_w_out else None, db[0] if needs_b_out else None
    return dx, dw_in, db_in, dw_mid, db_mid, dw_out, db_out


def __getattr__(name: str):
    """SELECT_ACTIVATIONS: the rows whose derivative is a select (a view of the table's
    derivative column, kernels/activations.py)."""
    if name == "SELECT_ACTIVATIONS":
        from fastmlp.kernels import activations

        return tuple(n for n in activations.names()
                     if activations.get(n).derivative == activations.SELECT)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
