"""Importing the optional model libraries (transformers) for the tests that use them.

The repository's top-level ``kernels/`` folder (shipped as fastmlp.kernels) has the name of the
Hugging Face ``kernels`` package, which transformers probes for at import; run from the checkout
(``python -m pytest`` puts it on sys.path), the probe would find ours and fail. transformers is
therefore imported with the checkout's root left off sys.path. An installed fastmlp has no
top-level ``kernels`` and no such clash.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_transformers():
    """transformers, imported as above; the calling test (or module) skips without it."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]
    try:
        transformers = pytest.importorskip("transformers")
        import transformers.activations  # noqa: F401 - runs the hub-kernels probe now
        import transformers.models.llama.modeling_llama  # noqa: F401
        import transformers.models.phi3.modeling_phi3  # noqa: F401
        import transformers.models.t5.modeling_t5  # noqa: F401
        return transformers
    finally:
        sys.path[:] = saved
