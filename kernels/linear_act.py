"""Fused Linear(+bias)+activation in Triton: forward, backward dX, backward dW + db.

The math (X [M, K], W [N, K] in nn.Linear layout, b [N], G = dL/dY [M, N], act' the derivative):

    forward   Z = X Wᵀ + b,  Y = act(Z)      bias and act applied to the fp32 accumulator, one rounding
    dX        dX = (G ⊙ act'(S)) W           derivative applied to each G tile as it is loaded
    dW, db    dW = (G ⊙ act'(S))ᵀ X,  db = Σ_rows (G ⊙ act'(S))   same tiles, one kernel

S is the tensor the activation's backward reads (its row's ``saves`` in kernels/activations.py):
the output Y or the pre-activation Z, which the forward then stores as a second output, only when
asked (SAVE_PREACT). The launchers take activations by name and pass the kernels the row's jit
forward (``ACTIVATION``) or derivative (``ACTIVATION_GRAD``) from kernels/activation_jit.py as
constexprs: nothing here is specific to one activation, and each (activation, dtype, config)
compiles to its own kernel.

Layout of this file: jit helpers, the three kernels, then their launchers (the jit and launch
helpers shared with the fused MLP are in kernels/launch.py). Every kernel takes
arbitrary strides (no copies of transposed or sliced inputs) and forms addresses in int64, so
tensors past 2**31 elements index correctly. Programs are ordered in groups along the output rows
so that neighbouring programs reuse the same column tiles while they sit in L2 (Triton tutorial 03).

dW + db are deterministic for a given config (the autotuner's pick can differ between processes):
each program owns its output tile and walks its rows in a fixed order;
when the output has too few tiles to fill the GPU (M >> N, K), the rows are split into chunks,
about one wave of programs in all, whose fp32 partial sums of dW and db one small kernel
(reduce_partials_kernel) then adds in a fixed order and rounds once to the output dtype.

The launchers take ``torch_impl``: a zero-argument callable from the caller (fastmlp/ops.py) that
computes the same result(s) with torch's own ops. On GPUs it is one more autotuning candidate
(tuning.TORCH_GEMM, cuBLAS + torch's pointwise op), so a fused layer is never slower than the plain
path by more than timing noise, and the torch reference implementation exists once, in ops.py.
"""

import torch
import triton
import triton.language as tl

from fastmlp.kernels import tuning
from fastmlp.kernels.activation_jit import activate, activation_grad, forward_of, grad_of
from fastmlp.kernels.debug import new_output
from fastmlp.kernels.launch import acc_torch_dtype, capability as _capability, cdiv, in_bounds, mma
from fastmlp.kernels.launch import multiprocessors as _multiprocessors, offset_dtype as _offset_dtype
from fastmlp.kernels.launch import on_first_tensors_device, precision as _precision, round_to, tiles


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_row_tiles, num_col_tiles, GROUP: tl.constexpr):
    """Map a linear program id to (row tile, column tile), GROUP row tiles at a time."""
    programs_per_group = GROUP * num_col_tiles
    group_id = pid // programs_per_group
    first_row = group_id * GROUP
    group_rows = tl.minimum(num_row_tiles - first_row, GROUP)
    row = first_row + (pid % programs_per_group) % group_rows
    col = (pid % programs_per_group) // group_rows
    return row, col


