"""TensorLoader against DataLoader(TensorDataset) and DistributedSampler: same batches, same RNG."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastmlp import TensorLoader


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    w = torch.randn(n, 2, 2, generator=g).double()
    return x, y, w


def _assert_same_batches(got, want):
    assert len(got) == len(want), f"{len(got)} batches, DataLoader gave {len(want)}"
    for i, (bg, bw) in enumerate(zip(got, want)):
        assert isinstance(bg, list) and len(bg) == len(bw)
        for tg, tw in zip(bg, bw):
            assert tg.dtype == tw.dtype and tg.shape == tw.shape, f"batch {i}: {tg.shape} vs {tw.shape}"
            assert torch.equal(tg, tw), f"batch {i} differs"


@pytest.mark.parametrize("n,batch_size", [(23, 4), (24, 4), (5, 8), (1, 1)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_parity_with_dataloader_global_rng(n, batch_size, shuffle, drop_last):
    tensors = _data(n)
    want_batches, got_batches = [], []
    torch.manual_seed(1234)
    dl = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle,
                    drop_last=drop_last)
    for _ in range(3):  # several epochs: a fresh permutation each
        want_batches.append([b for b in dl])
    want_state = torch.get_rng_state()
    want_next = torch.rand(4)

    torch.manual_seed(1234)
    tl = TensorLoader(*tensors, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    assert len(tl) == len(dl)
    for _ in range(3):
        got_batches.append([b for b in tl])
    assert torch.equal(torch.get_rng_state(), want_state), "global RNG state differs after iteration"
    assert torch.equal(torch.rand(4), want_next)
    for got, want in zip(got_batches, want_batches):
        _assert_same_batches(got, want)
    if shuffle and n > batch_size:
        assert not all(torch.equal(a[0][0], b[0][0]) for a, b in zip(got_batches, got_batches[1:])), \
            "epochs should be shuffled differently"


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_parity_with_dataloader_explicit_generator(shuffle, drop_last):
    tensors = _data(29)
    g_want = torch.Generator().manual_seed(7)
    dl = DataLoader(TensorDataset(*tensors), batch_size=6, shuffle=shuffle, drop_last=drop_last,
                    generator=g_want)
    torch.manual_seed(0)
    global_before = torch.get_rng_state()
    want = [[b for b in dl] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), global_before)

    g_got = torch.Generator().manual_seed(7)
    tl = TensorLoader(*tensors, batch_size=6, shuffle=shuffle, drop_last=drop_last, generator=g_got)
    got = [[b for b in tl] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), global_before), "the global RNG must not be touched"
    assert torch.equal(g_got.get_state(), g_want.get_state()), "generator state differs"
    for a, b in zip(got, want):
        _assert_same_batches(a, b)


def test_no_shuffle_batches_are_views():
    x = torch.randn(10, 4)
    tl = TensorLoader(x, batch_size=4)
    batches = [b[0] for b in tl]
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert all(b.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for b in batches)


@pytest.mark.parametrize("gather", ["batch", "epoch"])
def test_gather_modes_agree(gather):
    tensors = _data(50)
    torch.manual_seed(3)
    want = list(DataLoader(TensorDataset(*tensors), batch_size=7, shuffle=True))
    torch.manual_seed(3)
    got = list(TensorLoader(*tensors, batch_size=7, shuffle=True, gather=gather))
    _assert_same_batches(got, want)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [17, 18])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_parity_with_distributed_sampler(world_size, n, shuffle, drop_last):
    tensors = _data(n)
    ds = TensorDataset(*tensors)
    for rank in range(world_size):
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=11, drop_last=drop_last)
        dl = DataLoader(ds, batch_size=4, sampler=sampler)
        tl = TensorLoader(*tensors, batch_size=4, shuffle=shuffle, drop_last=drop_last,
                          rank=rank, world_size=world_size, seed=11)
        assert len(tl) == len(dl)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            tl.set_epoch(epoch)
            torch.manual_seed(99)
            want = list(dl)
            want_state = torch.get_rng_state()
            torch.manual_seed(99)
            got = list(tl)
            assert torch.equal(torch.get_rng_state(), want_state)
            _assert_same_batches(got, want)


def test_distributed_padding_with_tiny_dataset():
    # fewer samples than ranks: DistributedSampler repeats the list several times
    tensors = _data(2)
    ds = TensorDataset(*tensors)
    for rank in range(5):
        sampler = DistributedSampler(ds, num_replicas=5, rank=rank, shuffle=True, seed=0)
        want = list(DataLoader(ds, batch_size=3, sampler=sampler))
        got = list(TensorLoader(*tensors, batch_size=3, shuffle=True, rank=rank, world_size=5))
        _assert_same_batches(got, want)


def test_device_move_once():
    x = torch.randn(8, 2)
    tl = TensorLoader(x, batch_size=3, device="cpu")
    assert tl.device.type == "cpu"
    assert torch.equal(torch.cat([b[0] for b in tl]), x)


def test_errors():
    with pytest.raises(ValueError, match="at least one tensor"):
        TensorLoader(batch_size=2)
    with pytest.raises(ValueError, match="different lengths"):
        TensorLoader(torch.randn(4, 2), torch.randn(5), batch_size=2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            TensorLoader(torch.randn(4, 2), batch_size=bad)
    for rank in (-1, 2):
        with pytest.raises(ValueError, match="outside"):
            TensorLoader(torch.randn(4, 2), batch_size=2, rank=rank, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        TensorLoader(torch.randn(4, 2), batch_size=2, rank=0, world_size=0)
    with pytest.raises(ValueError, match="both rank and world_size"):
        TensorLoader(torch.randn(4, 2), batch_size=2, rank=0)
    with pytest.raises(TypeError):
        TensorLoader([1, 2, 3], batch_size=2)


def test_partial_iteration_then_new_epoch_matches():
    # breaking out of an epoch early must leave the RNG as DataLoader leaves it
    tensors = _data(20)
    torch.manual_seed(5)
    dl = DataLoader(TensorDataset(*tensors), batch_size=3, shuffle=True)
    want = [list(itertools.islice(iter(dl), 2)), list(dl)]
    want_state = torch.get_rng_state()
    torch.manual_seed(5)
    tl = TensorLoader(*tensors, batch_size=3, shuffle=True)
    got = [list(itertools.islice(iter(tl), 2)), list(tl)]
    assert torch.equal(torch.get_rng_state(), want_state)
    for a, b in zip(got, want):
        _assert_same_batches(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("gather", ["auto", "batch", "epoch"])
def test_cuda_loader_matches_dataloader(gather):
    tensors = _data(45)
    torch.manual_seed(8)
    want = list(DataLoader(TensorDataset(*tensors), batch_size=8, shuffle=True))
    torch.manual_seed(8)
    tl = TensorLoader(*tensors, batch_size=8, shuffle=True, device="cuda", gather=gather)
    got = [[t.cpu() for t in batch] for batch in tl]
    assert all(t.is_cuda for t in next(iter(tl)))
    _assert_same_batches(got, want)
