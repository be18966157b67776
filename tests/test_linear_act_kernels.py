"""The kernel launchers themselves: every activation through the three kernels (called directly,
against float64 torch), row split of dW, determinism, fp32 precision, poisoning, offsets, the
autotuner's choice logic."""

import pytest
import torch
import triton
import triton.language as tl

from fastmlp import activations
from fastmlp import functional as F
from fastmlp.kernels import debug, linear_act as kernels
from fastmlp.kernels.launch import round_to
from reference import assert_close, reference

pytestmark = pytest.mark.usefixtures("triton_backend")


def _problem(M, K, N, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device, dtype)
    b = torch.randn(N, generator=gen).to(device, dtype)
    g = torch.randn(M, N, generator=gen).to(device, dtype)
    return x, w, b, g


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_grad_weight_row_split(device, split):
    x, w, b, g = _problem(150, 40, 36, device)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    dw, db = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=split)
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert_close(dw, rdw, torch.float32, f"dW split={split}")
    assert_close(db, rdb, torch.float32, f"db split={split}")


@pytest.mark.parametrize("compute_weight,compute_bias", [(True, False), (False, True)])
def test_grad_weight_only_what_is_asked(device, compute_weight, compute_bias):
    x, w, b, g = _problem(45, 19, 27, device)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    dw, db = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, compute_weight, compute_bias, False, split=2)
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert (dw is None) != compute_weight and (db is None) != compute_bias
    if compute_weight:
        assert_close(dw, rdw, torch.float32, "dW")
    if compute_bias:
        assert_close(db, rdb, torch.float32, "db")


@pytest.mark.parametrize("split", [None, 3])
def test_grad_weight_is_deterministic(device, split):
    x, w, b, g = _problem(300, 48, 40, device, dtype=torch.float16)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    first = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=split)
    for _ in range(2):
        again = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=split)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_split_choice_fills_the_gpu_and_keeps_chunks_long():
    cpu = torch.device("cpu")
    assert kernels.choose_split(64, 4, 32, cpu) == 1  # few rows: no split
    assert kernels.choose_split(65536, 1, 32, cpu) == 4  # one wave: 4 "multiprocessors" on CPU
    assert kernels.choose_split(65536, 2, 32, cpu) == 2
    assert kernels.choose_split(65536, 100, 32, cpu) == 1  # enough tiles already
    assert kernels.choose_split(200, 1, 32, cpu) == 2  # chunks of >= 4 row tiles


class _KernelSpy:
    """Stands in for a jit kernel: records launch arguments, optionally drops the last program."""

    def __init__(self, kernel, drop_last_program=False):
        self.kernel, self.drop, self.launches = kernel, drop_last_program, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            g = tuple(grid)
            if self.drop:
                g = (g[0] - 1,) + g[1:]
            return self.kernel[g](*args, **kwargs)
        return launch


