"""pytest-benchmark configuration for `pytest bench --benchmark-only`.

Parametrises every test that takes `bench_case_variant` with the shared catalogue (bench.cases)
for the device at hand, filtered by the module's KINDS (and WORKLOADS, where a module names
them: one file per operator or network). Options:
  --bench-full          every workload and precision for the device (as python -m bench --full)
  --bench-tiny          toy sizes (a smoke run of the suite itself)
  --bench-no-compile    skip torch.compile baselines
  --bench-max-autotune  add torch.compile(mode="max-autotune")
  --bench-rounds N      fixed rounds per benchmark (default: about 1 s of calls, 5 to 200)
  --bench-threads N     torch.set_num_threads(N) (1 on a shared CPU)
Without pytest-benchmark installed, the suite is skipped with a message, and --benchmark-only is
accepted so that the command still runs; python -m bench needs no pytest-benchmark.
"""

import pytest
import torch

from bench.runner import RunOptions, select_cases, variants_for

try:
    import pytest_benchmark  # noqa: F401
    HAS_PYTEST_BENCHMARK = True
except ImportError:
    HAS_PYTEST_BENCHMARK = False


def pytest_addoption(parser):
    group = parser.getgroup("fastmlp bench")
    group.addoption("--bench-full", action="store_true", help="every workload and precision")
    group.addoption("--bench-tiny", action="store_true", help="toy sizes")
    group.addoption("--bench-no-compile", action="store_true", help="skip torch.compile baselines")
    group.addoption("--bench-max-autotune", action="store_true", help="add max-autotune baselines")
    group.addoption("--bench-rounds", type=int, default=None, help="fixed rounds per benchmark")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch CPU threads (1 keeps a shared CPU's timings from stalling)")
    if not HAS_PYTEST_BENCHMARK:
        parser.addoption("--benchmark-only", action="store_true",
                         help="(pytest-benchmark is not installed: accepted and ignored)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def _options(config) -> RunOptions:
    return RunOptions(device="cuda" if torch.cuda.is_available() else "cpu",
                      full=config.getoption("--bench-full"), tiny=config.getoption("--bench-tiny"),
                      compile=not config.getoption("--bench-no-compile"),
                      max_autotune=config.getoption("--bench-max-autotune")
                      or config.getoption("--bench-full"))


def pytest_generate_tests(metafunc):
    if "bench_case_variant" not in metafunc.fixturenames:
        return
    opts = _options(metafunc.config)
    kinds = getattr(metafunc.module, "KINDS", ())
    workloads = getattr(metafunc.module, "WORKLOADS", None)
    params, ids = [], []
    for case in select_cases(opts):
        if case.kind in kinds and (workloads is None or case.workload in workloads):
            for variant in variants_for(case, opts):
                params.append((case, variant))
                ids.append(f"{case.id}|{variant}")
    metafunc.parametrize("bench_case_variant", params, ids=ids)


def pytest_collection_modifyitems(config, items):
    if HAS_PYTEST_BENCHMARK:
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed: run `python -m bench` instead")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def bench_rounds(request):
    return request.config.getoption("--bench-rounds")


if not HAS_PYTEST_BENCHMARK:
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed")
