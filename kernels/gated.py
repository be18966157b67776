"""The gated Linear in Triton: forward, backward dX, backward dW_g + dW_u + db_g + db_u.

The math (X [M, K]; W_g, W_u [N, K] in nn.Linear layout, N the hidden width; b_g, b_u [N]):

    forward   G = X W_gᵀ + b_g,  U = X W_uᵀ + b_u,  Y = act(G) ⊙ U
              two fp32 accumulators over the same X tiles (X read once), biases, act and the
              product in the epilogue, one rounding of Y; G and U stored only when asked (SAVE)
    dX        dX = dG W_g + dU W_u, with dG = act'(G) applied to dY ⊙ U and dU = dY ⊙ act(G)
              formed from the dY, G, U tiles as they are loaded: two dots per step along N
    dW, db    dW_g = dGᵀ X, dW_u = dUᵀ X (the same X tile feeds both dots), db_g, db_u their
              column sums, in one kernel; deterministic (fixed order, no atomics), rows split
              into chunks whose fp32 partials linear_act's reduce_partials_kernel adds in a fixed
              order when the output has too few tiles to fill the GPU; for a packed [2N, K]
              weight its outputs are the two halves of one [2N, K] gradient (and [2N] bias
              gradient), written in place (gated_grad_weight_packed)

act' reads what the activation's row ``saves`` (kernels/activations.py): act(G), recomputed
from G in the kernel, for "output" rows, G itself for "preact" rows. The weights come with
their own strides and offsets: the two halves of one packed [2N, K] weight (``w[:N]``,
``w[N:]``) are read in place. Addresses are formed in int64 where a product of a row index and
a stride can pass 2**31 (as kernels/linear_act.py); tile-local offsets in OFFSET_DTYPE.

Each launcher takes ``torch_impl`` (fastmlp/gated.py's torch implementation, bound to the same
arguments): the autotuner's TORCH_GEMM candidate on GPUs.
"""

import triton
import triton.language as tl

from fastmlp.kernels import activations as _table
from fastmlp.kernels import configs, tuning
from fastmlp.kernels.activation_jit import activate, activation_grad, forward_of, grad_of, opmath
from fastmlp.kernels.debug import new_output
from fastmlp.kernels.launch import acc_torch_dtype, capability as _capability, cdiv, in_bounds, mma
from fastmlp.kernels.launch import offset_dtype as _offset_dtype, on_first_tensors_device
from fastmlp.kernels.launch import precision as _precision, round_to, tiles
from fastmlp.kernels.linear_act import (_REDUCE_BLOCK, _contiguous, _grouped_tile,
                                        _run_torch_impl, choose_split, reduce_partials_kernel)


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gate_grads(dy, g, u, ACTIVATION: tl.constexpr, ACTIVATION_GRAD: tl.constexpr,
                ALPHA: tl.constexpr, SAVES_OUTPUT: tl.constexpr):
    """(dG, dU) in opmath precision from loaded dY, G, U tiles: dU = dY ⊙ act(G) and
    dG = act'(·) of dY ⊙ U (the derivative reading act(G) or G, as its row saves). Masked lanes
    load 0 everywhere and give dG = dU = 0 (act(0) is finite, every derivative keeps 0 at 0)."""
    dyf = opmath(dy)
    gf = opmath(g)
    a = activate(gf, ACTIVATION, ALPHA)
    if SAVES_OUTPUT:
        saved = a
    else:
        saved = gf
    dg = activation_grad(dyf * opmath(u), saved, ACTIVATION_GRAD, ALPHA)
    return dg, dyf * a


