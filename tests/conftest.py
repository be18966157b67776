"""Test setup: run the Triton kernels on CUDA when there is a GPU, else through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at conftest
import, when no CUDA device is present. Fixtures:
  device          "cuda" with a GPU, else "cpu"
  triton_backend  forces fastmlp's Triton kernels for the test (interpreter on CPU) and poisons
                  every kernel output with NaN before launch, so an unwritten element fails
  torch_backend   forces the torch implementation for the test

Every test starts from torch's global RNG (and Python's `random`) seeded with a digest of its
own id (reference.case_seed), so a test that draws without seeding gets the same inputs in every
process, whatever ran before it (xdist, -k, PYTHONHASHSEED); a failure report shows the seed.
"""

import os
import random
import sys

import pytest

if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastmlp  # noqa: E402
from reference import case_seed  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_from_the_test_id(request):
    seed = case_seed(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        report.sections.append(
            ("seed", f"torch.manual_seed({case_seed(item.nodeid)}), from case_seed({item.nodeid!r})"))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch):
    from fastmlp.kernels import debug

    monkeypatch.setattr(debug, "POISON_OUTPUTS", True)
    with fastmlp.use_backend("triton"):
        yield "triton"


@pytest.fixture
def torch_backend():
    with fastmlp.use_backend("torch"):
        yield "torch"


INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_IMPLS = [
    pytest.param(("triton", "cpu"), id="triton-interpreter",
                 marks=pytest.mark.skipif(not INTERPRETER, reason="Triton interpreter is off (GPU run)")),
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=_IMPLS)
def impl(request, monkeypatch):
    """Every (backend, device) pair that can run here; yields the device.

    The Triton variants poison kernel outputs with NaN before each launch.
    """
    backend_name, device_name = request.param
    if backend_name == "triton":
        from fastmlp.kernels import debug

        monkeypatch.setattr(debug, "POISON_OUTPUTS", True)
    with fastmlp.use_backend(backend_name):
        yield device_name