# ----------------------------------------------------------------------------------------------
# Forward: Z = X Wᵀ + b, Y = act(Z)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])  # batch sizes vary: no recompiles
def linear_act_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """ACTIVATION: the activation's jit forward (None: none). Z (stored only if SAVE_PREACT) has
    Y's strides: the launcher allocates both alike."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tiles(M, BLOCK_M), tiles(N, BLOCK_N), GROUP)
    # Where this program's tiles start, in int64 (M * stride can pass 2**31); offsets inside a
    # tile are small and stay in OFFSET_DTYPE (int32 unless a stride is huge), which halves the
    # registers that addressing takes.
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    in_m = in_bounds(rm, m0, M, BLOCK_M)
    in_n = in_bounds(rn, n0, N, BLOCK_N)
    x_tile = rm[:, None] * stride_xm + rk[None, :] * stride_xk
    w_tile = rk[:, None] * stride_wk + rn[None, :] * stride_wn  # Wᵀ tile [BLOCK_K, BLOCK_N]
    x_base = x_ptr + m0 * stride_xm
    w_base = w_ptr + n0 * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        in_k = rk < K - k0
        x = tl.load(x_base + x_tile, mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_base + w_tile, mask=in_k[:, None] & in_n[None, :], other=0.0)
        acc = mma(x, w, acc, DOT_PRECISION, UPCAST)
        x_base += tl.cast(stride_xk, tl.int64) * BLOCK_K
        w_base += tl.cast(stride_wk, tl.int64) * BLOCK_K

    if HAS_BIAS:
        bias = tl.load(b_ptr + n0 * stride_b + rn * stride_b, mask=in_n, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    out_offsets = m0 * stride_ym + n0 * stride_yn + (rm[:, None] * stride_ym + rn[None, :] * stride_yn)
    out_mask = in_m[:, None] & in_n[None, :]
    if SAVE_PREACT:
        tl.store(z_ptr + out_offsets, round_to(acc, z_ptr.dtype.element_ty), mask=out_mask)
    acc = activate(acc, ACTIVATION, ALPHA)
    tl.store(y_ptr + out_offsets, round_to(acc, y_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Backward dX = (G ⊙ act'(S)) W
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])  # batch sizes vary: no recompiles
def linear_act_grad_input_kernel(
    g_ptr, s_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_dxm, stride_dxk,
    ACTIVATION_GRAD: tl.constexpr, ALPHA: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    """ACTIVATION_GRAD: the activation's jit derivative (None: none, and S is not read). G and the
    saved S have the same strides (the launcher makes it so): one offset tile serves both."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tiles(M, BLOCK_M), tiles(K, BLOCK_K), GROUP)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    k0 = pid_k.to(tl.int64) * BLOCK_K
    rm = tl.arange(0, BLOCK_M).to(OFFSET_DTYPE)
    rk = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    rn = tl.arange(0, BLOCK_N).to(OFFSET_DTYPE)
    in_m = in_bounds(rm, m0, M, BLOCK_M)
    in_k = in_bounds(rk, k0, K, BLOCK_K)
    gs_tile = rm[:, None] * stride_gm + rn[None, :] * stride_gn
    w_tile = rn[:, None] * stride_wn + rk[None, :] * stride_wk
    g_base = g_ptr + m0 * stride_gm
    s_base = s_ptr + m0 * stride_gm
    w_base = w_ptr + k0 * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        in_n = rn < N - n0
        tile = in_m[:, None] & in_n[None, :]
        g = tl.load(g_base + gs_tile, mask=tile, other=0.0)
        if ACTIVATION_GRAD is not None:
            # Masked lanes load g = 0 and S = 0, and every derivative keeps g = 0 there.
            saved = tl.load(s_base + gs_tile, mask=tile, other=0.0)
            g = activation_grad(g, saved, ACTIVATION_GRAD, ALPHA)
        w = tl.load(w_base + w_tile, mask=in_n[:, None] & in_k[None, :], other=0.0)
        acc = mma(g, w, acc, DOT_PRECISION, UPCAST)
        g_base += tl.cast(stride_gn, tl.int64) * BLOCK_N
        s_base += tl.cast(stride_gn, tl.int64) * BLOCK_N
        w_base += tl.cast(stride_wn, tl.int64) * BLOCK_N

    dx_ptrs = dx_ptr + m0 * stride_dxm + k0 * stride_dxk + (rm[:, None] * stride_dxm + rk[None, :] * stride_dxk)
    tl.store(dx_ptrs, round_to(acc, dx_ptr.dtype.element_ty), mask=in_m[:, None] & in_k[None, :])