@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_follows_torch_matmul_precision(device, monkeypatch, precision, expected):
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        F.linear_relu(*_problem(8, 8, 8, device)[:3])
    finally:
        torch.set_float32_matmul_precision(previous)
    assert spy.launches[-1]["DOT_PRECISION"] == expected


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this torch has no fp32_precision API")
@pytest.mark.parametrize("setting,expected", [("tf32", "tf32"), ("ieee", "ieee")])
def test_fp32_follows_the_newer_precision_api(device, monkeypatch, setting, expected):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" makes get_float32_matmul_precision()
    raise; fastmlp reads the setting in a way that works with either API."""
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = setting
    try:
        F.linear_relu(*_problem(8, 8, 8, device)[:3])
    finally:
        matmul.fp32_precision = previous
    assert spy.launches[-1]["DOT_PRECISION"] == expected


def test_poisoned_outputs_catch_an_unwritten_tile(device, monkeypatch):
    """With one program dropped, the NaN poison shows up: the net the other tests rely on works."""
    assert debug.POISON_OUTPUTS
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel",
                        _KernelSpy(kernels.linear_act_fwd_kernel, drop_last_program=True))
    x, w, b, _ = _problem(70, 20, 40, device)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    assert torch.isnan(y).any()


def test_int64_tile_offsets_path(device, monkeypatch):
    """The int64 tile-offset variant (used when a stride is huge) computes the same results."""
    monkeypatch.setattr(kernels, "_offset_dtype", lambda *a, **k: tl.int64)
    x, w, b, g = _problem(37, 29, 33, device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = F.linear_relu(x, w, b)
    y.backward(g)
    ry, rdx, rdw, rdb = reference(x, w, b, "relu", g)
    for got, ref, name in ((y, ry, "y"), (x.grad, rdx, "dX"), (w.grad, rdw, "dW"), (b.grad, rdb, "db")):
        assert_close(got, ref, torch.float32, name)


def test_offset_dtype_switches_for_huge_strides():
    class Fake:
        def __init__(self, *strides):
            self._s = strides

        def stride(self):
            return self._s

    assert kernels._offset_dtype(Fake(1024, 1)) == tl.int32
    assert kernels._offset_dtype(Fake(2**23, 1)) == tl.int64
    assert kernels._offset_dtype(Fake(1, 1), extra_strides=(2**23,)) == tl.int64


def test_huge_bias_stride_takes_int64_offsets(device, monkeypatch):
    """A bias viewed with a stride of 2**23 elements: rn * stride_b passes int32 within a tile,
    so the forward launch takes int64 tile offsets, and reads the right elements."""
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    stride, N = 2**23, 3
    storage = torch.randn((N - 1) * stride + 1, device=device)
    b = storage.as_strided((N,), (stride,))
    x, w, _, _ = _problem(5, 7, N, device)
    y = F.linear_relu(x, w, b)
    assert spy.launches[-1]["OFFSET_DTYPE"] == tl.int64
    want = torch.relu(x.double().cpu() @ w.double().cpu().t() + b.double().cpu())
    assert_close(y, want, torch.float32, "y")


@pytest.mark.gpu
def test_int64_addressing_past_2_pow_31_elements():
    """X with more than 2**31 elements: rows past the int32 range are computed correctly."""
    M, K, N = 2**21 + 3, 1024, 16
    x = torch.empty(M, K, device="cuda", dtype=torch.float16)
    x[:-8].fill_(0.01)
    x[-8:] = torch.randn(8, K, device="cuda", dtype=torch.float16)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16) / 32
    y, _ = kernels.linear_act_forward(x, w, None, "relu", 0.0, False, False)
    ref = torch.relu(x[-8:].double() @ w.double().t())
    assert_close(y[-8:], ref, torch.float16, "last rows")


@pytest.mark.gpu
def test_autotuned_configs_agree(monkeypatch):
    """With autotuning on, whatever config wins gives a correct result (several bucketed shapes)."""
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    for M, K, N in ((64, 1000, 100), (4096, 256, 256), (513, 777, 129)):
        x, w, b, g = _problem(M, K, N, "cuda", dtype=torch.bfloat16)
        x, w, b = (t.requires_grad_() for t in (x, w, b))
        y = F.linear_relu(x, w, b)
        y.backward(g)
        ry, rdx, rdw, rdb = reference(x, w, b, "relu", g)
        for got, ref, name in ((y, ry, "y"), (x.grad, rdx, "dX"), (w.grad, rdw, "dW"), (b.grad, rdb, "db")):
            assert_close(got, ref, torch.bfloat16, f"{M}x{K}->{N} {name}")


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_gemm_candidate_matches(device, monkeypatch, activation, bias):
    """The unfused cuBLAS candidate the GPU autotuner may pick computes the same function."""
    from fastmlp.kernels import tuning

    picked = []
    monkeypatch.setattr(tuning, "pick_config",
                        lambda key, candidates, dev, run: picked.append(key[0]) or tuning.TORCH_GEMM)
    x, w, b, g = _problem(41, 30, 22, device)
    b = b if bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fn = F.linear_relu if activation == "relu" else F.linear
    y = fn(x, w, b)
    y.backward(g)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, g)
    assert sorted(set(picked)) == ["dw", "dx", "fwd"]
    for got, ref, name in ((y, ry, "y"), (x.grad, rdx, "dX"), (w.grad, rdw, "dW")):
        assert_close(got, ref, torch.float32, name)
    if bias:
        assert_close(b.grad, rdb, torch.float32, "db")
    assert len(leaves) == 3 if bias else 2


def test_torch_gemm_candidate_ignores_autocast_in_backward(device, monkeypatch):
    """An fp32 layer whose backward runs inside an autocast region (loss.backward() under
    autocast, which PyTorch discourages but allows) still gets fp32-exact gradients."""
    from fastmlp.kernels import tuning

    monkeypatch.setattr(tuning, "pick_config", lambda key, candidates, dev, run: tuning.TORCH_GEMM)
    x, w, b, g = _problem(41, 30, 22, device)
    w.requires_grad_()
    b.requires_grad_()
    y = F.linear_relu(x, w, b)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=low):
        y.backward(g)
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert w.grad.dtype == b.grad.dtype == torch.float32
    assert_close(w.grad, rdw, torch.float32, "dW")
    assert_close(b.grad, rdb, torch.float32, "db")


def test_gpu_candidates_end_with_the_torch_gemm(monkeypatch):
    from fastmlp.kernels import tuning

    monkeypatch.setattr(tuning, "_INTERPRET", False)  # the lists a compiled (GPU) run gets
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
        for capability in ((8, 0), (9, 0)):
            configs = tuning.candidate_configs(dtype, precision, capability)
            assert configs[-1] is tuning.TORCH_GEMM and configs[0] is not tuning.TORCH_GEMM
            assert all(isinstance(c, tuning.TileConfig) for c in configs[:-1])


class _FakeCuda:
    type = "cuda"


def test_autotuner_times_every_candidate_skips_misfits_and_caches(monkeypatch):
    """pick_config's choice logic (it runs only on GPUs), with timings faked."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    from fastmlp.kernels import tuning

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setattr(tuning, "_best", {})
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg == "too-big":
            raise OutOfResources(300000, 232448, "shared memory")
        return times[cfg]

    candidates = ["a", "too-big", "b", "c"]
    assert tuning.pick_config(("k",), candidates, _FakeCuda(), run) == "b"
    assert calls == candidates
    assert tuning.pick_config(("k",), candidates, _FakeCuda(), run) == "b"  # cached: no timing
    assert len(calls) == 4

    monkeypatch.setattr(tuning, "_capturing", lambda device: True)  # inside CUDA-graph capture
    assert tuning.pick_config(("k2",), candidates, _FakeCuda(), run) == "a" and ("k2",) not in tuning._best
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "0")
    assert tuning.pick_config(("k3",), candidates, _FakeCuda(), run) == "a" and len(calls) == 4

    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    with pytest.raises(RuntimeError, match="no kernel config fits"):
        tuning.pick_config(("k4",), ["too-big", "too-big"], _FakeCuda(), run)
    with pytest.raises(ZeroDivisionError):  # any other failure is a bug: it propagates
        tuning.pick_config(("k5",), ["a", "b"], _FakeCuda(), lambda cfg: 1 / 0)


