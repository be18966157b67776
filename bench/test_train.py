"""pytest-benchmark: One training epoch of the seed workload (64,000 samples): stock DataLoader loop vs fastmlp.fit.

Cases and variants come from bench.cases / bench.runner (parametrised in bench/conftest.py);
each benchmark group holds fastmlp and its baselines for one workload, shape, dtype and pass.
"""

from bench import harness

KINDS = ("epoch",)


def test_train(benchmark, bench_case_variant, bench_rounds):
    case, variant = bench_case_variant
    harness.run(benchmark, case, variant, rounds=bench_rounds)
