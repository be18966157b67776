"""A whole narrow MLP in three Triton kernels: fused forward, fused dX chain, grouped dW + db.

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
for activations whose derivative needs the pre-activation; fastmlp/activations.py says which).

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
it, the kernel the ahead-of-time checks compile (kernels/mlp_aot.py). Storing at the true width
instead made a second kernel per width, with masked, unaligned rows: at an odd width most 16-bit
and fp32 backward tiles spilled (up to 5 KB), at 100 the sm_90 16-bit GELU-tanh default did.
Padded hidden units compute act(0) (finite), and the zero weight columns that follow them cancel
it; their gradients are exactly 0 (sliced away by the caller). The first layer streams X in
BLOCK_K column steps, the last layer produces BLOCK_N output columns at a time, so K_IN and
N_OUT are arbitrary (the seed: 1000 in, 10 out).

Rounding follows torch's per-layer semantics: each linear output is rounded once to the input
dtype (fp32 accumulation), the activation is computed from that rounded value in fp32 and rounded
again, gradients between layers are rounded to the input dtype before the next GEMM reads them.

Layout of this file: jit helpers, the three kernels, configs, launchers.
"""

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fastmlp.kernels import tuning
from fastmlp.kernels.activations import activate, activation_grad
from fastmlp.kernels.debug import new_output
from fastmlp.kernels.launch import capability as _capability, cdiv, on_first_tensors_device


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST is set only under the interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _in_bounds(lanes, start, size, BLOCK: tl.constexpr):
    """Which of a tile's lanes (0..BLOCK-1, from int64 `start`) fall inside `size`, compared in
    int32 (the count left is clamped to BLOCK first)."""
    return lanes < tl.minimum(size - start, BLOCK).to(tl.int32)


# Triton's interpreter converts fp32 -> bf16 by truncation (and its "rtne" mode does not carry a
# rounded-up mantissa into the exponent); the GPU rounds to nearest even. Through a deep stack
# truncation compounds into errors several times torch's, so under the interpreter, and only
# there, bf16 rounding is done on the bits.
_BF16_BY_BITS = tl.constexpr(tuning.interpreter_enabled())


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x rounded to DTYPE, to nearest even (what a GPU cast does; the interpreter needs help)."""
    if _BF16_BY_BITS and DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _activate_rounded(acc, DTYPE: tl.constexpr, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """(Z, Y) in DTYPE from a layer's accumulator: Z rounded once, Y = act(Z) computed from the
    rounded Z in the accumulator's precision and rounded again (torch: linear, then act)."""
    z = _round(acc, DTYPE)
    y = _round(activate(z.to(acc.dtype), ACTIVATION, ALPHA), DTYPE)
    return z, y


