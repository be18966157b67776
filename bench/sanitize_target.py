"""A small fused forward and backward on CUDA, for compute-sanitizer (memcheck) to watch.

Odd shapes (edges in every tile dimension), with and without bias, ReLU and plain linear, the
three precisions; every result is compared with torch so that a silent wrong answer fails too.
Run as `python -m bench.sanitize_target`; exits non-zero on any mismatch.
"""

import argparse
import sys

import torch

import fastmlp.functional as F_fast

SHAPES = ((37, 61, 53), (64, 1000, 100), (1, 16, 8))
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def check_one(m: int, k: int, n: int, dtype: torch.dtype, bias: bool, relu: bool,
              device: str = "cuda") -> str:
    gen = torch.Generator(device="cpu").manual_seed(m * k + n)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(True)
    x, w = make(m, k), make(n, k)
    b = make(n) if bias else None
    grad = torch.randn(m, n, generator=gen).to(device, dtype)
    y = (F_fast.linear_relu if relu else F_fast.linear)(x, w, b)
    y.backward(grad)
    got = [y, x.grad, w.grad] + ([b.grad] if bias else [])
    # Reference in float64. The backward reference uses the mask of fastmlp's own output (Y > 0):
    # where a low-precision pre-activation rounds across zero, the float64 mask would differ and
    # turn a correct gradient into a false mismatch.
    x64, w64, g64 = x.detach().double(), w.detach().double(), grad.double()
    y64 = x64 @ w64.t() + (b.detach().double() if bias else 0)
    y64 = torch.relu(y64) if relu else y64
    if relu:
        g64 = g64 * (y.detach() > 0)
    want = [y64, g64 @ w64, g64.t() @ x64] + ([g64.sum(0)] if bias else [])
    for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
        err = (g.double() - r).abs().max().item() / max(1.0, r.abs().max().item())
        if not err <= TOLERANCE[dtype]:
            return f"{name} off by {err:.3g} (m={m} k={k} n={n} {dtype} bias={bias} relu={relu})"
    return ""


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--device", default="cuda", help="cuda (default); cpu checks this script itself")
    device = args.parse_args(argv).device
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize target: no CUDA device")
        return 2
    failures = []
    for dtype in TOLERANCE:
        for m, k, n in SHAPES:
            for bias in (True, False):
                for relu in (True, False):
                    msg = check_one(m, k, n, dtype, bias, relu, device)
                    if msg:
                        failures.append(msg)
    if device == "cuda":
        torch.cuda.synchronize()
    for msg in failures:
        print("MISMATCH", msg)
    print(f"sanitize target: {'ok' if not failures else f'{len(failures)} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
