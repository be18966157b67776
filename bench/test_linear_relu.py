"""pytest-benchmark: Linear+ReLU as a hidden layer: the seed layer (64x1000->100) and the MLP shapes.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
"""

from bench import harness

KINDS = ("layer",)


def test_linear_relu(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
