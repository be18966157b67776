"""Small fused workloads on CUDA for compute-sanitizer to watch (stage 4 of the GPU check).

    python -m bench.sanitize_target [--mode memcheck|racecheck] [--device cuda|cpu]

memcheck (default): forward and backward of one fused layer on odd shapes (edges in every tile
dimension, M = 1), with and without bias, relu and none in fp32, fp16 and bf16, every other
activation of fastmlp.ACTIVATIONS on one odd shape, and fastmlp.SGD steps (plain and with
momentum, on CUDA or with --backend triton) on sizes with a partial last block. Out-of-bounds and misaligned accesses show up in
compute-sanitizer --tool memcheck.

racecheck: forward and backward of skinny layers (M = 8192 rows, N = K = 16: one output tile
under every shipped tile config, so the dW launcher splits the rows into chunks whose partial
sums are reduced afterwards), the path where programs of one kernel share the most work. It goes
through the public API, which keeps working while the kernel files are refactored; the split
itself is the launcher's choice (enough programs for two waves of the GPU's SMs).

Every result is compared with float64 torch (fastmlp.testing's reference, relative norm error
and tolerances), so a silent wrong answer fails too. Exits non-zero on any mismatch.
"""

import argparse
import sys

import torch

import fastmlp
import fastmlp.functional
from fastmlp import testing

MEMCHECK_SHAPES = ((37, 61, 53), (64, 1000, 100), (1, 16, 8))
RACECHECK_SHAPES = ((8192, 16, 16), (4099, 16, 8))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SGD_SHAPES = ((100, 1000), (100,), (4097,), (1,))


def _mismatch(got, want, tol):
    """'' if got matches want (fastmlp.testing.rel_err under tol, no NaN), else what differs."""
    if got is None:
        return "not computed"
    nan = int(torch.isnan(got).sum().item())
    if nan:
        return f"{nan} NaN element(s)"
    err = testing.rel_err(got, want)
    return "" if err < tol else f"relative error {err:.3e}"


def check_layer(m: int, k: int, n: int, dtype_name: str, bias: bool, activation: str,
                device: str) -> str:
    """'' if forward, dX, dW and db of one layer match float64 torch, else what differs."""
    dtype = DTYPES[dtype_name]
    tol = testing.TOLERANCE[dtype]
    gen = torch.Generator(device="cpu").manual_seed(m * k + n)
    x = torch.randn(m, k, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype).requires_grad_(True)
    b = torch.randn(n, generator=gen).to(device, dtype).requires_grad_(True) if bias else None
    grad = torch.randn(m, n, generator=gen).to(device, dtype)
    y = fastmlp.functional.linear_act(x, w, b, activation=activation)
    y.backward(grad)
    y64, dx64, dw64, db64 = testing.reference(x, w, b, activation, grad)
    pairs = [("y", y, y64), ("dx", x.grad, dx64), ("dw", w.grad, dw64)]
    if bias:
        pairs.append(("db", b.grad, db64))
    for name, got, want in pairs:
        why = _mismatch(got, want, tol)
        if why:
            return (f"{name}: {why} (tol {tol:g}; m={m} k={k} n={n} {dtype_name} bias={bias} "
                    f"{activation})")
    return ""


def check_sgd(dtype_name: str, device: str, momentum: float) -> str:
    """One fastmlp.SGD step (two with momentum) against the float64 update."""
    dtype = DTYPES[dtype_name]
    tol = testing.TOLERANCE[dtype]
    gen = torch.Generator(device="cpu").manual_seed(11)
    params = [torch.randn(*s, generator=gen).to(device, dtype).requires_grad_(True)
              for s in SGD_SHAPES]
    opt = fastmlp.SGD(params, lr=0.1, momentum=momentum)
    ref, bufs = [p.detach().double() for p in params], [None] * len(params)
    for _ in range(2 if momentum else 1):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
            g = p.grad.double()
            if momentum:
                bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
                g = bufs[i]
            ref[i] = ref[i] - 0.1 * g
        opt.step()
    got = torch.cat([p.detach().flatten() for p in params])
    why = _mismatch(got, torch.cat([r.flatten() for r in ref]), tol)
    if why:
        return f"SGD {dtype_name} momentum={momentum}: {why} (tol {tol:g})"
    return ""


def memcheck_cases():
    activations = list(fastmlp.ACTIVATIONS)
    for dtype in DTYPES:
        for m, k, n in MEMCHECK_SHAPES:
            for bias in (True, False):
                for activation in ("relu", "none"):
                    yield (m, k, n, dtype, bias, activation)
    for activation in activations:
        if activation not in ("relu", "none"):
            for dtype in ("fp32", "bf16"):
                yield (37, 61, 53, dtype, True, activation)


def racecheck_cases():
    for dtype in ("fp32", "bf16"):
        for m, k, n in RACECHECK_SHAPES:
            yield (m, k, n, dtype, True, "relu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default); cpu checks this script itself")
    p.add_argument("--mode", choices=("memcheck", "racecheck"), default="memcheck")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="fastmlp backend (auto: the Triton kernels on CUDA)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize target: no CUDA device")
        return 2
    failures, count = [], 0
    cases = memcheck_cases() if args.mode == "memcheck" else racecheck_cases()
    with fastmlp.use_backend(args.backend):
        for case in cases:
            count += 1
            try:
                msg = check_layer(*case, device=args.device)
            except Exception as exc:  # a launch error under the sanitizer is a finding
                msg = f"{case}: {type(exc).__name__}: {exc}"
            if msg:
                failures.append(msg)
        # The SGD rows are for fastmlp's Triton SGD kernel; on CPU with the auto backend the
        # step is torch's own CPU kernel, which is no sanitizer material.
        sgd_runs = args.mode == "memcheck" and (args.device == "cuda" or args.backend == "triton")
        for dtype in ("fp32", "bf16") if sgd_runs else ():
            for momentum in (0.0, 0.9):
                count += 1
                msg = check_sgd(dtype, args.device, momentum)
                if msg:
                    failures.append(msg)
    if args.mode == "memcheck" and not sgd_runs:
        print("sanitize target: SGD not checked (no Triton SGD kernel on this device/backend)")
    if args.device == "cuda":
        torch.cuda.synchronize()
    for msg in failures:
        print("MISMATCH", msg)
    print(f"sanitize target ({args.mode}): {count} checks, "
          f"{'ok' if not failures else f'{len(failures)} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