# ----------------------------------------------------------------------------------------------
# Backward dW = (G ⊙ act'(S))ᵀ X and db = Σ_rows (G ⊙ act'(S)), rows optionally split in chunks
# ----------------------------------------------------------------------------------------------
@triton.jit  # M is the reduction here: its divisibility hint keeps the row loop lean
def linear_act_grad_weight_kernel(
    g_ptr, s_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K, rows_per_split,
    stride_gm, stride_gn, stride_xm, stride_xk,
    stride_dw_split, stride_dwn, stride_dwk, stride_db_split,
    ACTIVATION_GRAD: tl.constexpr, ALPHA: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    OFFSET_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
):
    """Program (tile, split) reduces rows [split * rows_per_split, ...) into its own output slice."""
    if COMPUTE_DW:
        num_k_tiles = tiles(K, BLOCK_K)  # K >= 1 here: the launcher skips an empty dW
    else:
        num_k_tiles = 1  # db alone: one column tile per row chunk
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
    # G and S are read transposed, as [BLOCK_N, BLOCK_M] tiles: the left operand of (G ⊙ act')ᵀ X.
    gs_tile = rn[:, None] * stride_gn + rm[None, :] * stride_gm
    x_tile = rm[:, None] * stride_xm + rk[None, :] * stride_xk
    g_base = g_ptr + row_start * stride_gm + n0 * stride_gn
    s_base = s_ptr + row_start * stride_gm + n0 * stride_gn
    x_base = x_ptr + row_start * stride_xm + k0 * stride_xk

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_bias = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(0, rows_here, BLOCK_M):
        in_m = rm < rows_here - m0
        tile = in_n[:, None] & in_m[None, :]
        g = tl.load(g_base + gs_tile, mask=tile, other=0.0)
        if ACTIVATION_GRAD is not None:
            saved = tl.load(s_base + gs_tile, mask=tile, other=0.0)
            g = activation_grad(g, saved, ACTIVATION_GRAD, ALPHA)
        if COMPUTE_DW:
            x = tl.load(x_base + x_tile, mask=in_m[:, None] & in_k[None, :], other=0.0)
            acc = mma(g, x, acc, DOT_PRECISION, UPCAST)
        if COMPUTE_DB:
            acc_bias += tl.sum(g.to(ACC_DTYPE), axis=1)
        g_base += tl.cast(stride_gm, tl.int64) * BLOCK_M
        s_base += tl.cast(stride_gm, tl.int64) * BLOCK_M
        x_base += tl.cast(stride_xm, tl.int64) * BLOCK_M

    if COMPUTE_DW:
        dw_ptrs = (dw_ptr + split * stride_dw_split + n0 * stride_dwn + k0 * stride_dwk
                   + (rn[:, None] * stride_dwn + rk[None, :] * stride_dwk))
        tl.store(dw_ptrs, round_to(acc, dw_ptr.dtype.element_ty), mask=in_n[:, None] & in_k[None, :])
    if COMPUTE_DB:
        # Every column tile summed the same rows; the first one stores the bias gradient.
        if pid_k == 0:
            db_ptrs = db_ptr + split * stride_db_split + n0 + rn
            tl.store(db_ptrs, round_to(acc_bias, db_ptr.dtype.element_ty), mask=in_n)


@triton.jit
def reduce_partials_kernel(part_ptr, dw_ptr, db_ptr, chunks, row_length, dw_numel, db_numel,
                           BLOCK: tl.constexpr):
    """out[i] = Σ_c part[c, i] in a fixed order (c = 0, 1, ...), rounded once to the output dtype.

    The split dW kernel writes each chunk's fp32 partials as one row [dW (N*K) | db (N) | pad]:
    one launch sums and casts both, elements [0, dw_numel) into dW and the next db_numel into db.
    Rows are padded to a multiple of 16 elements, so that every load is 16-byte aligned; the
    padding is summed like the rest and never stored.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = offsets < row_length
    ptrs = part_ptr + offsets
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for _ in range(0, chunks):
        acc += tl.load(ptrs, mask=in_row, other=0.0)
        ptrs += row_length
    out_ptrs = tl.where(offsets < dw_numel, dw_ptr + offsets, db_ptr + (offsets - dw_numel))
    tl.store(out_ptrs, round_to(acc, dw_ptr.dtype.element_ty), mask=offsets < dw_numel + db_numel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _configs_and_key(name, tensor, precision, dims, activation, flags, torch_impl):
    """The candidates for one launch (TORCH_GEMM only when the caller gave a torch_impl) and the
    autotuner's cache key."""
    capability = _capability(tensor.device)
    bucket = tuning.bucket
    key = (name, tensor.device, capability, tensor.dtype, precision, flags, torch_impl is not None,
           bucket(dims[0]), bucket(dims[1]), bucket(dims[2]))
    configs = tuning.candidate_configs(tensor.dtype, precision, capability, name, activation)
    if torch_impl is None:
        # No torch alternative given: the Triton configs, even where TORCH_GEMM alone is shipped.
        configs = [c for c in configs if c is not tuning.TORCH_GEMM] or [
            c for c in tuning.candidate_configs(tensor.dtype, precision, capability)
            if c is not tuning.TORCH_GEMM]
    return configs, key


def _contiguous(t):
    """The launchers return new contiguous outputs, whatever torch_impl gave back."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _run_torch_impl(torch_impl, device: torch.device):
    """The caller's torch computation, autocast off: like the Triton configs it competes with, it
    must compute in the launcher's dtype even when a backward runs inside an autocast region."""
    with torch.autocast(device.type, enabled=False):
        return torch_impl()