def test_autotuner_does_not_time_across_dtensor_ranks(monkeypatch):
    """With DTensor in use on more than one rank, every rank takes the default config without
    timing (each would pick its own, and Replicate results would differ between ranks)."""
    import sys
    import types

    import triton.testing

    from fastmlp.kernels import tuning

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setattr(tuning, "_best", {})
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor",
                        sys.modules.get("torch.distributed.tensor", types.ModuleType("stand-in")))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    calls = []
    for world, expected in ((2, "a"), (1, "b")):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None, w=world: w)
        assert tuning.ranks_must_agree() == (world > 1)
        got = tuning.pick_config(("k", world), ["a", "b"], _FakeCuda(),
                                 lambda cfg: calls.append(cfg) or {"a": 2.0, "b": 1.0}[cfg])
        assert got == expected
    assert calls == ["a", "b"]   # timed only on the single rank


def test_shape_buckets():
    from fastmlp.kernels import tuning

    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 64, 65, 1000, 1024)] == [0, 1, 2, 4, 64, 128, 1024, 1024]


def test_launchers_run_under_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: a launcher given cuda:1 tensors while cuda:0 is
    current must switch to cuda:1 first (checked with the CUDA calls stubbed out)."""
    from fastmlp.kernels import launch

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class FakeTensor:
        def __init__(self, device):
            self.device = torch.device(device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    wrapped = launch.on_first_tensors_device(lambda t, *a: "launched")
    assert wrapped(FakeTensor("cuda:1")) == "launched" and entered == [torch.device("cuda:1")]
    assert wrapped(FakeTensor("cuda:0")) == "launched" and len(entered) == 1  # already current
    assert wrapped(FakeTensor("cpu")) == "launched" and len(entered) == 1
    for name in ("linear_act_forward", "linear_act_grad_input", "linear_act_grad_weight"):
        assert getattr(kernels, name).__wrapped__ is not None  # every launcher is guarded


def test_autotune_off_means_the_default_config_even_after_a_cached_pick(monkeypatch):
    """FASTMLP_AUTOTUNE=0 is checked before the cache: a pick made while autotuning was on (an
    earlier test in the same process) must not leak into a run that asked for the default."""
    from fastmlp.kernels import tuning

    monkeypatch.setattr(tuning, "_best", {("k",): "fast"})
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "0")
    assert tuning.pick_config(("k",), ["default", "fast"], _FakeCuda(), lambda c: 0) == "default"
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    assert tuning.pick_config(("k",), ["default", "fast"], _FakeCuda(), lambda c: 0) == "fast"


# ----------------------------------------------------------------------------------------------
# Every activation through the three kernels, called directly (torch_impl=None: no torch path)
# ----------------------------------------------------------------------------------------------
# (name, alpha) for every row of the table at its default parameter, plus leaky_relu with a
# negative slope, which saves Z instead of Y (its output no longer tells Z's sign).
ACTIVATION_CASES = [(name, activations.get(name).default_alpha) for name in activations.ACTIVATIONS]
ACTIVATION_CASES.append(("leaky_relu", -0.5))
ACTIVATION_IDS = [name if name != "leaky_relu" else f"leaky_relu{alpha:g}" for name, alpha in ACTIVATION_CASES]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _ref_forward(x, w, b, name, alpha):
    """(Y, Z) in float64 with torch's own ops."""
    z = x.double().cpu() @ w.double().cpu().t()
    if b is not None:
        z = z + b.double().cpu()
    return activations.get(name).torch_forward(z, alpha), z


