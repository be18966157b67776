"""Host-side helpers shared by the kernel launchers.

Triton launches on the *current* CUDA device and its current stream, whatever device the tensor
arguments live on; torch's own ops switch to the tensors' device themselves. A launcher called
with tensors on cuda:1 while cuda:0 is current would run the kernel on the wrong GPU (an illegal
address at best), so every launcher runs under the tensors' device.
"""

import contextlib
import functools

import torch


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a constexpr function: slow to call here)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def capability(device: torch.device):
    """(major, minor) compute capability of a CUDA device, (0, 0) for any other device; cached
    (the launchers key their tile tables and autotuner entries on it)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def device_guard(device: torch.device):
    """A context that makes `device` current for the launch (a no-op when it already is)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_first_tensors_device(launcher):
    """Decorator: run `launcher(tensor, ...)` with its first argument's device current."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        with device_guard(first.device):
            return launcher(first, *args, **kwargs)

    return wrapper