@on_first_tensors_device
def linear_act_forward(x: torch.Tensor, weight: torch.Tensor, bias, activation: str, alpha: float,
                       save_preact: bool, allow_tf32: bool, torch_impl=None):
    """(Y, Z) for 2-D x [M, K]: Y = act(X Wᵀ + b), a new contiguous [M, N]; Z = X Wᵀ + b (same
    dtype, contiguous) if save_preact else None. torch_impl() returns the same pair."""
    M, K = x.shape
    N = weight.shape[0]
    dtype, device = x.dtype, x.device
    alpha = float(alpha)  # one compiled kernel per slope value, 0 and 0.0 alike
    acc, precision, upcast = _precision(dtype, allow_tf32)
    b = bias if bias is not None else weight  # never read when HAS_BIAS is False
    offset_dtype = _offset_dtype(x, weight, *([bias] if bias is not None else []))

    def launch(cfg):
        if cfg is tuning.TORCH_GEMM:
            y, z = _run_torch_impl(torch_impl, device)
            return _contiguous(y), (_contiguous(z) if save_preact else None)
        y = new_output((M, N), dtype=dtype, device=device)
        z = new_output((M, N), dtype=dtype, device=device) if save_preact else None
        grid = (cdiv(M, cfg.block_rows) * cdiv(N, cfg.block_cols),)
        linear_act_fwd_kernel[grid](
            x, weight, b, y, z if save_preact else y, M, N, K,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), b.stride(0),
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, ACTIVATION=forward_of(activation), ALPHA=alpha,
            SAVE_PREACT=save_preact,
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_M=cfg.block_rows, BLOCK_N=cfg.block_cols, BLOCK_K=cfg.block_red, GROUP=cfg.group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y, z

    if M == 0 or N == 0:
        y = new_output((M, N), dtype=dtype, device=device)
        return y, (new_output((M, N), dtype=dtype, device=device) if save_preact else None)
    configs, key = _configs_and_key("fwd", x, precision, (M, N, K), activation,
                                    (bias is not None, activation, alpha, save_preact), torch_impl)
    return launch(tuning.pick_config(key, configs, device, launch))


def _same_strides(grad: torch.Tensor, saved: torch.Tensor, activation: str):
    """The backward kernels address G and S with one offset tile: give them the same strides.
    For "none" S is never read (the kernel gets G in its place)."""
    if activation == "none":
        return grad, grad
    if grad.stride() != saved.stride():
        grad, saved = grad.contiguous(), saved.contiguous()
    return grad, saved


