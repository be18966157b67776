"""save_checkpoint / load_checkpoint: model + optimizer + epoch in one file.

The model's state_dict is saved unwrapped (``model.module`` of a DDP model), so a checkpoint from
a distributed run loads into a plain model and back. Under torch.distributed only rank 0 writes
(every rank holds the same weights after a DDP step); every rank reads. The file is written to a
temporary name and renamed, so an interrupted save never leaves a truncated checkpoint behind.
"""

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_writer() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def save_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    epoch: int = 0, **extra) -> None:
    """Write {"model", "optimizer", "epoch", **extra} to `path` (rank 0 only under torch.distributed)."""
    if not _is_writer():
        return
    state = {"model": _unwrap(model).state_dict(), "epoch": int(epoch), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    map_location=None, strict: bool = True) -> dict:
    """Load a save_checkpoint file into `model` (and `optimizer`); return the whole dict.

    ``map_location`` defaults to the model's device, so a GPU checkpoint loads on a CPU machine.
    The returned dict has "epoch" (the value saved) and any extra entries.
    """
    if map_location is None:
        param = next(iter(model.parameters()), None)
        map_location = param.device if param is not None else "cpu"
    state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    _unwrap(model).load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        if "optimizer" not in state:
            raise KeyError(f"checkpoint {path} has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    return state
