"""pytest-benchmark: the gated op (fastmlp.functional.gated_linear, fastmlp/gated.py) alone and
in Llama-7B's MLP block (4096 -> 11008 -> 4096, SwiGLU, bf16), also with the gate and up weights
packed as Phi-3 packs them: fastmlp against eager torch, torch.compile and Liger-Kernel's
LigerSwiGLUMLP (where it is installed), forward and forward+backward.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
The Llama-7B rows are GPU-only: on a CPU this file is one skipped test saying so, and
--bench-tiny runs the same rows at toy sizes.
"""

from bench import harness

KINDS = ("gated",)
WORKLOADS = ("gated-linear", "gated-mlp", "gated-mlp-packed")


def test_gated_mlp(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
