"""pytest-benchmark: the seed two-layer network (64x1000->100->10, examples/seed_two_layer.py):
forward, forward+backward, one SGD step; fastmlp.fuse's layers and FusedMLP against its baselines.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
"""

from bench import harness

KINDS = ("model",)
WORKLOADS = ("seed-model",)


def test_two_layer(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
