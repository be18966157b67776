"""pytest-benchmark: FusedMLP (fastmlp/nn.py; its op fastmlp/mlp_ops.py) on narrow MLPs (in -> 4
hidden layers -> out, tiny-cuda-nn's class): its dispatcher's pick, the fully fused path and the per-layer path against
the baselines, forward and forward+backward.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
"""

from bench import harness

KINDS = ("model",)
WORKLOADS = ("narrow-mlp",)


def test_fused_mlp(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