@triton.jit
def _derivative(g, saved, ACC_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """dL/dZ = act'(g, saved) for a gradient tile g in the input dtype, computed in ACC_DTYPE and
    rounded once to g's dtype (torch's activation backward ops do the same)."""
    d = activation_grad(g.to(ACC_DTYPE), saved.to(ACC_DTYPE), ACTIVATION, ALPHA)
    return _round(d, g.dtype)


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
    in_m = _in_bounds(rm, m0, M, BLOCK_M)
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
        acc = _mma(x, w, acc, DOT_PRECISION, UPCAST)
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
        acc = _mma(h, tl.load(w_ptrs), tl.zeros((BLOCK_M, H), dtype=ACC_DTYPE), DOT_PRECISION,
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
        acc_out = _mma(h, w_out, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
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
    ACTIVATION: tl.constexpr, ALPHA: tl.constexpr,
    OUT_ACTIVATION: tl.constexpr, OUT_ALPHA: tl.constexpr, COMPUTE_DX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dZ_l of every hidden layer into dz [L, M, H], dZ_out into dz_out (unless OUT_ACTIVATION
    is "none": then dZ_out is G itself), dX if COMPUTE_DX. G, S_out and dz_out share strides.
    As in the forward, the padding units' gradients are set to 0 (exactly what they are, also
    when a real gradient is infinite), so dZ is 0 there for the weight gradients too."""
    DTYPE: tl.constexpr = g_ptr.dtype.element_ty
    m0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rh = tl.arange(0, H)
    rh_strided = rh.to(OFFSET_DTYPE)  # for the strided first and last weights
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    in_m = _in_bounds(rm, m0, M, BLOCK_M)
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
        if OUT_ACTIVATION != "none":
            s = tl.load(s_out_ptr + g_base + g_tile, mask=out_mask, other=0.0)
            g = _derivative(g, s, ACC_DTYPE, OUT_ACTIVATION, OUT_ALPHA)
            tl.store(dz_out_ptr + g_base + g_tile, g, mask=out_mask)
        w_out = tl.load(w_ptrs, mask=in_n[:, None] & in_last[None, :], other=0.0)
        acc = _mma(g, w_out, acc, DOT_PRECISION, UPCAST)
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
        dy = _round(acc, DTYPE)
        if ACTIVATION != "none":
            dy = _derivative(dy, tl.load(saved_ptrs, mask=hidden_mask, other=0.0), ACC_DTYPE,
                             ACTIVATION, ALPHA)
        tl.store(dz_ptrs, dy, mask=hidden_mask)
        acc = _mma(dy, tl.load(w_ptrs), tl.zeros((BLOCK_M, H), dtype=ACC_DTYPE), DOT_PRECISION,
                   UPCAST)
        acc = tl.where((rh < tl.load(widths_ptr + layer - 1))[None, :], acc, 0.0)  # the layer below
        saved_ptrs -= stride_saved_layer
        dz_ptrs -= stride_saved_layer
        w_ptrs -= H * H

    # ---- first layer: dZ_0, then dX = dZ_0 W_in, BLOCK_K columns at a time -------------------
    dz = _round(acc, DTYPE)
    if ACTIVATION != "none":
        dz = _derivative(dz, tl.load(saved_ptrs, mask=hidden_mask, other=0.0), ACC_DTYPE,
                         ACTIVATION, ALPHA)
    tl.store(dz_ptrs, dz, mask=hidden_mask)
    if COMPUTE_DX:
        in_first = rh < H_FIRST
        w_ptrs = w_in_ptr + (rh_strided[:, None] * stride_w_in_n + rk[None, :] * stride_w_in_k)
        dx_ptrs = dx_ptr + m0 * stride_dxm + (rm[:, None] * stride_dxm + rk[None, :] * stride_dxk)
        for k0 in range(0, K_IN, BLOCK_K):
            in_k = rk < K_IN - k0
            w_in = tl.load(w_ptrs, mask=in_first[:, None] & in_k[None, :], other=0.0)
            dx = _mma(dz, w_in, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
            tl.store(dx_ptrs, _round(dx, DTYPE), mask=in_m[:, None] & in_k[None, :])
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

    A is the layer's dZ [M, N]; B its input [M, K], or, with B_ACTIVATION, the saved
    pre-activation of the layer below, whose activation is recomputed here (as in the forward).
    """
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    if COMPUTE_DW:
        num_k_tiles = (K - 1) // BLOCK_K + 1  # K >= 1: the launcher skips an empty dW
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
    in_n = _in_bounds(rn, n0, N, BLOCK_N)
    in_k = _in_bounds(rk, k0, K, BLOCK_K)
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
            if B_ACTIVATION != "none":
                # rows past the end become act(0), finite: A is 0 there
                b = _round(activate(b.to(ACC_DTYPE), B_ACTIVATION, B_ALPHA), DTYPE)
            acc = _mma(a, b, acc, DOT_PRECISION, UPCAST)
        if COMPUTE_DB:
            acc_bias += tl.sum(a.to(ACC_DTYPE), axis=1)
        a_ptrs += BLOCK_M * stride_am
        b_ptrs += BLOCK_M * stride_bm

    out = split * stride_dw_split + group * stride_dw_group
    if COMPUTE_DW:
        dw_ptrs = dw_ptr + out + n0 * K + k0 + (rn[:, None] * K + rk[None, :])
        tl.store(dw_ptrs, _round(acc, dw_ptr.dtype.element_ty), mask=in_n[:, None] & in_k[None, :])
    if COMPUTE_DB:
        if pid_k == 0:  # every column tile summed the same rows; the first one stores db
            db_ptrs = db_ptr + split * stride_db_split + group * stride_db_group + n0 + rn
            tl.store(db_ptrs, _round(acc_bias, db_ptr.dtype.element_ty), mask=in_n)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the fused forward / dX-chain kernels (the hidden width H is the layer tile).

    block_m: rows per program; block_k: columns of X (forward) and of dX (backward) per step of
    the first layer; block_n: output columns per step of the last layer.
    """

    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


# Under the interpreter time goes per program and per block op, not per element: few, large
# tiles (but still several row tiles, column tiles and row chunks at the tests' sizes).
_INTERPRETER_FUSED = [FusedConfig(32, 64, 32, 4, 1)]
_INTERPRETER_DW = [tuning.TileConfig(128, 128, 32, 1, 4, 1)]

# Per (dtype class, GPU generation) and padded hidden width H: the fused configs a launch may
# pick, default first. A width with no entry does not take the fully fused path there (the
# per-layer path runs instead): 128 is the limit for every class (at 256, 16-bit backward spills
# at every tile tried and an fp32 256 x 256 weight tile alone overflows shared memory). Each
# entry compiles with 0 spills and no stack frame (tests/test_mlp_aot.py); the sweeps that chose
# them, with register counts, are in bench/NOTES.md ("FusedMLP"). Register allocation near the
# 255-register limit is chaotic (one more temporary in an activation's derivative, a mask, or
# Triton 3.6 -> 3.9 moved clean configs to spills), so every entry was picked from a pool
# compiled under both Triton versions CI runs, clean in both and, where the pool allowed,
# below ~240 registers. What the pool showed: at 128, 16-bit tiles take at most 64 rows with 8
# warps, TF32 and exact fp32 (FMA, operands in registers) 16-32 rows with 2 stages on sm_90.
# Each is also compiled as launched on sizes that are not multiples of 16 (mlp_aot's "odd"
# sizes: K_IN 1000, N_OUT 10, ...), which takes more registers: under Triton 3.9 the earlier
# TF32 defaults at 128 spilled there (12 bytes sm_90, 108-260 bytes sm_80), so TF32 at 128
# takes 16-column first/last-layer steps (block_k = block_n = 16), and exact fp32 sm_90 at 128
# lost its 16-row alternative (16 bytes spilled with odd sizes under 3.6).
_C = FusedConfig
FUSED_CONFIGS: Dict[Tuple[str, int], Dict[int, List[FusedConfig]]] = {
    ("half", 90): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(128, 32, 32, 8, 1), _C(64, 32, 32, 8, 1)],
                   128: [_C(64, 32, 32, 8, 1)]},
    ("half", 80): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(128, 32, 32, 8, 1), _C(64, 32, 32, 8, 1)],
                   128: [_C(64, 32, 32, 8, 1)]},
    ("tf32", 90): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(64, 32, 32, 8, 1), _C(32, 32, 32, 8, 2)],
                   128: [_C(32, 16, 16, 8, 2), _C(16, 32, 32, 8, 2)]},
    ("tf32", 80): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(64, 32, 32, 8, 2), _C(64, 32, 32, 8, 1)],
                   128: [_C(64, 16, 16, 8, 2), _C(32, 32, 32, 8, 2)]},
    ("ieee", 90): {16: [_C(64, 32, 32, 8, 1)], 32: [_C(64, 32, 32, 8, 1)],
                   64: [_C(32, 32, 32, 8, 1), _C(32, 32, 32, 8, 2)],
                   128: [_C(32, 32, 32, 8, 2)]},
    ("ieee", 80): {16: [_C(64, 32, 32, 8, 1)], 32: [_C(64, 32, 32, 8, 1)],
                   64: [_C(32, 32, 32, 8, 1), _C(32, 32, 32, 8, 2)],
                   128: [_C(16, 32, 32, 8, 2)]},
}

# Activations whose derivative is a select (the backward keeps no transcendental temporaries).
SELECT_ACTIVATIONS = ("relu", "leaky_relu", "none")

# Where the tiles above spill for the other activations: at 16 bits their fp32 derivatives on a
# [block_m, H] tile need about 16 tile elements per thread, half what relu's select can take
# (gelu_tanh's backward at H = 64 spills 584 bytes on sm_90 with 128-row tiles and 8 warps and
# takes 185 registers with 64-row ones); these are those tiles.
MATH_CONFIGS: Dict[Tuple[str, int], Dict[int, List[FusedConfig]]] = {
    ("half", 90): {16: [_C(64, 32, 32, 4, 1)], 32: [_C(64, 32, 32, 4, 1)],
                   64: [_C(64, 32, 32, 8, 1), _C(32, 32, 32, 4, 1)],
                   128: [_C(64, 32, 32, 8, 1), _C(16, 32, 32, 8, 1)]},
    ("half", 80): {16: [_C(64, 32, 32, 4, 1)], 32: [_C(64, 32, 32, 4, 1)],
                   64: [_C(64, 32, 32, 8, 1), _C(32, 32, 32, 8, 1)],
                   128: [_C(32, 32, 32, 8, 1), _C(16, 32, 32, 8, 1)]},
}

# dW + db of the stack: output tile [block_rows (N), block_cols (K)], block_red rows per step
# (group unused: each program owns one output tile of one layer and one row chunk).
_T = tuning.TileConfig
DW_CONFIGS: Dict[Tuple[str, int], List[tuning.TileConfig]] = {
    ("half", 90): [_T(64, 64, 64, 1, 4, 3), _T(128, 128, 64, 1, 8, 3), _T(128, 64, 64, 1, 8, 3)],
    ("half", 80): [_T(64, 64, 64, 1, 8, 3), _T(128, 64, 32, 1, 8, 3)],
    ("tf32", 90): [_T(64, 64, 32, 1, 4, 3), _T(128, 128, 32, 1, 8, 3)],
    ("tf32", 80): [_T(64, 64, 32, 1, 4, 3), _T(128, 128, 32, 1, 8, 3)],
    ("ieee", 90): [_T(32, 64, 32, 1, 4, 3), _T(32, 32, 32, 1, 4, 3)],
    ("ieee", 80): [_T(32, 64, 32, 1, 4, 3), _T(32, 32, 32, 1, 4, 3)],
}


def dtype_class(dtype: torch.dtype, allow_tf32: bool) -> str:
    """"half" (fp16/bf16 tensor cores), "tf32", "ieee" (exact fp32 FMA) or "fp64"."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    return "fp64"


# The shared memory a block may opt in to on the GPUs the tables were compiled and checked for
# (A100 for "80", H100 for "90"; the same figures as fastmlp.kernels.aot.SHARED_MEMORY_LIMIT).
# The largest shipped tiles use ~147 KB (sm_80 TF32, H = 128) and ~114 KB (sm_90): on a GPU of
# either generation with less (sm_86 / sm_89: A10, L4, RTX 30/40 series, ~99 KB; sm_120, ~99 KB)
# every TF32 tile at H = 128 would fail to launch (OutOfResources, or "no kernel config fits"
# from the autotuner), so such GPUs run the per-layer path instead. Before sm_80 (no bf16
# tensor cores, other MMA shapes) nothing was compiled: per-layer there too.
_TABLE_SHARED_MEMORY = {80: 166912, 90: 232448}


@functools.lru_cache(maxsize=None)
def _shared_memory(device: torch.device) -> Optional[int]:
    """The shared memory a block may opt in to on `device` (None: torch does not say)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def _table_arch(device: torch.device) -> Optional[int]:
    """80 or 90: whose config tables serve `device`, or None when neither's checks hold there."""
    major = _capability(device)[0]
    if major < 8:
        return None
    arch = 90 if major >= 9 else 80
    shared = _shared_memory(device)
    if shared is not None and shared < _TABLE_SHARED_MEMORY[arch]:
        return None
    return arch


def padded_width(hidden: int) -> int:
    """The tile width H of a hidden width: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, tuning.bucket(hidden))


def fused_candidates(dtype: torch.dtype, allow_tf32: Optional[bool], hidden: int,
                     device: torch.device, activation: str = "relu") -> Optional[List[FusedConfig]]:
    """The fused configs for a stack of hidden width `hidden` (max over layers) with hidden
    activation `activation` on `device`, or None when that width is past the fully fused limit
    there, or the GPU is not one the tables were checked for (_table_arch). allow_tf32=None
    (not known yet): fp32 configs only where both fp32 modes have them."""
    if tuning.interpreter_enabled():
        return _INTERPRETER_FUSED if padded_width(hidden) <= 128 else None
    if device.type != "cuda":
        return None
    if allow_tf32 is None:
        modes = (True, False) if dtype == torch.float32 else (False,)
        found = [fused_candidates(dtype, mode, hidden, device, activation) for mode in modes]
        return None if any(f is None for f in found) else found[-1]
    arch = _table_arch(device)
    if arch is None:
        return None
    key = (dtype_class(dtype, allow_tf32), arch)
    H = padded_width(hidden)
    if activation not in SELECT_ACTIVATIONS and H in MATH_CONFIGS.get(key, {}):
        return MATH_CONFIGS[key][H]
    return FUSED_CONFIGS.get(key, {}).get(H)


def _dw_candidates(dtype: torch.dtype, allow_tf32: bool, device: torch.device):
    if tuning.interpreter_enabled() or device.type != "cuda":
        return _INTERPRETER_DW
    return DW_CONFIGS[(dtype_class(dtype, allow_tf32), _table_arch(device))]  # fused: not None


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype, allow_tf32: bool):
    """(accumulator dtype, tl.dot input_precision, upcast flag), as the per-layer kernels."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"
    upcast = dtype == torch.bfloat16 and tuning.interpreter_enabled()
    return acc, precision, upcast


def _offset_dtype(*tensors: torch.Tensor) -> tl.constexpr:
    """int32 tile-local offsets unless some stride is so large that 512 * stride might not fit."""
    return _lane_offset_dtype(s for t in tensors for s in t.stride())


def _lane_offset_dtype(strides) -> tl.constexpr:
    """The same for the strides (and row lengths) that tile lanes are multiplied by. Strides
    that only a program id or a row start multiplies (the weight-gradient kernel's layer and
    row-chunk offsets) are left out: those products are int64 in the kernel anyway, and a
    group stride of M * H (or M * K_IN for the first layer) would otherwise switch every batch
    past a few thousand rows to int64 lanes: a kernel the ahead-of-time checks never compile."""
    largest = max((abs(s) for s in strides), default=1)
    return tl.int32 if largest * 512 < 2**31 else tl.int64


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
            ACTIVATION=activation, ALPHA=alpha, OUT_ACTIVATION=out_activation, OUT_ALPHA=out_alpha,
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


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


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
    offset_dtype = _lane_offset_dtype((*a.stride()[1:], *b.stride()[1:], K))  # K: dW's rows

    def run(cfg, chunks):
        tiles = cdiv(N, cfg.block_rows) * (cdiv(K, cfg.block_cols) if kernel_dw else 1)
        if chunks is None:
            # ~2 waves of programs, every chunk at least 4 row steps long
            wanted = max(1, (2 * _multiprocessors(device)) // (tiles * G))
            chunks = min(wanted, max(1, cdiv(M, 4 * cfg.block_red)))
        rows_per_split = cdiv(cdiv(M, chunks), cfg.block_red) * cfg.block_red
        chunks = cdiv(M, rows_per_split)
        out_dtype = dtype if chunks == 1 else (torch.float64 if acc == tl.float64 else torch.float32)
        dw = new_output((chunks, G, N, K) if kernel_dw else (1,), dtype=out_dtype, device=device)
        db = new_output((chunks, G, N) if compute_db else (1,), dtype=out_dtype, device=device)
        mlp_grad_weight_kernel[(tiles, chunks, G)](
            a, b, dw, db, M, N, K, rows_per_split,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            G * N * K, N * K, G * N, N,
            B_ACTIVATION=b_activation, B_ALPHA=b_alpha, COMPUTE_DW=kernel_dw, COMPUTE_DB=compute_db,
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
                ACTIVATION=activation, ALPHA=alpha, OUT_ACTIVATION=out_activation,
                OUT_ALPHA=out_alpha, COMPUTE_DX=needs_dx,
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