# ----------------------------------------------------------------------------------------------
# Forward: Y = act(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])  # batch sizes vary: no recompiles
def gated_fwd_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, y_ptr, g_ptr, u_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk, stride_bg, stride_bu,
    stride_ym, stride_yn,
    HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    ALPHA: tl.constexpr, SAVE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """G and U (stored only if SAVE) have Y's strides: the launcher allocates the three alike."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tiles(M, BLOCK_M), tiles(N, BLOCK_N), GROUP)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    in_m = in_bounds(rm, m0, M, BLOCK_M)
    in_n = in_bounds(rn, n0, N, BLOCK_N)
    x_tile = rm[:, None] * stride_xm + rk[None, :] * stride_xk
    wg_tile = rk[:, None] * stride_wgk + rn[None, :] * stride_wgn  # W_gᵀ tile [BLOCK_K, BLOCK_N]
    wu_tile = rk[:, None] * stride_wuk + rn[None, :] * stride_wun
    x_base = x_ptr + m0 * stride_xm
    wg_base = wg_ptr + n0 * stride_wgn
    wu_base = wu_ptr + n0 * stride_wun

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        in_k = rk < K - k0
        x = tl.load(x_base + x_tile, mask=in_m[:, None] & in_k[None, :], other=0.0)
        w_mask = in_k[:, None] & in_n[None, :]
        wg = tl.load(wg_base + wg_tile, mask=w_mask, other=0.0)
        wu = tl.load(wu_base + wu_tile, mask=w_mask, other=0.0)
        acc_g = mma(x, wg, acc_g, DOT_PRECISION, UPCAST)
        acc_u = mma(x, wu, acc_u, DOT_PRECISION, UPCAST)
        x_base += tl.cast(stride_xk, tl.int64) * BLOCK_K
        wg_base += tl.cast(stride_wgk, tl.int64) * BLOCK_K
        wu_base += tl.cast(stride_wuk, tl.int64) * BLOCK_K

    if HAS_GATE_BIAS:
        bias_g = tl.load(bg_ptr + n0 * stride_bg + rn * stride_bg, mask=in_n, other=0.0)
        acc_g += bias_g.to(ACC_DTYPE)[None, :]
    if HAS_UP_BIAS:
        bias_u = tl.load(bu_ptr + n0 * stride_bu + rn * stride_bu, mask=in_n, other=0.0)
        acc_u += bias_u.to(ACC_DTYPE)[None, :]
    out_offsets = m0 * stride_ym + n0 * stride_yn + (rm[:, None] * stride_ym + rn[None, :] * stride_yn)
    out_mask = in_m[:, None] & in_n[None, :]
    if SAVE:
        tl.store(g_ptr + out_offsets, round_to(acc_g, g_ptr.dtype.element_ty), mask=out_mask)
        tl.store(u_ptr + out_offsets, round_to(acc_u, u_ptr.dtype.element_ty), mask=out_mask)
    y = activate(acc_g, ACTIVATION, ALPHA) * acc_u
    tl.store(y_ptr + out_offsets, round_to(y, y_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Backward dX = dG W_g + dU W_u
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])
def gated_grad_input_kernel(
    dy_ptr, g_ptr, u_ptr, wg_ptr, wu_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_wgn, stride_wgk, stride_wun, stride_wuk, stride_dxm, stride_dxk,
    ACTIVATION: tl.constexpr, ACTIVATION_GRAD: tl.constexpr, ALPHA: tl.constexpr,
    SAVES_OUTPUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """dY, G and U share one set of strides (the launcher makes it so): one offset tile."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tiles(M, BLOCK_M), tiles(K, BLOCK_K), GROUP)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    k0 = pid_k.to(tl.int64) * BLOCK_K
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    in_m = in_bounds(rm, m0, M, BLOCK_M)
    in_k = in_bounds(rk, k0, K, BLOCK_K)
    gs_tile = rm[:, None] * stride_gm + rn[None, :] * stride_gn
    wg_tile = rn[:, None] * stride_wgn + rk[None, :] * stride_wgk
    wu_tile = rn[:, None] * stride_wun + rk[None, :] * stride_wuk
    row_offset = m0 * stride_gm
    wg_base = wg_ptr + k0 * stride_wgk
    wu_base = wu_ptr + k0 * stride_wuk

    # One accumulator per dot: a dot whose result feeds another dot in the same step cannot be
    # left in flight (Hopper's pipelining keeps a wgmma async only if the loop's yield is its sole
    # user), so a single shared accumulator made every MMA synchronous.
    acc_g = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        in_n = rn < N - n0
        tile = in_m[:, None] & in_n[None, :]
        offsets = row_offset + gs_tile
        dy = tl.load(dy_ptr + offsets, mask=tile, other=0.0)
        g = tl.load(g_ptr + offsets, mask=tile, other=0.0)
        u = tl.load(u_ptr + offsets, mask=tile, other=0.0)
        dg, du = _gate_grads(dy, g, u, ACTIVATION, ACTIVATION_GRAD, ALPHA, SAVES_OUTPUT)
        w_mask = in_n[:, None] & in_k[None, :]
        wg = tl.load(wg_base + wg_tile, mask=w_mask, other=0.0)
        wu = tl.load(wu_base + wu_tile, mask=w_mask, other=0.0)
        acc_g = mma(round_to(dg, wg.dtype), wg, acc_g, DOT_PRECISION, UPCAST)
        acc_u = mma(round_to(du, wu.dtype), wu, acc_u, DOT_PRECISION, UPCAST)
        row_offset += tl.cast(stride_gn, tl.int64) * BLOCK_N
        wg_base += tl.cast(stride_wgn, tl.int64) * BLOCK_N
        wu_base += tl.cast(stride_wun, tl.int64) * BLOCK_N

    acc = acc_g + acc_u
    dx_ptrs = dx_ptr + m0 * stride_dxm + k0 * stride_dxk + (rm[:, None] * stride_dxm + rk[None, :] * stride_dxk)
    tl.store(dx_ptrs, round_to(acc, dx_ptr.dtype.element_ty), mask=in_m[:, None] & in_k[None, :])


