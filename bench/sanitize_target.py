"""A small fused forward and backward on CUDA, for compute-sanitizer (memcheck) to watch.

Odd shapes (edges in every tile dimension), with and without bias, ReLU and plain linear, the
three precisions; every result is compared with torch so that a silent wrong answer fails too.
Run as `python -m bench.sanitize_target`; exits non-zero on any mismatch.
"""

import sys

import torch

import fastmlp.functional as F_fast

SHAPES = ((37, 61, 53), (64, 1000, 100), (1, 16, 8))
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def check_one(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, relu: bool) -> str:
    gen = torch.Generator(device="cpu").manual_seed(m * k + n)
    make = lambda *shape: torch.randn(*shape, generator=gen).to("cuda", dtype).requires_grad_(True)
    x, w = make(m, k), make(n, k)
    b = make(n) if bias else None
    grad = torch.randn(m, n, generator=gen).to("cuda", dtype)
    y = (F_fast.linear_relu if relu else F_fast.linear)(x, w, b)
    y.backward(grad)
    got = [y, x.grad, w.grad] + ([b.grad] if bias else [])
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    br = b.detach().double().requires_grad_(True) if bias else None
    yr = torch.nn.functional.linear(xr, wr, br)
    yr = torch.relu(yr) if relu else yr
    yr.backward(grad.double())
    want = [yr, xr.grad, wr.grad] + ([br.grad] if bias else [])
    for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
        err = (g.double() - r).abs().max().item() / max(1.0, r.abs().max().item())
        if not err <= TOLERANCE[dtype]:
            return f"{name} off by {err:.3g} (m={m} k={k} n={n} {dtype} bias={bias} relu={relu})"
    return ""


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize target: no CUDA device")
        return 2
    failures = []
    for dtype in TOLERANCE:
        for m, k, n in SHAPES:
            for bias in (True, False):
                for relu in (True, False):
                    msg = check_one(m, k, n, dtype, bias, relu)
                    if msg:
                        failures.append(msg)
    torch.cuda.synchronize()
    for msg in failures:
        print("MISMATCH", msg)
    print(f"sanitize target: {'ok' if not failures else f'{len(failures)} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
