"""pytest-benchmark: The seed two-layer model (64x1000->100->10): forward, forward+backward, one SGD step.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
"""

from bench import harness

KINDS = ("model",)


def test_mlp(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
