"""TensorLoader: DataLoader(TensorDataset(...)) for tensors that fit in memory, without the overhead.

The stock loader fetches every sample on its own and collates them back into a batch: for a
64-sample batch that is 64 indexing calls and a stack per tensor, which costs more than the MLP's
math. TensorLoader moves the tensors to their device once and then yields either views (no
shuffle) or a gather along one permutation per epoch (one ``index_select`` per batch or per epoch).

It is a drop-in for the two ways people build such loaders, and yields exactly their batches:

* ``DataLoader(TensorDataset(*tensors), batch_size, shuffle, drop_last, generator)``: same
  batches, and the same random draws, so the global RNG (or ``generator``) is left in the same
  state afterwards. DataLoader draws a base seed per iterator (for its workers) when ``iter()`` is
  called, and RandomSampler draws its own seed (or uses ``generator``) for a ``randperm`` when the
  first batch is asked for; both draws are reproduced, in that order.
* ``DataLoader(ds, batch_size, sampler=DistributedSampler(ds, num_replicas=W, rank=r,
  shuffle, seed, drop_last))`` after ``set_epoch(e)``: the permutation comes from ``seed + e``,
  the index list is padded (or cut, with ``drop_last``) to a multiple of W, and rank r takes every
  W-th index starting at r. ``drop_last`` goes to the sampler there, as in that call; the
  batch-level split then keeps a short last batch.
"""

import math
from typing import List, Optional

import torch

__all__ = ["TensorLoader"]

