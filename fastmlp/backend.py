"""Which implementation runs a fused op: the Triton kernels or plain torch.

``auto`` (the default) runs Triton on CUDA tensors and torch on everything else. ``triton`` forces
the Triton kernels for CPU tensors too; they then run under Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported. ``torch`` runs the torch
implementation everywhere (same math, same saved tensors). The choice comes from the
``FASTMLP_BACKEND`` environment variable at import, and from :func:`set_backend` /
:func:`use_backend` at run time.
"""

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def _parse(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastmlp backend {name!r}: expected one of {BACKENDS}")
    return name


_backend = _parse(os.environ.get("FASTMLP_BACKEND", "auto") or "auto")


def get_backend() -> str:
    """The backend in force: "auto", "triton" or "torch"."""
    return _backend


def set_backend(name: str) -> None:
    """Set the backend for every later call ("auto", "triton" or "torch")."""
    global _backend
    _backend = _parse(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed fused ops with the given backend, then restore."""
    global _backend
    previous = _backend
    _backend = _parse(name)
    try:
        yield
    finally:
        _backend = previous


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Decide, per call, whether the Triton kernels run for tensors on `device` of `dtype`.

    float64 runs on torch on GPUs (tensor cores have no fp64 path worth a custom kernel); under
    the interpreter it runs the kernels, so gradcheck exercises the kernel code itself.
    """
    if _backend == "torch" or device.type == "meta":  # meta: shapes only, torch's ops give them
        return False
    if device.type == "cuda":
        return dtype != torch.float64
    if _backend == "triton":
        if device.type != "cpu":
            raise ValueError(f"FASTMLP_BACKEND=triton: tensors on {device} have no Triton backend")
        if not triton_interpreter_enabled():
            raise RuntimeError(
                "FASTMLP_BACKEND=triton was asked for CPU tensors, but Triton's interpreter is off: "
                "set TRITON_INTERPRET=1 in the environment before triton is imported"
            )
        return True
    return False
