"""The whole narrow MLP's three Triton kernels: fused forward, fused dX chain, grouped dW + db.

The network (L >= 1 hidden layers, all with the same activation act, an output activation out_act):

    Z_0 = X W_inᵀ + b_in                  X [M, K_IN], W_in [H_0, K_IN]     (first layer)
    Z_l = Y_{l-1} W_lᵀ + b_l              W_l [H_l, H_{l-1}], l = 1..L-1    (middle layers)
    Y_l = act(Z_l)
    Y   = out_act(Y_{L-1} W_outᵀ + b_out) W_out [N_OUT, H_{L-1}]            (last layer)

Why fuse it (tiny-cuda-nn's FullyFusedMLP, DESIGN.md "Narrow MLPs"): at hidden widths of 16-128
every per-layer GEMM is a thin stream over M rows with almost no reuse, so a layer costs one read
and one write of a [M, H] activation plus a launch. Here one program takes a row tile of BLOCK_M
rows through every layer with the activations in registers: the forward reads X once, writes Y
once, and writes one [M, H] tensor per hidden layer only when backward will need it (Y_l, or Z_l
for activations whose derivative needs the pre-activation: the row's ``saves`` in
kernels/activations.py).

Backward, one row tile per program, walking the layers top down (``mlp_bwd_kernel``):

    dZ_out = G ⊙ out_act'(S_out)                               (G = dL/dY; skipped for no out_act)
    dZ_{L-1} = act'(dZ_out W_out, S_{L-1})                     derivative applied as the dX GEMM's
    dZ_{l-1} = act'(dZ_l W_l, S_{l-1}),  l = L-1..1            epilogue: the chain stays on-chip
    dX = dZ_0 W_in                                             (only when X needs a gradient)

It writes each dZ_l (one [M, H] tensor per layer): the weight gradients are reductions over all M
rows, which no single row tile can finish. They are plain GEMMs of already-masked gradients,
``mlp_grad_weight_kernel``: dW_l = dZ_lᵀ Y_{l-1}, db_l = Σ_rows dZ_l, every middle layer in one
launch (program axis 2 is the layer), rows split into chunks whose fp32 partial sums are added in
a fixed order: deterministic for a given config, and enough programs to fill the GPU when the
outputs are a handful of H x H tiles. Y_{l-1} is read back from the saved tensor, or recomputed
as act(Z_{l-1}) there when the pre-activation was saved (the same rounding as the forward).

Shapes Triton's tl.dot can take: every hidden layer is computed at one padded width H (a power of
two >= 16, constexpr, for the widest hidden layer), and stored at it too: saved and dZ are
[L, M, H] and the middle layers' weights come packed into one [L-1, H, H] buffer, zero-padded
where a layer is narrower (the launcher copies them: 8-64 KB a layer at widths 64-128, next to
megabytes of activations), so one loop over the layers (a runtime count: one compiled kernel
serves every depth) walks them with a fixed stride. The true widths are runtime values only
(H_FIRST, H_LAST, the widths table): one compiled kernel per H serves every width that pads to
it, the kernel the ahead-of-time checks compile (kernels/mlp_aot.py); a true-width constexpr
would make a kernel per width, with masked, unaligned rows that spill (bench/NOTES.md, "FusedMLP").
Padded hidden units compute act(0) (finite), and the zero weight columns that follow them cancel
it; their gradients are exactly 0 (sliced away by the caller). The first layer streams X in
BLOCK_K column steps, the last layer produces BLOCK_N output columns at a time, so K_IN and
N_OUT are arbitrary (the seed: 1000 in, 10 out).

Rounding follows torch's per-layer semantics: each linear output is rounded once to the input
dtype (fp32 accumulation), the activation is computed from that rounded value in fp32 and rounded
again, gradients between layers are rounded to the input dtype before the next GEMM reads them.

The activations are constexprs holding their jit functions (kernels/activation_jit.py):
``ACTIVATION`` / ``OUT_ACTIVATION`` / ``B_ACTIVATION`` a forward, ``ACTIVATION_GRAD`` /
``OUT_ACTIVATION_GRAD`` a derivative, None for "none". Layout of this file: jit helpers, then the
three kernels. Their tile tables are in kernels/configs.py, their launchers in kernels/mlp.py, the
jit helpers shared with the per-layer kernels in kernels/launch.py.
"""

