"""pytest-benchmark configuration for `pytest bench --benchmark-only`.

Parametrises every test that takes `bench_case_variant` with the shared catalogue (bench.cases)
for the device at hand, filtered by the module's KINDS (and WORKLOADS, where a module names
them: one file per operator or network); a file with no case on this device (GPU-only rows on a
CPU) is one skipped test naming them. Options:
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

from bench.runner import RunOptions, gpu_only_left_out, select_cases, variants_for

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


def module_params(opts: RunOptions, kinds, workloads=None):
    """The (case, variant) pairs of one pytest file (its KINDS and WORKLOADS) and their ids; a
    file with none on this device gets one skipped parameter saying why (its cases are
    GPU-only), not pytest's anonymous "empty parameter set"."""
    def mine(case):
        return case.kind in kinds and (workloads is None or case.workload in workloads)

    params, ids = [], []
    for case in select_cases(opts):
        if mine(case):
            for variant in variants_for(case, opts):
                params.append((case, variant))
                ids.append(f"{case.id}|{variant}")
    if not params:
        gpu_only = [c.id for c in gpu_only_left_out(opts) if mine(c)]
        reason = (f"{len(gpu_only)} GPU-only case(s) (e.g. {gpu_only[0]}), none on {opts.device}; "
                  f"--bench-tiny runs them at toy sizes" if gpu_only
                  else f"no case of this file for {opts.device} with these options")
        params, ids = [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ["none"]
    return params, ids


def pytest_generate_tests(metafunc):
    if "bench_case_variant" not in metafunc.fixturenames:
        return
    params, ids = module_params(_options(metafunc.config), getattr(metafunc.module, "KINDS", ()),
                                getattr(metafunc.module, "WORKLOADS", None))
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