_GATHER_MODES = ("auto", "batch", "epoch")


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    """One int64 draw, exactly as DataLoader and RandomSampler make it (same RNG consumption)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class TensorLoader:
    """Batches of in-memory tensors, identical to ``DataLoader(TensorDataset(*tensors), ...)``.

    Args:
        *tensors: tensors with the same length along dimension 0 (samples).
        batch_size: samples per batch (>= 1).
        shuffle: draw a new permutation every epoch (RandomSampler's draws, or
            DistributedSampler's ``seed + epoch`` in distributed mode).
        drop_last: drop the last, short batch (distributed mode: passed to the sampler, which
            drops the tail so the data splits evenly over the ranks).
        generator: torch.Generator for the random draws (default: the global RNG), as DataLoader's.
        device: move the tensors there once, at construction (default: leave them where they are).
        rank, world_size: distributed mode; taken from the initialised torch.distributed process
            group when not given (then every process group, even of size 1, means distributed mode).
        seed: DistributedSampler's seed (distributed mode only).
        gather: "batch" gathers each shuffled batch with its own ``index_select`` (keeps the batch
            in cache: faster on CPU, measured), "epoch" gathers the whole epoch with one call and
            yields views (one launch per epoch: meant for GPUs, costs a copy of the data);
            "auto" picks "epoch" on CUDA and "batch" elsewhere.

    Iteration yields a list with one batch per tensor, like DataLoader over a TensorDataset.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 1, shuffle: bool = False,
                 drop_last: bool = False, generator: Optional[torch.Generator] = None,
                 device=None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 seed: int = 0, gather: str = "auto"):
        if not tensors:
            raise ValueError("TensorLoader needs at least one tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TensorLoader: argument {i} is a {type(t).__name__}, not a tensor")
            if t.dim() == 0:
                raise ValueError(f"TensorLoader: tensor {i} is 0-d; it needs a sample dimension")
        lengths = [t.shape[0] for t in tensors]
        if len(set(lengths)) != 1:
            raise ValueError(f"TensorLoader: tensors have different lengths along dim 0: {lengths}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TensorLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        if gather not in _GATHER_MODES:
            raise ValueError(f"TensorLoader: gather must be one of {_GATHER_MODES}, got {gather!r}")

        if device is not None:
            tensors = tuple(t.to(device) for t in tensors)
        self.tensors = tuple(tensors)
        self.device = self.tensors[0].device
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = generator
        self.seed = int(seed)
        self.epoch = 0
        self.num_items = lengths[0]
        if gather == "auto":
            gather = "epoch" if self.device.type == "cuda" else "batch"
        self.gather = gather

        self.rank, self.world_size = self._resolve_distributed(rank, world_size)
        self.distributed = self.world_size is not None
        if self.shuffle and not self.distributed and self.num_items == 0:
            raise ValueError("TensorLoader: shuffle=True needs at least one sample "
                             "(RandomSampler refuses an empty dataset too)")
        if self.distributed:
            n, w = self.num_items, self.world_size
            if self.drop_last and n % w != 0:
                self.num_samples = math.ceil((n - w) / w)
            else:
                self.num_samples = math.ceil(n / w)
        else:
            self.num_samples = self.num_items
        # Views for the unshuffled, undistributed case are made once: iteration is a list walk.
        self._views = None
        if not self.shuffle and not self.distributed:
            self._views = self._split(self.tensors, self.num_items)

    # ----------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_distributed(rank, world_size):
        if rank is None and world_size is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                return torch.distributed.get_rank(), torch.distributed.get_world_size()
            return None, None
        if rank is None or world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError("TensorLoader: give both rank and world_size, or initialise a "
                                 "torch.distributed process group to take them from")
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"TensorLoader: world_size must be an integer >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"TensorLoader: rank {rank!r} is outside [0, {world_size - 1}] "
                             f"for world_size={world_size}")
        return rank, world_size

    def _split(self, tensors, length) -> List[tuple]:
        """Per-batch tuples of views of `tensors` (first `length` rows), honouring drop_last."""
        n_full = length // self.batch_size
        keep = n_full * self.batch_size if (self.drop_last and not self.distributed) else length
        if keep == 0:
            return []  # split() of an empty tensor gives one empty piece; DataLoader gives none
        parts = [t[:keep].split(self.batch_size) for t in tensors]
        return list(zip(*parts))

    def __len__(self) -> int:
        if self.drop_last and not self.distributed:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Epoch for the distributed permutation (``seed + epoch``), as DistributedSampler.set_epoch."""
        self.epoch = int(epoch)

    # ----------------------------------------------------------------------------------------
    def _indices(self) -> Optional[torch.Tensor]:
        """This epoch's sample indices (CPU int64), or None for plain in-order views."""
        if not self.distributed:
            # RandomSampler: a private generator seeded from one global draw, unless one is given.
            if self.generator is None:
                g = torch.Generator()
                g.manual_seed(_draw_seed(None))
            else:
                g = self.generator
            return torch.randperm(self.num_items, generator=g)
        n, w = self.num_items, self.world_size
        total = self.num_samples * w
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if total > n:  # pad by repeating the order from its start, as often as needed
            order = order.repeat(math.ceil(total / n))[:total] if n > 0 else order
        else:
            order = order[:total]
        return order[self.rank:total:w]

    def __iter__(self):
        # DataLoader's iterator draws its base seed (for workers) when it is created.
        _draw_seed(self.generator)
        if self._views is not None:
            return (list(batch) for batch in self._views)
        return self._shuffled_batches()

    def _shuffled_batches(self):
        index = self._indices()
        if index.numel() != self.num_samples:
            raise AssertionError("TensorLoader: internal index length mismatch")
        n_batches = len(self)
        if self.drop_last and not self.distributed:
            index = index[: n_batches * self.batch_size]
        index = index.to(self.device, non_blocking=True)
        if n_batches == 0:
            pass
        elif self.gather == "epoch":
            gathered = [t.index_select(0, index) for t in self.tensors]
            for batch in zip(*[t.split(self.batch_size) for t in gathered]):
                yield list(batch)
        else:
            for idx in index.split(self.batch_size):
                yield [t.index_select(0, idx) for t in self.tensors]
        if not self.distributed and self.generator is not None:
            # RandomSampler asks for a second (empty-sliced) permutation after the first one runs
            # out; with the caller's generator that draw shows in its state, so make it too.
            torch.randperm(self.num_items, generator=self.generator)

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        dist = f", rank={self.rank}, world_size={self.world_size}" if self.distributed else ""
        return (f"TensorLoader({shapes}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, device={self.device}{dist})")