import triton
import triton.language as tl

from fastmlp.kernels.activation_jit import activate, activation_grad
from fastmlp.kernels.launch import in_bounds, mma, round_to, tiles


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _activate_rounded(acc, DTYPE: tl.constexpr, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """(Z, Y) in DTYPE from a layer's accumulator: Z rounded once, Y = act(Z) computed from the
    rounded Z in the accumulator's precision and rounded again (torch: linear, then act).
    ACTIVATION: the jit forward (None: none)."""
    z = round_to(acc, DTYPE)
    y = round_to(activate(z.to(acc.dtype), ACTIVATION, ALPHA), DTYPE)
    return z, y


@triton.jit
def _derivative(g, saved, ACC_DTYPE: tl.constexpr, ACTIVATION_GRAD: tl.constexpr,
                ALPHA: tl.constexpr):
    """dL/dZ = act'(g, saved) for a gradient tile g in the input dtype, computed in ACC_DTYPE and
    rounded once to g's dtype (torch's activation backward ops do the same). ACTIVATION_GRAD: the
    jit derivative."""
    d = activation_grad(g.to(ACC_DTYPE), saved.to(ACC_DTYPE), ACTIVATION_GRAD, ALPHA)
    return round_to(d, g.dtype)


# ----------------------------------------------------------------------------------------------
# Forward: one row tile through every layer
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])  # batch sizes vary: no recompiles
def mlp_fwd_kernel(
    x_ptr, w_in_ptr, b_in_ptr, w_mid_ptr, b_mid_ptr, w_out_ptr, b_out_ptr, widths_ptr,
    y_ptr, saved_ptr, z_out_ptr,
    M, K_IN, H_FIRST, H_LAST, N_OUT, NUM_MID, stride_saved_layer,
    stride_xm, stride_xk, stride_w_in_n, stride_w_in_k, stride_w_out_n, stride_w_out_k,
    stride_ym, stride_yn,
    ACTIVATION: tl.constexpr, ALPHA: tl.constexpr,
    OUT_ACTIVATION: tl.constexpr, OUT_ALPHA: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, SAVE_PREACT: tl.constexpr,
    SAVE_OUT_PREACT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y for rows [pid * BLOCK_M, ...); with SAVE, also S_l (Y_l, or Z_l if SAVE_PREACT) into
    saved [L, M, H] and, with SAVE_OUT_PREACT, the output layer's Z (y's strides).

    widths [L] (int32): each hidden layer's true width. Units past it are padding: their
    pre-activation is set to 0 (not left as Σ x·0, which is NaN for an infinite x and would then
    reach every unit of the next layer through its zero weights), so they stay finite."""
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rh = tl.arange(0, H)
    rh_strided = rh.to(OFFSET_DTYPE)  # for the strided first and last weights
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    in_m = in_bounds(rm, m0, M, BLOCK_M)
    save_mask = in_m[:, None] & (rh < H)[None, :]  # whole rows of H: padding units included
    saved_ptrs = saved_ptr + m0 * H + (rm[:, None] * H + rh[None, :])

    # ---- first layer: Z_0 = X W_inᵀ + b_in, X streamed BLOCK_K columns at a time -------------
    in_first = rh < H_FIRST
    x_ptrs = x_ptr + m0 * stride_xm + (rm[:, None] * stride_xm + rk[None, :] * stride_xk)
    w_ptrs = w_in_ptr + (rk[:, None] * stride_w_in_k + rh_strided[None, :] * stride_w_in_n)  # W_inᵀ
    acc = tl.zeros((BLOCK_M, H), dtype=ACC_DTYPE)
    for k0 in range(0, K_IN, BLOCK_K):
        in_k = rk < K_IN - k0
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_first[None, :], other=0.0)
        acc = mma(x, w, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_w_in_k
    if HAS_BIAS:
        acc += tl.load(b_in_ptr + rh, mask=in_first, other=0.0).to(ACC_DTYPE)[None, :]
    acc = tl.where(in_first[None, :], acc, 0.0)
    z, h = _activate_rounded(acc, DTYPE, ACTIVATION, ALPHA)
    if SAVE:
        tl.store(saved_ptrs, z if SAVE_PREACT else h, mask=save_mask)

    # ---- middle layers: Z_l = Y_{l-1} W_lᵀ + b_l, weights packed [NUM_MID, H, H] -------------
    w_ptrs = w_mid_ptr + (rh[:, None] + rh[None, :] * H)  # W_lᵀ tile [H (in), H (out)]
    b_ptrs = b_mid_ptr + rh
    for layer in range(1, NUM_MID + 1):
        acc = mma(h, tl.load(w_ptrs), tl.zeros((BLOCK_M, H), dtype=ACC_DTYPE), DOT_PRECISION,
                   UPCAST)
        if HAS_BIAS:
            acc += tl.load(b_ptrs).to(ACC_DTYPE)[None, :]
        acc = tl.where((rh < tl.load(widths_ptr + layer))[None, :], acc, 0.0)
        z, h = _activate_rounded(acc, DTYPE, ACTIVATION, ALPHA)
        saved_ptrs += stride_saved_layer
        if SAVE:
            tl.store(saved_ptrs, z if SAVE_PREACT else h, mask=save_mask)
        w_ptrs += H * H
        b_ptrs += H

    # ---- last layer: Y = out_act(Y_{L-1} W_outᵀ + b_out), BLOCK_N output columns at a time ----
    in_last = rh < H_LAST
    w_ptrs = w_out_ptr + (rh_strided[:, None] * stride_w_out_k + rn[None, :] * stride_w_out_n)
    out_tile = rm[:, None] * stride_ym + rn[None, :] * stride_yn
    y_ptrs = y_ptr + m0 * stride_ym + out_tile
    z_ptrs = z_out_ptr + m0 * stride_ym + out_tile
    for n0 in range(0, N_OUT, BLOCK_N):
        in_n = rn < N_OUT - n0
        w_out = tl.load(w_ptrs, mask=in_last[:, None] & in_n[None, :], other=0.0)
        acc_out = mma(h, w_out, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc_out += tl.load(b_out_ptr + n0 + rn, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
        z_out, y = _activate_rounded(acc_out, DTYPE, OUT_ACTIVATION, OUT_ALPHA)
        out_mask = in_m[:, None] & in_n[None, :]
        if SAVE_OUT_PREACT:
            tl.store(z_ptrs, z_out, mask=out_mask)
        tl.store(y_ptrs, y, mask=out_mask)
        w_ptrs += BLOCK_N * stride_w_out_n
        y_ptrs += BLOCK_N * stride_yn
        z_ptrs += BLOCK_N * stride_yn


# ----------------------------------------------------------------------------------------------
# Backward dX chain: one row tile through every layer, top down
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])
def mlp_bwd_kernel(
    g_ptr, s_out_ptr, dz_out_ptr, saved_ptr, dz_ptr, w_in_ptr, w_mid_ptr, w_out_ptr, widths_ptr,
    dx_ptr,
    M, K_IN, H_FIRST, H_LAST, N_OUT, NUM_MID, stride_saved_layer,
    stride_gm, stride_gn, stride_w_in_n, stride_w_in_k, stride_w_out_n, stride_w_out_k,
    stride_dxm, stride_dxk,
    ACTIVATION_GRAD: tl.constexpr, ALPHA: tl.constexpr,
    OUT_ACTIVATION_GRAD: tl.constexpr, OUT_ALPHA: tl.constexpr, COMPUTE_DX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dZ_l of every hidden layer into dz [L, M, H], dZ_out into dz_out (unless
    OUT_ACTIVATION_GRAD is None, no output activation: then dZ_out is G itself), dX if COMPUTE_DX. G, S_out and dz_out share strides.
    As in the forward, the padding units' gradients are set to 0 (exactly what they are, also
    when a real gradient is infinite), so dZ is 0 there for the weight gradients too."""
    DTYPE: tl.constexpr = g_ptr.dtype.element_ty
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rh = tl.arange(0, H)
    rh_strided = rh.to(OFFSET_DTYPE)  # for the strided first and last weights
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    in_m = in_bounds(rm, m0, M, BLOCK_M)
    hidden_mask = in_m[:, None] & (rh < H)[None, :]  # whole rows of H: padding units included

    # ---- last layer: dY_{L-1} = Σ_n dZ_out[:, n] W_out[n, :] ----------------------------------
    in_last = rh < H_LAST
    g_tile = rm[:, None] * stride_gm + rn[None, :] * stride_gn
    g_base = m0 * stride_gm
    w_ptrs = w_out_ptr + (rn[:, None] * stride_w_out_n + rh_strided[None, :] * stride_w_out_k)
    acc = tl.zeros((BLOCK_M, H), dtype=ACC_DTYPE)
    for n0 in range(0, N_OUT, BLOCK_N):
        in_n = rn < N_OUT - n0
        out_mask = in_m[:, None] & in_n[None, :]
        g = tl.load(g_ptr + g_base + g_tile, mask=out_mask, other=0.0)
        if OUT_ACTIVATION_GRAD is not None:
            s = tl.load(s_out_ptr + g_base + g_tile, mask=out_mask, other=0.0)
            g = _derivative(g, s, ACC_DTYPE, OUT_ACTIVATION_GRAD, OUT_ALPHA)
            tl.store(dz_out_ptr + g_base + g_tile, g, mask=out_mask)
        w_out = tl.load(w_ptrs, mask=in_n[:, None] & in_last[None, :], other=0.0)
        acc = mma(g, w_out, acc, DOT_PRECISION, UPCAST)
        g_base += BLOCK_N * stride_gn
        w_ptrs += BLOCK_N * stride_w_out_n
    acc = tl.where(in_last[None, :], acc, 0.0)

    # ---- hidden layers L-1 .. 1: dZ_l = act'(dY_l, S_l), dY_{l-1} = dZ_l W_l ------------------
    tile = m0 * H + (rm[:, None] * H + rh[None, :])
    top = NUM_MID * tl.cast(stride_saved_layer, tl.int64)  # the last hidden layer's slice
    saved_ptrs = saved_ptr + top + tile
    dz_ptrs = dz_ptr + top + tile
    w_ptrs = w_mid_ptr + (NUM_MID - 1) * H * H + (rh[:, None] * H + rh[None, :])
    for i in range(NUM_MID):
        layer = NUM_MID - i
        dy = round_to(acc, DTYPE)
        if ACTIVATION_GRAD is not None:
            dy = _derivative(dy, tl.load(saved_ptrs, mask=hidden_mask, other=0.0), ACC_DTYPE,
                             ACTIVATION_GRAD, ALPHA)
        tl.store(dz_ptrs, dy, mask=hidden_mask)
        acc = mma(dy, tl.load(w_ptrs), tl.zeros((BLOCK_M, H), dtype=ACC_DTYPE), DOT_PRECISION,
                   UPCAST)
        acc = tl.where((rh < tl.load(widths_ptr + layer - 1))[None, :], acc, 0.0)  # the layer below
        saved_ptrs -= stride_saved_layer
        dz_ptrs -= stride_saved_layer
        w_ptrs -= H * H

    # ---- first layer: dZ_0, then dX = dZ_0 W_in, BLOCK_K columns at a time -------------------
    dz = round_to(acc, DTYPE)
    if ACTIVATION_GRAD is not None:
        dz = _derivative(dz, tl.load(saved_ptrs, mask=hidden_mask, other=0.0), ACC_DTYPE,
                         ACTIVATION_GRAD, ALPHA)
    tl.store(dz_ptrs, dz, mask=hidden_mask)
    if COMPUTE_DX:
        in_first = rh < H_FIRST
        w_ptrs = w_in_ptr + (rh_strided[:, None] * stride_w_in_n + rk[None, :] * stride_w_in_k)
        dx_ptrs = dx_ptr + m0 * stride_dxm + (rm[:, None] * stride_dxm + rk[None, :] * stride_dxk)
        for k0 in range(0, K_IN, BLOCK_K):
            in_k = rk < K_IN - k0
            w_in = tl.load(w_ptrs, mask=in_first[:, None] & in_k[None, :], other=0.0)
            dx = mma(dz, w_in, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
            tl.store(dx_ptrs, round_to(dx, DTYPE), mask=in_m[:, None] & in_k[None, :])
            w_ptrs += BLOCK_K * stride_w_in_k
            dx_ptrs += BLOCK_K * stride_dxk


# ----------------------------------------------------------------------------------------------
# Weight gradients: dW[g] = A[g]ᵀ B[g], db[g] = Σ_rows A[g], for a group of same-shaped layers
# ----------------------------------------------------------------------------------------------
@triton.jit  # M is the reduction here: its divisibility hint keeps the row loop lean
def mlp_grad_weight_kernel(
    a_ptr, b_ptr, dw_ptr, db_ptr,
    M, N, K, rows_per_split,
    stride_a_group, stride_am, stride_an, stride_b_group, stride_bm, stride_bk,
    stride_dw_split, stride_dw_group, stride_db_split, stride_db_group,
    B_ACTIVATION: tl.constexpr, B_ALPHA: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Program (tile, split, group) sums rows [split * rows_per_split, ...) of layer `group` into
    its own slice of dw [splits, groups, N, K] (contiguous rows) and db [splits, groups, N].

    A is the layer's dZ [M, N]; B its input [M, K], or, with B_ACTIVATION (a jit forward; None:
    none), the saved pre-activation of the layer below, whose activation is recomputed here (as
    in the forward).
    """
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    if COMPUTE_DW:
        num_k_tiles = tiles(K, BLOCK_K)  # K >= 1: the launcher skips an empty dW
    else:
        num_k_tiles = 1  # db alone: one column tile
    pid_n = tl.program_id(0) // num_k_tiles
    pid_k = tl.program_id(0) % num_k_tiles
    split = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2).to(tl.int64)
    row_start = split * rows_per_split
    rows_here = tl.minimum(M - row_start, rows_per_split).to(tl.int32)
    n0 = pid_n.to(tl.int64) * BLOCK_N
    k0 = pid_k.to(tl.int64) * BLOCK_K
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    in_n = in_bounds(rn, n0, N, BLOCK_N)
    in_k = in_bounds(rk, k0, K, BLOCK_K)
    # A is read transposed, as [BLOCK_N, BLOCK_M] tiles: the left operand of Aᵀ B.
    a_ptrs = (a_ptr + group * stride_a_group + row_start * stride_am + n0 * stride_an
              + (rn[:, None] * stride_an + rm[None, :] * stride_am))
    b_ptrs = (b_ptr + group * stride_b_group + row_start * stride_bm + k0 * stride_bk
              + (rm[:, None] * stride_bm + rk[None, :] * stride_bk))

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_bias = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(0, rows_here, BLOCK_M):
        in_m = rm < rows_here - m0
        a = tl.load(a_ptrs, mask=in_n[:, None] & in_m[None, :], other=0.0)
        if COMPUTE_DW:
            b = tl.load(b_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
            if B_ACTIVATION is not None:
                # rows past the end become act(0), finite: A is 0 there
                b = round_to(activate(b.to(ACC_DTYPE), B_ACTIVATION, B_ALPHA), DTYPE)
            acc = mma(a, b, acc, DOT_PRECISION, UPCAST)
        if COMPUTE_DB:
            acc_bias += tl.sum(a.to(ACC_DTYPE), axis=1)
        a_ptrs += BLOCK_M * stride_am
        b_ptrs += BLOCK_M * stride_bm

    out = split * stride_dw_split + group * stride_dw_group
    if COMPUTE_DW:
        dw_ptrs = dw_ptr + out + n0 * K + k0 + (rn[:, None] * K + rk[None, :])
        tl.store(dw_ptrs, round_to(acc, dw_ptr.dtype.element_ty), mask=in_n[:, None] & in_k[None, :])
    if COMPUTE_DB:
        if pid_k == 0:  # every column tile summed the same rows; the first one stores db
            db_ptrs = db_ptr + split * stride_db_split + group * stride_db_group + n0 + rn
            tl.store(db_ptrs, round_to(acc_bias, db_ptr.dtype.element_ty), mask=in_n)
