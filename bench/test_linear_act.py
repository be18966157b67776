"""pytest-benchmark: one Linear+activation layer (FusedLinear, fastmlp/ops.py) as a hidden layer:
the seed layer (64x1000->100) and the MLP shapes, with ReLU and the other activations timed there.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
"""

from bench import harness

KINDS = ("layer",)


def test_linear_act(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
