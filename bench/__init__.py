"""fastmlp's benchmark suite: fastmlp against stock torch, same run, same inputs.

    python -m bench                 the report for the device at hand (bench/__main__.py)
    pytest bench --benchmark-only   the same cases as pytest-benchmark tests
    bench/gpu_check.sh OUT          the staged GPU check (bench/gpu_check.py, bench/gpucheck/):
                                    correctness on silicon, headline figures, CUDA tests,
                                    compute-sanitizer, the rest of the report, in one short call

Imports point one way: bench uses fastmlp, fastmlp never imports bench.
"""