# ----------------------------------------------------------------------------------------------
# Backward dW_g = dGᵀ X, dW_u = dUᵀ X, db_g, db_u: one kernel, rows optionally split in chunks
# ----------------------------------------------------------------------------------------------
@triton.jit
def gated_grad_weight_kernel(
    dy_ptr, g_ptr, u_ptr, x_ptr, dwg_ptr, dbg_ptr, dwu_ptr, dbu_ptr,
    M, N, K, rows_per_split,
    stride_gm, stride_gn, stride_xm, stride_xk,
    stride_dwg_split, stride_dwu_split, stride_dwn, stride_dwk, stride_dbg_split, stride_dbu_split,
    ACTIVATION: tl.constexpr, ACTIVATION_GRAD: tl.constexpr, ALPHA: tl.constexpr,
    SAVES_OUTPUT: tl.constexpr,
    COMPUTE_DWG: tl.constexpr, COMPUTE_DBG: tl.constexpr, COMPUTE_DWU: tl.constexpr,
    COMPUTE_DBU: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    """Program (tile, split) reduces rows [split * rows_per_split, ...) into its own output
    slices. Both dW outputs (or their partials) have strides (stride_dwn, stride_dwk) within a
    split."""
    if COMPUTE_DWG or COMPUTE_DWU:
        num_k_tiles = tiles(K, BLOCK_K)  # K >= 1 here: the launcher skips an empty dW
    else:
        num_k_tiles = 1  # biases alone: one column tile per row chunk
    pid_n, pid_k = _grouped_tile(tl.program_id(0), tiles(N, BLOCK_N), num_k_tiles, GROUP)
    split = tl.program_id(1).to(tl.int64)
    row_start = split * rows_per_split
    rows_here = tl.minimum(M - row_start, rows_per_split).to(tl.int32)
    n0 = pid_n.to(tl.int64) * BLOCK_N
    k0 = pid_k.to(tl.int64) * BLOCK_K
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    in_n = in_bounds(rn, n0, N, BLOCK_N)
    in_k = in_bounds(rk, k0, K, BLOCK_K)
    # dY, G, U read transposed, as [BLOCK_N, BLOCK_M] tiles: the left operands of dGᵀ X, dUᵀ X.
    gs_tile = rn[:, None] * stride_gn + rm[None, :] * stride_gm
    x_tile = rm[:, None] * stride_xm + rk[None, :] * stride_xk
    gs_offset = row_start * stride_gm + n0 * stride_gn
    x_base = x_ptr + row_start * stride_xm + k0 * stride_xk

    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    sum_g = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    sum_u = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(0, rows_here, BLOCK_M):
        in_m = rm < rows_here - m0
        tile = in_n[:, None] & in_m[None, :]
        dy = tl.load(dy_ptr + gs_offset + gs_tile, mask=tile, other=0.0)
        g = tl.load(g_ptr + gs_offset + gs_tile, mask=tile, other=0.0)
        u = tl.load(u_ptr + gs_offset + gs_tile, mask=tile, other=0.0)
        dg, du = _gate_grads(dy, g, u, ACTIVATION, ACTIVATION_GRAD, ALPHA, SAVES_OUTPUT)
        # What the dots take: rounded once to the input dtype, as the dX kernel's operands.
        dg = round_to(dg, dy.dtype)
        du = round_to(du, dy.dtype)
        if COMPUTE_DWG or COMPUTE_DWU:
            x = tl.load(x_base + x_tile, mask=in_m[:, None] & in_k[None, :], other=0.0)
            if COMPUTE_DWG:
                acc_g = mma(dg, x, acc_g, DOT_PRECISION, UPCAST)
            if COMPUTE_DWU:
                acc_u = mma(du, x, acc_u, DOT_PRECISION, UPCAST)
        if COMPUTE_DBG:
            sum_g += tl.sum(dg.to(ACC_DTYPE), axis=1)
        if COMPUTE_DBU:
            sum_u += tl.sum(du.to(ACC_DTYPE), axis=1)
        gs_offset += tl.cast(stride_gm, tl.int64) * BLOCK_M
        x_base += tl.cast(stride_xm, tl.int64) * BLOCK_M

    dw_offsets = n0 * stride_dwn + k0 * stride_dwk + (rn[:, None] * stride_dwn + rk[None, :] * stride_dwk)
    dw_mask = in_n[:, None] & in_k[None, :]
    if COMPUTE_DWG:
        tl.store(dwg_ptr + split * stride_dwg_split + dw_offsets,
                 round_to(acc_g, dwg_ptr.dtype.element_ty), mask=dw_mask)
    if COMPUTE_DWU:
        tl.store(dwu_ptr + split * stride_dwu_split + dw_offsets,
                 round_to(acc_u, dwu_ptr.dtype.element_ty), mask=dw_mask)
    # Every column tile summed the same rows; the first one stores the bias gradients.
    if pid_k == 0:
        if COMPUTE_DBG:
            tl.store(dbg_ptr + split * stride_dbg_split + n0 + rn,
                     round_to(sum_g, dbg_ptr.dtype.element_ty), mask=in_n)
        if COMPUTE_DBU:
            tl.store(dbu_ptr + split * stride_dbu_split + n0 + rn,
                     round_to(sum_u, dbu_ptr.dtype.element_ty), mask=in_n)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _configs_and_key(name, tensor, precision, dims, activation, flags, torch_impl):
    """The candidates for one launch (TORCH_GEMM only with a torch_impl) and the cache key."""
    capability = _capability(tensor.device)
    bucket = tuning.bucket
    key = ("gated-" + name, tensor.device, capability, tensor.dtype, precision, flags,
           torch_impl is not None, bucket(dims[0]), bucket(dims[1]), bucket(dims[2]))
    configs_ = configs.gated_candidates(tensor.dtype, precision, capability, name, activation,
                                        tuning.interpreter_enabled())
    if torch_impl is None:
        configs_ = [c for c in configs_ if c is not tuning.TORCH_GEMM] or [
            c for c in configs.gated_candidates(tensor.dtype, precision, capability, "fwd",
                                                "none", tuning.interpreter_enabled())
            if c is not tuning.TORCH_GEMM]
    return configs_, key


def _saves_output(activation: str, alpha: float) -> bool:
    return _table.get(activation).saves(alpha) == "output"


def _same_strides(grad, g, u):
    """The backward kernels address dY, G and U with one offset tile."""
    if grad.stride() == g.stride() == u.stride():
        return grad, g, u
    return grad.contiguous(), g.contiguous(), u.contiguous()


@on_first_tensors_device
def gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, activation: str, alpha: float,
                  save: bool, allow_tf32: bool, torch_impl=None):
    """(Y, G, U) for 2-D x [M, K]: Y = act(G) ⊙ U a new contiguous [M, N]; G and U (same dtype,
    contiguous) if save, else None. torch_impl() returns the same triple."""
    M, K = x.shape
    N = gate_weight.shape[0]
    dtype, device = x.dtype, x.device
    alpha = float(alpha)
    acc, precision, upcast = _precision(dtype, allow_tf32)
    bg = gate_bias if gate_bias is not None else gate_weight  # never read without HAS_*_BIAS
    bu = up_bias if up_bias is not None else gate_weight
    offset_dtype = _offset_dtype(x, gate_weight, up_weight,
                                 *[b for b in (gate_bias, up_bias) if b is not None],
                                 extra_strides=(N,))   # Y's (and G's, U's) row stride

    def launch(cfg):
        if cfg is tuning.TORCH_GEMM:
            y, g, u = _run_torch_impl(torch_impl, device)
            return _contiguous(y), _contiguous(g), _contiguous(u)
        y = new_output((M, N), dtype=dtype, device=device)
        g = new_output((M, N), dtype=dtype, device=device) if save else None
        u = new_output((M, N), dtype=dtype, device=device) if save else None
        grid = (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols),)
        gated_fwd_kernel[grid](
            x, gate_weight, up_weight, bg, bu, y, g if save else y, u if save else y, M, N, K,
            x.stride(0), x.stride(1), gate_weight.stride(0), gate_weight.stride(1),
            up_weight.stride(0), up_weight.stride(1), bg.stride(0), bu.stride(0),
            y.stride(0), y.stride(1),
            HAS_GATE_BIAS=gate_bias is not None, HAS_UP_BIAS=up_bias is not None,
            ACTIVATION=forward_of(activation), ALPHA=alpha, SAVE=save,
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red, GROUP=cfg.group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y, g, u

    if M == 0 or N == 0:
        outputs = [new_output((M, N), dtype=dtype, device=device) for _ in range(3 if save else 1)]
        return (outputs[0], outputs[1], outputs[2]) if save else (outputs[0], None, None)
    configs_, key = _configs_and_key(
        "fwd", x, precision, (M, N, K), activation,
        (gate_bias is not None, up_bias is not None, activation, alpha, save), torch_impl)
    return launch(tuning.pick_config(key, configs_, device, launch))


@on_first_tensors_device
def gated_grad_input(grad, g, u, gate_weight, up_weight, activation: str, alpha: float,
                     allow_tf32: bool, torch_impl=None):
    """dX = dG W_g + dU W_u, a new contiguous [M, K]."""
    M, N = grad.shape
    K = gate_weight.shape[1]
    dtype, device = grad.dtype, grad.device
    alpha = float(alpha)
    if M == 0 or K == 0:
        return new_output((M, K), dtype=dtype, device=device)
    acc, precision, upcast = _precision(dtype, allow_tf32)
    grad, g, u = _same_strides(grad, g, u)
    offset_dtype = _offset_dtype(grad, gate_weight, up_weight, extra_strides=(K,))   # dX's rows

    def launch(cfg):
        if cfg is tuning.TORCH_GEMM:
            return _contiguous(_run_torch_impl(torch_impl, device))
        dx = new_output((M, K), dtype=dtype, device=device)
        grid = (cdiv(M, cfg.block_rows) * cdiv(K, cfg.block_cols),)
        gated_grad_input_kernel[grid](
            grad, g, u, gate_weight, up_weight, dx, M, N, K,
            grad.stride(0), grad.stride(1), gate_weight.stride(0), gate_weight.stride(1),
            up_weight.stride(0), up_weight.stride(1), dx.stride(0), dx.stride(1),
            ACTIVATION=forward_of(activation), ACTIVATION_GRAD=grad_of(activation), ALPHA=alpha,
            SAVES_OUTPUT=_saves_output(activation, alpha),
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_N=cfg.block_red, GROUP=cfg.group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dx

    configs_, key = _configs_and_key("dx", grad, precision, (M, N, K), activation,
                                     (activation, alpha), torch_impl)
    return launch(tuning.pick_config(key, configs_, device, launch))


@on_first_tensors_device
def gated_grad_weight(grad, g, u, x, activation: str, alpha: float, gate_weight: bool,
                      gate_bias: bool, up_weight: bool, up_bias: bool, allow_tf32: bool,
                      split: int = None, torch_impl=None):
    """(dW_g, db_g, dW_u, db_u), each None unless its flag asks for it; deterministic.

    `split` fixes the number of row chunks (tests); by default it is chosen from the GPU size.
    """
    N, K = grad.shape[1], x.shape[1]
    dtype, device = grad.dtype, grad.device
    flags = (gate_weight, gate_bias, up_weight, up_bias)

    def allocate():
        shapes = ((N, K), (N,), (N, K), (N,))
        outputs = tuple(new_output(s, dtype=dtype, device=device) if f else None
                        for s, f in zip(shapes, flags))
        return outputs, outputs

    return _grad_weight(grad, g, u, x, activation, alpha, flags, allow_tf32, split, torch_impl,
                        allocate)


@on_first_tensors_device
def gated_grad_weight_packed(grad, g, u, x, activation: str, alpha: float, gate_first: bool,
                             weight: bool, bias: bool, allow_tf32: bool, split: int = None,
                             torch_impl=None):
    """(dW [2N, K], db [2N]) of a packed weight and bias, each None unless asked for.

    The same grouped launch as gated_grad_weight, with its outputs the two halves of one packed
    gradient (dW_g into the gate's rows, dW_u into the up rows, gate_first saying which half is
    which; db_g, db_u likewise): the gradient autograd gets for the packed Parameter is this one
    tensor, with no per-half buffer to zero-fill and add. torch_impl() returns the same pair.
    """
    N, K = grad.shape[1], x.shape[1]
    dtype, device = grad.dtype, grad.device

    def halves(t):
        if t is None:
            return None, None
        return (t[:N], t[N:]) if gate_first else (t[N:], t[:N])

    def allocate():
        dw = new_output((2 * N, K), dtype=dtype, device=device) if weight else None
        db = new_output((2 * N,), dtype=dtype, device=device) if bias else None
        (dwg, dwu), (dbg, dbu) = halves(dw), halves(db)
        return (dwg, dbg, dwu, dbu), (dw, db)

    return _grad_weight(grad, g, u, x, activation, alpha, (weight, bias, weight, bias),
                        allow_tf32, split, torch_impl, allocate)


def _grad_weight(grad, g, u, x, activation, alpha, flags, allow_tf32, split, torch_impl,
                 allocate):
    """The grouped dW/db launch. allocate() gives (targets, result): targets the four outputs
    (dW_g, db_g, dW_u, db_u: contiguous [N, K] / [N] tensors, or None where not asked for) the
    kernel, or the reduction of its row chunks, writes every element of; result what the
    launcher returns once they are written. An empty target (K = 0) is complete as it is."""
    M, N = grad.shape
    K = x.shape[1]
    dtype, device = grad.dtype, grad.device
    alpha = float(alpha)
    gate_weight, gate_bias, up_weight, up_bias = flags
    if not any(flags):
        return allocate()[1]
    acc, precision, upcast = _precision(dtype, allow_tf32)
    grad, g, u = _same_strides(grad, g, u)
    offset_dtype = _offset_dtype(grad, x, extra_strides=(K,))  # K: row stride of dW
    kernel_dwg, kernel_dwu = gate_weight and K > 0, up_weight and K > 0

    def _side(chunks, kernel_dw, compute_db, dw_out, db_out):
        """(dW target [split, N, K], db target [split, N], part buffer or None) of one side."""
        if chunks == 1:
            dw = dw_out if kernel_dw else new_output((1, 1), dtype=dtype, device=device)
            db = db_out if compute_db else new_output((1,), dtype=dtype, device=device)
            return dw[None], db[None], None
        dw_numel, db_numel = (N * K if kernel_dw else 0), (N if compute_db else 0)
        row_length = max(16, cdiv(dw_numel + db_numel, 16) * 16)
        part = new_output((chunks, row_length), dtype=acc_torch_dtype(acc), device=device)
        dw = part[:, :dw_numel].view(chunks, N, K) if kernel_dw else part[:, None, :1]
        return dw, part[:, dw_numel:dw_numel + db_numel], part

    def _finish(part, kernel_dw, compute_db, dw_out, db_out):
        """Sum a side's row-chunk partials into its outputs, in a fixed order."""
        dw_numel, db_numel = (N * K if kernel_dw else 0), (N if compute_db else 0)
        if part is None or not dw_numel + db_numel:
            return
        dw = dw_out if kernel_dw else new_output((1,), dtype=dtype, device=device)
        db = db_out if compute_db else new_output((1,), dtype=dtype, device=device)
        reduce_partials_kernel[(cdiv(part.shape[1], _REDUCE_BLOCK),)](
            part, dw, db, part.shape[0], part.shape[1], dw_numel, db_numel, BLOCK=_REDUCE_BLOCK)

    def run(cfg, chunks):
        if cfg is tuning.TORCH_GEMM:
            return tuple(_contiguous(t) for t in _run_torch_impl(torch_impl, device))
        (dwg, dbg, dwu, dbu), result = allocate()
        kernel_dw = kernel_dwg or kernel_dwu
        tiles_ = cdiv(N, cfg.block_rows) * (cdiv(K, cfg.block_cols) if kernel_dw else 1)
        if chunks is None:
            chunks = choose_split(M, tiles_, cfg.block_red, device) if M > 0 else 1
        rows_per_split = cdiv(cdiv(M, chunks), cfg.block_red) * cfg.block_red if M > 0 else 1
        chunks = max(1, cdiv(M, rows_per_split)) if M > 0 else 1
        dwg_t, dbg_t, part_g = _side(chunks, kernel_dwg, gate_bias, dwg, dbg)
        dwu_t, dbu_t, part_u = _side(chunks, kernel_dwu, up_bias, dwu, dbu)
        gated_grad_weight_kernel[(tiles_, chunks)](
            grad, g, u, x, dwg_t, dbg_t, dwu_t, dbu_t, M, N, K, rows_per_split,
            grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
            dwg_t.stride(0), dwu_t.stride(0), K, 1, dbg_t.stride(0), dbu_t.stride(0),
            ACTIVATION=forward_of(activation), ACTIVATION_GRAD=grad_of(activation), ALPHA=alpha,
            SAVES_OUTPUT=_saves_output(activation, alpha),
            COMPUTE_DWG=kernel_dwg, COMPUTE_DBG=gate_bias, COMPUTE_DWU=kernel_dwu,
            COMPUTE_DBU=up_bias,
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_M=cfg.block_red, GROUP=cfg.group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _finish(part_g, kernel_dwg, gate_bias, dwg, dbg)
        _finish(part_u, kernel_dwu, up_bias, dwu, dbu)
        return result

    if N == 0 or not (kernel_dwg or kernel_dwu or gate_bias or up_bias):
        # nothing to compute: every output asked for is empty (N = 0, or dW with K = 0)
        return allocate()[1]
    configs_, key = _configs_and_key("dw", grad, precision, (M, N, K), activation,
                                     (activation, alpha) + flags, torch_impl)
    cfg = tuning.pick_config(key, configs_, device, lambda c: run(c, split))
    return run(cfg, split)