def _saved(name, alpha, y, z, g):
    """What backward reads for this activation: Y, Z, or (for "none") G itself, never read."""
    return {"output": y, "preact": z, "nothing": g}[activations.get(name).saves(alpha)]


def _ref_dz(g, saved, name, alpha):
    return activations.get(name).torch_backward(g.double().cpu(), saved.double().cpu(), alpha)


def _check_backward(g, saved, x, w, name, alpha, dtype, splits=(1, 3)):
    """dX and dW + db from the kernels against float64 torch for one (G, S)."""
    dz = _ref_dz(g, saved, name, alpha)
    dx = kernels.linear_act_grad_input(g, saved, w, name, alpha, False)
    assert dx.dtype == dtype and dx.is_contiguous()
    assert_close(dx, dz @ w.double().cpu(), dtype, f"{name} dX")
    for split in splits:
        dw, db = kernels.linear_act_grad_weight(g, saved, x, name, alpha, True, True, False, split=split)
        assert dw.dtype == db.dtype == dtype
        assert_close(dw, dz.t() @ x.double().cpu(), dtype, f"{name} dW split={split}")
        assert_close(db, dz.sum(0), dtype, f"{name} db split={split}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name,alpha", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_kernels_match_float64_torch(device, monkeypatch, name, alpha, dtype):
    """Forward with and without Z, dX, dW + db with and without a row split, every activation and
    dtype: odd sizes (37 rows, K = 29, N = 33) leave partial tiles on every edge."""
    spy = _KernelSpy(kernels.linear_act_fwd_kernel)
    monkeypatch.setattr(kernels, "linear_act_fwd_kernel", spy)
    x, w, b, g = _problem(37, 29, 33, device, dtype=dtype, seed=1)
    ry, rz = _ref_forward(x, w, b, name, alpha)

    y, z = kernels.linear_act_forward(x, w, b, name, alpha, True, False)
    assert spy.launches[-1]["SAVE_PREACT"] is True
    assert y.dtype == z.dtype == dtype and y.is_contiguous() and z.is_contiguous()
    assert_close(y, ry, dtype, f"{name} Y")
    assert_close(z, rz, dtype, f"{name} Z")
    y_only, no_z = kernels.linear_act_forward(x, w, b, name, alpha, False, False)
    assert no_z is None and spy.launches[-1]["SAVE_PREACT"] is False  # no second store
    assert torch.equal(y_only, y)

    # The backward reads the saved tensor as the layer would have stored it (rounded to dtype).
    saved = _saved(name, alpha, ry, rz, g).to(device, dtype)
    _check_backward(g, saved, x, w, name, alpha, dtype)


@pytest.mark.parametrize("name,alpha", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_kernels_without_bias_and_at_odd_sizes(device, name, alpha):
    """No bias; a single row, a single input feature, a single output feature, primes."""
    for M, K, N in ((1, 7, 5), (13, 1, 3), (11, 17, 1)):
        x, w, _, g = _problem(M, K, N, device, seed=M)
        ry, rz = _ref_forward(x, w, None, name, alpha)
        y, z = kernels.linear_act_forward(x, w, None, name, alpha, True, False)
        assert_close(y, ry, torch.float32, f"{name} Y {M}x{K}->{N}")
        assert_close(z, rz, torch.float32, f"{name} Z {M}x{K}->{N}")
        saved = _saved(name, alpha, ry, rz, g).to(device, torch.float32)
        _check_backward(g, saved, x, w, name, alpha, torch.float32, splits=(1, 2))


def _integer_problem(M, K, N, device, dtype, seed=0):
    """Small integers: every product and sum is exact in any dtype here, and Z has many exact 0s."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (M, K), generator=gen).to(device, dtype)
    w = torch.randint(-1, 2, (N, K), generator=gen).to(device, dtype)
    b = torch.randint(-1, 2, (N,), generator=gen).to(device, dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,alpha", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_at_preactivation_exactly_zero(device, name, alpha, dtype):
    """Z exactly 0 where torch's formulas have their corner (relu's gradient is 0 there, not 1;
    leaky_relu's is the slope): the forward's value and the derivative there equal torch's bit for
    bit. With W = I the dX kernel returns G ⊙ act'(S) itself, and with X = I the dW kernel returns
    its transpose, so the derivative is compared element by element."""
    M, K, N = 40, 9, 24
    x, w, b = _integer_problem(M, K, N, device, dtype)
    y, z = kernels.linear_act_forward(x, w, b, name, alpha, True, False)
    ry, rz = _ref_forward(x, w, b, name, alpha)
    at_zero = rz == 0
    assert 50 < int(at_zero.sum()) < at_zero.numel() // 2  # a fair share of exact zeros
    assert torch.equal(z.double().cpu(), rz)  # integers: exact
    want_y = ry.to(dtype)
    assert torch.equal(y.cpu()[at_zero], want_y[at_zero])
    assert_close(y, ry, dtype, f"{name} Y")

    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    saved = _saved(name, alpha, want_y.to(device), z, g)
    # At Z == 0 compared with torch's op in the same dtype (its fp32 opmath: leaky_relu's
    # g * slope rounds the slope to fp32 first, as the kernels do), elsewhere with float64.
    want_dz = activations.get(name).torch_backward(g.cpu(), saved.cpu(), alpha)
    eye_n = torch.eye(N, device=device, dtype=dtype)
    dz = kernels.linear_act_grad_input(g, saved, eye_n, name, alpha, False)
    _assert_equal_at(dz, want_dz, at_zero, dtype, f"{name}: dX at Z == 0")
    assert_close(dz, _ref_dz(g, saved, name, alpha), dtype, f"{name} G ⊙ act'")
    eye_m = torch.eye(M, device=device, dtype=dtype)
    for split in (1, 2):
        dzt, _ = kernels.linear_act_grad_weight(g, saved, eye_m, name, alpha, True, False, False,
                                                split=split)
        _assert_equal_at(dzt.t(), want_dz, at_zero, dtype, f"{name}: dW at Z == 0, split={split}")


def _assert_equal_at(actual, expected, where, dtype, what):
    """Bit-equal at `where`; except that the interpreter's fp32 -> bf16 cast truncates (a GPU's
    cvt.rn rounds to nearest, as torch does), so under it a bf16 value that is not exact
    (leaky_relu's g * slope) may be one bf16 ulp off. Exact values (0, g / 2, ...) stay exact."""
    actual, expected = actual.cpu()[where], expected.cpu()[where]
    if dtype == torch.bfloat16 and tuning_interpreter():
        ok = torch.isclose(actual.float(), expected.float(), rtol=2.0 ** -7, atol=0.0).all()
    else:
        ok = torch.equal(actual, expected)
    assert ok, f"{what}: {actual} != {expected}"


def tuning_interpreter() -> bool:
    from fastmlp.kernels import tuning

    return tuning.interpreter_enabled()


def _assert_same_with_nan(actual, expected, dtype, what):
    """NaN exactly where expected has NaN, ±inf where it has ±inf, the rest within tolerance."""
    actual = actual.detach().double().cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN positions differ"
    inf = torch.isinf(expected)
    assert torch.equal(actual[inf], expected[inf]), f"{what}: ±inf differ"
    finite = ~(nan | inf)
    assert torch.isfinite(actual[finite]).all(), f"{what}: inf/NaN where torch has a number"
    assert_close(actual[finite], expected[finite], dtype, what)


@pytest.mark.parametrize("name,alpha", ACTIVATION_CASES, ids=ACTIVATION_IDS)
def test_activation_nan_and_inf_like_torch(device, name, alpha):
    """NaN and ±inf through each kernel come out where torch's ops put them (relu keeps NaN: a
    max(z, 0) would drop it on the GPU)."""
    M, K, N = 9, 6, 10
    x, w, b, g = _problem(M, K, N, device, seed=3)
    x[1, 2] = float("nan")
    x[4, 0] = float("inf")
    x[6, 3] = float("-inf")
    y, z = kernels.linear_act_forward(x, w, b, name, alpha, True, False)
    ry, rz = _ref_forward(x, w, b, name, alpha)
    _assert_same_with_nan(z, rz, torch.float32, f"{name} Z")
    _assert_same_with_nan(y, ry, torch.float32, f"{name} Y")

    # Backward: NaN and ±inf in the saved tensor and in G, finite elsewhere.
    _, rz = _ref_forward(*_problem(M, K, N, device, seed=4)[:3], name, alpha)
    saved = _saved(name, alpha, activations.get(name).torch_forward(rz, alpha), rz, g).float().to(device)
    saved = saved.clone()
    saved[0, 1], saved[2, 3], saved[5, 7] = float("nan"), float("inf"), float("-inf")
    g = g.clone()
    g[3, 0], g[7, 4], g[8, 9] = float("nan"), float("inf"), float("-inf")
    want_dz = _ref_dz(g, saved, name, alpha)
    # Element by element: G and S as one column with W = [[1]] (dX = G ⊙ act'(S)), and as one
    # row with X = [[1]] (dW = (G ⊙ act'(S))ᵀ, db = G ⊙ act'(S)).
    one = torch.ones(1, 1, device=device)
    column, row = (lambda t: t.reshape(-1, 1)), (lambda t: t.reshape(1, -1))
    dz = kernels.linear_act_grad_input(column(g), column(saved), one, name, alpha, False)
    _assert_same_with_nan(dz, column(want_dz), torch.float32, f"{name} dX = G ⊙ act'(S)")
    dzt, dzb = kernels.linear_act_grad_weight(row(g), row(saved), one, name, alpha, True, True, False)
    _assert_same_with_nan(dzt, column(want_dz), torch.float32, f"{name} dW = (G ⊙ act'(S))ᵀ")
    _assert_same_with_nan(dzb, want_dz.reshape(-1), torch.float32, f"{name} db = G ⊙ act'(S)")
    # And through real products and a row split: NaN and inf spread as IEEE says.
    xf = x.nan_to_num(0.5, 1.0, -1.0)
    dx = kernels.linear_act_grad_input(g, saved, w, name, alpha, False)
    _assert_same_with_nan(dx, want_dz @ w.double().cpu(), torch.float32, f"{name} dX")
    for split in (1, 3):
        dw, db = kernels.linear_act_grad_weight(g, saved, xf, name, alpha, True, True, False, split=split)
        _assert_same_with_nan(db, want_dz.sum(0), torch.float32, f"{name} db split={split}")
        _assert_same_with_nan(dw, want_dz.t() @ xf.double().cpu(), torch.float32, f"{name} dW split={split}")


@pytest.mark.parametrize("name,alpha", [("gelu", 0.0), ("sigmoid", 0.0), ("leaky_relu", -0.5)],
                         ids=["gelu", "sigmoid", "leaky_relu-0.5"])
def test_activation_kernels_take_strided_and_transposed_operands(device, name, alpha):
    """Transposed X, W and G, a strided bias, a saved tensor with other strides than G (the
    launchers then give both the same layout): no copies assumed by the kernels."""
    M, K, N = 23, 19, 17
    x, w, b, g = _problem(M, K, N, device, seed=5)
    xt = x.t().contiguous().t()                       # column-major X
    wt = w.t().contiguous().t()                       # column-major W
    bs = torch.stack([b, torch.full_like(b, float("nan"))], 1)[:, 0]  # stride 2, NaN between
    gt = g.t().contiguous().t()                       # column-major G
    y, z = kernels.linear_act_forward(xt, wt, bs, name, alpha, True, False)
    ry, rz = _ref_forward(x, w, b, name, alpha)
    assert_close(y, ry, torch.float32, f"{name} Y")
    assert_close(z, rz, torch.float32, f"{name} Z")
    saved = _saved(name, alpha, ry, rz, g).float().to(device)  # row-major, G column-major
    _check_backward(gt, saved, xt, wt, name, alpha, torch.float32, splits=(1, 2))
    sliced = torch.cat([saved, saved], 1)[:, :N]      # row stride 2N
    _check_backward(g, sliced, xt, wt, name, alpha, torch.float32, splits=(2,))


def test_split_partials_are_reduced_and_cast_in_one_launch(device, monkeypatch):
    """Split dW + db: one reduction launch for both (fixed order), none without a split."""
    spy = _KernelSpy(kernels.reduce_partials_kernel)
    monkeypatch.setattr(kernels, "reduce_partials_kernel", spy)
    x, w, b, g = _problem(150, 40, 36, device, dtype=torch.float16)
    y, _ = kernels.linear_act_forward(x, w, b, "relu", 0.0, False, False)
    kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=1)
    assert spy.launches == []
    dw, db = kernels.linear_act_grad_weight(g, y, x, "relu", 0.0, True, True, False, split=3)
    assert len(spy.launches) == 1
    assert dw.dtype == db.dtype == torch.float16
    _, _, rdw, rdb = reference(x, w, b, "relu", g)
    assert_close(dw, rdw, torch.float16, "dW")
    assert_close(db, rdb, torch.float16, "db")


def test_torch_impl_is_a_candidate_only_when_given(device, monkeypatch):
    """TORCH_GEMM is timed only when the caller passes torch_impl; when picked, the launcher
    returns torch_impl's result(s), made contiguous."""
    from fastmlp.kernels import tuning

    seen = []

    def pick(key, candidates, dev, run):
        seen.append(list(candidates))
        return tuning.TORCH_GEMM if tuning.TORCH_GEMM in candidates else candidates[0]

    monkeypatch.setattr(tuning, "candidate_configs",
                        lambda *a: [tuning._INTERPRETER[0], tuning.TORCH_GEMM])
    monkeypatch.setattr(tuning, "pick_config", pick)
    x, w, b, g = _problem(12, 10, 8, device)
    marker_y = torch.full((8, 12), 3.0, device=device).t()  # not contiguous
    marker_z = torch.full((12, 8), 4.0, device=device)
    y, z = kernels.linear_act_forward(x, w, b, "gelu", 0.0, True, False,
                                      torch_impl=lambda: (marker_y, marker_z))
    assert tuning.TORCH_GEMM in seen[-1] and y.is_contiguous() and torch.equal(y, marker_y)
    assert z is marker_z
    dx = kernels.linear_act_grad_input(g, z, w, "gelu", 0.0, False, torch_impl=lambda: marker_z[:, :10])
    assert torch.equal(dx, marker_z[:, :10]) and dx.is_contiguous()
    dw, db = kernels.linear_act_grad_weight(g, z, x, "gelu", 0.0, True, True, False,
                                            torch_impl=lambda: (marker_y[:8, :10], marker_z[0, :8]))
    assert torch.equal(dw, marker_y[:8, :10]) and torch.equal(db, marker_z[0, :8])

    y, z = kernels.linear_act_forward(x, w, b, "gelu", 0.0, True, False)  # no torch_impl
    dx = kernels.linear_act_grad_input(g, z, w, "gelu", 0.0, False)
    kernels.linear_act_grad_weight(g, z, x, "gelu", 0.0, True, True, False)
    assert all(tuning.TORCH_GEMM not in c for c in seen[-3:])
    ry, rz = _ref_forward(x, w, b, "gelu", 0.0)
    assert_close(y, ry, torch.float32, "Y from the Triton config")


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(y_ptr + offsets, round_to(x, y_ptr.dtype.element_ty), mask=mask)


def test_round_to_is_round_to_nearest_even(device):
    """launch.round_to, which every narrowing store and cast in the kernels goes through, gives
    torch's (round to nearest even) bf16 and fp16 for random values, ties, NaN, ±inf, values
    that round up into the next binade and past bf16's largest finite value. Under the
    interpreter this is the bit-level rounding (its own fp32 -> bf16 cast truncates)."""
    gen = torch.Generator().manual_seed(13)
    ulp_halves = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -9,
                               2.0 - 2.0 ** -9, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11])
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), float("-inf"),
                            3.3895313892515355e38, 3.4028234e38, -3.4028234e38, 65504.0, 65520.0,
                            1e-40, -1e-45])
    x = torch.cat([torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-6, 6, (4096,), generator=gen),
                   ulp_halves, -ulp_halves, special]).to(device)
    for dtype in (torch.bfloat16, torch.float16):
        y = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
        _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
        expected = x.to(dtype)
        same = (y == expected) | (y.isnan() & expected.isnan())
        assert bool(same.all()), f"{dtype}: {int((~same).sum())} values differ, first at " \
                                 f"{x[~same][:4].tolist()}"
