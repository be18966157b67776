"""Debug switches shared by the kernel launchers.

POISON_OUTPUTS: launchers fill every output (and every partial-sum buffer) with NaN before the
kernel runs instead of leaving it uninitialised, so a test sees any element a kernel forgot to
write. Off by default (it costs a pass over the output); the tests turn it on, and so does the
environment variable FASTMLP_POISON_OUTPUTS=1.
"""

import os

import torch

POISON_OUTPUTS = os.environ.get("FASTMLP_POISON_OUTPUTS", "0") == "1"


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while POISON_OUTPUTS is on."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
