"""fastmlp's autotuner: every choice made by timing, made once per key and kept in one cache.

Two kinds of choice go through it: the tile config of each kernel launch (``pick_config``: the
per-layer, gated and fused-MLP launchers, TORCH_GEMM among the candidates where torch's own
GEMM may win) and FusedMLP's path, fused or per-layer (fastmlp/mlp_ops.py). Both are
``pick``: the same cache (``_best``), the same rules for when timing may happen, the same
determinism (a key, once timed, keeps its pick for the process).

Why not ``triton.autotune``: the config list depends on the GPU generation and on the dtype class
(fp16/bf16 tensor cores, TF32, exact fp32 FMA) and the activation (kernels/configs.py holds the
lists and the rules), the key must be bucketed (next power of two of each dimension) so that a
training loop with a fixed shape tunes once, tuning must never run while a CUDA graph is being
captured, and the tests need one fixed config. A dict lookup per call keeps the host path lean.

Environment:
  FASTMLP_AUTOTUNE=0   use the first (default) candidate of each choice, never benchmark (tests,
                       CI).
The default is also what every rank takes in a multi-rank DTensor program (ranks_must_agree).
Under Triton's interpreter only the interpreter config is used (timing numpy is meaningless).
"""

import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from fastmlp.kernels import activations
from fastmlp.kernels.configs import (  # noqa: F401  (re-exported: the names callers use)
    INTERPRETER as _INTERPRETER, TORCH_GEMM, TileConfig, all_shipped_configs, linear_candidates)

# Triton picks interpreted or compiled kernels when they are decorated, at import: read the
# switch once, at the same moment, instead of on every launch.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def autotune_enabled() -> bool:
    return os.environ.get("FASTMLP_AUTOTUNE", "1") not in ("0", "false", "False", "")


def ranks_must_agree() -> bool:
    """Whether timing is off because the ranks of a DTensor program must compute alike.

    Each rank would time the candidates on its own and could pick another config (or the torch
    GEMM), and configs sum in different orders: a result DTensor marks Replicate (a row-parallel
    layer's bias gradient, a replicated FusedMLP) would then differ in its last bits between
    ranks and drift apart in training. So with torch.distributed initialized on more than one
    rank and DTensor in use (tensor parallel, FSDP2), every launch takes the default config.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return False
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# The shipped activations whose per-layer backward kernels are not fused before Hopper (a view
# of the table's fused_backward_from column, for reports and tests).
TORCH_BACKWARD_BEFORE_SM90 = tuple(row.name for row in activations.TABLE.values()
                                   if row.fused_backward_from > 80)


def candidate_configs(dtype: torch.dtype, dot_precision: str, capability: Tuple[int, int],
                      kernel: str = "fwd", activation: str = "relu") -> List:
    """The configs worth trying for one kernel ("fwd", "dx", "dw"), dtype class and activation on
    one GPU generation (default first), then TORCH_GEMM on GPUs (configs.linear_candidates)."""
    return linear_candidates(dtype, dot_precision, capability, kernel, activation,
                             interpreter_enabled())


def bucket(n: int) -> int:
    """Next power of two (0 stays 0): shapes in one bucket share a tuned config."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# key -> the pick: a TileConfig / FusedConfig, TORCH_GEMM, or a FusedMLP path ("fused" or
# "per-layer", keys starting "mlp-path")
_best: Dict[tuple, object] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pick(key: tuple, candidates: Sequence, device: torch.device,
         measure: Callable[[], object]) -> object:
    """The choice for `key` among `candidates` (default first): measure()'s answer, asked for
    once and cached, or the default where no timing may happen.

    FASTMLP_AUTOTUNE=0 means the default, always: it is checked before the cache, so a pick
    cached while autotuning was on (an earlier test, an earlier phase of a run) never leaks
    into a run that asked for the default. With one candidate, off CUDA, or during CUDA-graph
    capture (where timing is impossible) a cached pick is used if there is one, else the
    default, and nothing new is cached. So it is under torch.distributed with DTensors
    (ranks_must_agree).
    """
    if not autotune_enabled():
        return candidates[0]
    best = _best.get(key)
    if best is not None:
        return best
    if len(candidates) == 1 or device.type != "cuda" or _capturing(device) or ranks_must_agree():
        return candidates[0]
    best = measure()
    _best[key] = best
    return best


def fastest(candidates: Sequence, run: Callable[[object], object], what: object) -> object:
    """The candidate whose `run(candidate)` triton.testing.do_bench times fastest on the current
    device (the earlier one on a tie). A candidate the compiler rejects for its resources (out
    of shared memory, ...) is skipped; a RuntimeError naming `what` if every one is; any other
    failure propagates."""
    import triton.testing

    timings = []
    for candidate in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(candidate), warmup=5, rep=20)
        except Exception as error:  # a config the compiler rejects (e.g. out of shared memory)
            if "OutOfResources" not in type(error).__name__ and "out of resource" not in str(error):
                raise
            continue
        timings.append((ms, candidate))
    if not timings:
        raise RuntimeError(f"fastmlp: no kernel config fits this GPU for {what}")
    return min(timings, key=lambda t: t[0])[1]


def pick_config(key: tuple, candidates: List, device: torch.device, run: Callable) -> object:
    """The fastest of `candidates` for `key`, timed once with `run(config)` and cached: pick's
    rules say when it times (the launchers call this under their tensors' device)."""
    return pick(key, candidates, device, lambda: fastest(candidates, run, key))


def chosen_configs() -> Dict[tuple, object]:
    """What the autotuner has picked so far, key -> config (or TORCH_GEMM), and FusedMLP's path
    picks (keys starting "mlp-path") -> "fused" or "per-layer": for reports."""
    return dict(_best)