@on_first_tensors_device
def linear_act_grad_input(grad: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor,
                          activation: str, alpha: float, allow_tf32: bool, torch_impl=None):
    """dX = (G ⊙ act'(S)) W, a new contiguous [M, K]; S is the tensor the activation saves."""
    M, N = grad.shape
    K = weight.shape[1]
    dtype, device = grad.dtype, grad.device
    alpha = float(alpha)
    if M == 0 or K == 0:
        return new_output((M, K), dtype=dtype, device=device)
    acc, precision, upcast = _precision(dtype, allow_tf32)
    grad, saved = _same_strides(grad, saved, activation)
    offset_dtype = _offset_dtype(grad, weight)

    def launch(cfg):
        if cfg is tuning.TORCH_GEMM:
            return _contiguous(_run_torch_impl(torch_impl, device))
        dx = new_output((M, K), dtype=dtype, device=device)
        grid = (cdiv(M, cfg.block_rows) * cdiv(K, cfg.block_cols),)
        linear_act_grad_input_kernel[grid](
            grad, saved, weight, dx, M, N, K,
            grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
            dx.stride(0), dx.stride(1),
            ACTIVATION_GRAD=grad_of(activation), ALPHA=alpha, ACC_DTYPE=acc, DOT_PRECISION=precision,
            UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_M=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_N=cfg.block_red, GROUP=cfg.group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dx

    configs, key = _configs_and_key("dx", grad, precision, (M, N, K), activation,
                                    (activation, alpha), torch_impl)
    return launch(tuning.pick_config(key, configs, device, launch))


def choose_split(M: int, tiles: int, block_rows: int, device: torch.device) -> int:
    """How many row chunks dW uses: about one wave of programs (one per multiprocessor), each
    chunk >= 4 row tiles. More chunks than that only add partial sums to write and read back:
    a second wave runs after the first anyway."""
    wanted = max(1, _multiprocessors(device) // max(tiles, 1))
    most = max(1, cdiv(M, 4 * block_rows))
    return min(wanted, most)


_REDUCE_BLOCK = 1024


@on_first_tensors_device
def linear_act_grad_weight(grad: torch.Tensor, saved: torch.Tensor, x: torch.Tensor,
                           activation: str, alpha: float, compute_weight: bool, compute_bias: bool,
                           allow_tf32: bool, split: int = None, torch_impl=None):
    """(dW or None, db or None) from the same G ⊙ act'(S) tiles; deterministic.

    `split` fixes the number of row chunks (tests); by default it is chosen from the GPU size.
    """
    M, N = grad.shape
    K = x.shape[1]
    dtype, device = grad.dtype, grad.device
    alpha = float(alpha)
    if not (compute_weight or compute_bias):
        return None, None
    acc, precision, upcast = _precision(dtype, allow_tf32)
    grad, saved = _same_strides(grad, saved, activation)
    offset_dtype = _offset_dtype(grad, x, extra_strides=(K,))  # K: row stride of dW
    # An empty dW (K = 0) needs no kernel; without dW, one column tile per row chunk sums db and
    # X is never read.
    kernel_dw = compute_weight and K > 0

    def run(cfg, chunks: int):
        if cfg is tuning.TORCH_GEMM:
            dw, db = _run_torch_impl(torch_impl, device)
            return _contiguous(dw), _contiguous(db)
        tiles = cdiv(N, cfg.block_rows) * (cdiv(K, cfg.block_cols) if kernel_dw else 1)
        if chunks is None:
            chunks = choose_split(M, tiles, cfg.block_red, device) if M > 0 else 1
        rows_per_split = cdiv(cdiv(M, chunks), cfg.block_red) * cfg.block_red
        chunks = max(1, cdiv(M, rows_per_split)) if M > 0 else 1
        dw_numel = N * K if kernel_dw else 0
        if chunks == 1:  # the kernel writes dW and db in the output dtype directly
            dw = new_output((N, K) if kernel_dw else (1, 1), dtype=dtype, device=device)
            db = new_output((N,) if compute_bias else (1,), dtype=dtype, device=device)
            dw_part, db_part = dw[None], db[None]
        else:  # unrounded partials, one row [dW | db | pad] per chunk, for reduce_partials_kernel
            db_numel = N if compute_bias else 0
            row_length = cdiv(dw_numel + db_numel, 16) * 16
            part = new_output((chunks, row_length), dtype=acc_torch_dtype(acc), device=device)
            dw_part = part[:, :dw_numel].view(chunks, N, K) if kernel_dw else part[:, None]  # unused
            db_part = part[:, dw_numel:dw_numel + db_numel]
        linear_act_grad_weight_kernel[(tiles, chunks)](
            grad, saved, x, dw_part, db_part, M, N, K, rows_per_split,
            grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
            dw_part.stride(0), dw_part.stride(1), dw_part.stride(2), db_part.stride(0),
            ACTIVATION_GRAD=grad_of(activation), ALPHA=alpha, COMPUTE_DW=kernel_dw,
            COMPUTE_DB=compute_bias,
            ACC_DTYPE=acc, DOT_PRECISION=precision, UPCAST=upcast, OFFSET_DTYPE=offset_dtype,
            BLOCK_N=cfg.block_rows, BLOCK_K=cfg.block_cols, BLOCK_M=cfg.block_red, GROUP=cfg.group,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if chunks > 1:
            dw = new_output((N, K) if kernel_dw else (1,), dtype=dtype, device=device)
            db = new_output((N,) if compute_bias else (1,), dtype=dtype, device=device)
            reduce_partials_kernel[(cdiv(row_length, _REDUCE_BLOCK),)](
                part, dw, db, chunks, row_length, dw_numel, db_numel, BLOCK=_REDUCE_BLOCK)
        if compute_weight and not kernel_dw:
            dw = torch.zeros((N, K), dtype=dtype, device=device)  # K = 0: empty
        return (dw if compute_weight else None), (db if compute_bias else None)

    if N == 0 or not (kernel_dw or compute_bias):
        dw = torch.zeros((N, K), dtype=dtype, device=device)
        db = torch.zeros((N,), dtype=dtype, device=device)
    else:
        configs, key = _configs_and_key("dw", grad, precision, (M, N, K), activation,
                                        (activation, alpha, compute_weight, compute_bias), torch_impl)
        cfg = tuning.pick_config(key, configs, device, lambda c: run(c, split))
        dw, db = run(cfg, split)
    return (dw if compute_weight else None), (db if compute_bias else None)

