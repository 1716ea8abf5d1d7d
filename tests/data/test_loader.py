import numpy as np
import pytest
import torch

from fastcl.data import augment
from fastcl.data.datasets import ArrayDataset
from fastcl.data.loader import TorchLoader, shard_batches
from fastcl.data.transforms import MultiViewTransform


def _dataset(n, transform=None):
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # a pixel that identifies the sample
    return ArrayDataset(images, np.arange(n) % 10, transform)


def _epoch(loader):
    return [idx.tolist() for _, _, idx in loader]


@pytest.mark.parametrize("n,bs,ws", [(100, 8, 2), (37, 5, 3)])  # weird shapes: 37 samples over 3 ranks
def test_sharding_exactly_once_drop_last(n, bs, ws):
    ds = _dataset(n)
    loaders = [TorchLoader(ds, bs, rank=r, world_size=ws, seed=3, num_workers=0) for r in range(ws)]
    per_rank = n // (ws * bs)
    seen = []
    for ld in loaders:
        ld.set_epoch(5)
        batches = _epoch(ld)
        assert len(batches) == len(ld) == per_rank
        assert all(len(b) == bs for b in batches)
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == per_rank * ws * bs  # exactly once, tail dropped


@pytest.mark.parametrize("n,bs,ws", [(100, 8, 2), (37, 5, 3)])
def test_sharding_exactly_once_eval(n, bs, ws):
    ds = _dataset(n)
    seen, counts = [], []
    for r in range(ws):
        ld = TorchLoader(ds, bs, rank=r, world_size=ws, shuffle=False, drop_last=False, num_workers=0)
        batches = _epoch(ld)
        assert len(batches) == len(ld)
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(n))  # every sample exactly once, nothing padded
    assert max(counts) - min(counts) <= 1


def test_epoch_reshuffle_and_rank_agreement():
    a = shard_batches(1000, 10, seed=1, epoch=0)
    b = shard_batches(1000, 10, seed=1, epoch=1)
    assert [x.tolist() for x in a] == [x.tolist() for x in shard_batches(1000, 10, seed=1, epoch=0)]
    assert [x.tolist() for x in a] != [x.tolist() for x in b]
    # same permutation on every rank: ranks interleave it
    r0 = np.concatenate(shard_batches(1000, 10, rank=0, world_size=2, seed=1, epoch=0))
    r1 = np.concatenate(shard_batches(1000, 10, rank=1, world_size=2, seed=1, epoch=0))
    full = np.concatenate(a)
    assert (r0 == full[0::2]).all() and (r1 == full[1::2]).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_remaining_batches(num_workers):
    ds = _dataset(90)
    ld = TorchLoader(ds, 7, rank=1, world_size=2, seed=11, num_workers=num_workers)
    ld.set_epoch(4)
    full = [(x.clone(), y.clone(), i.clone()) for x, y, i in ld]
    for k in (0, 3, len(ld)):
        ld.set_epoch(4, start_batch=k)
        rest = list(ld)
        assert len(rest) == len(ld) - k
        for (x, y, i), (fx, fy, fi) in zip(rest, full[k:]):
            assert torch.equal(i, fi) and torch.equal(y, fy) and torch.equal(x, fx)
    # start_batch applies to one iteration only
    assert len(_epoch(ld)) == len(ld)


def test_multiview_collate_and_dtypes():
    spec = augment.simclr(size=4, blur_p=0.0)
    ld = TorchLoader(_dataset(20, MultiViewTransform(spec)), 4, num_workers=0)
    views, labels, idx = next(iter(ld))
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (4, 3, 4, 4) and v.dtype == torch.float32 for v in views)
    assert labels.dtype == torch.int64 and idx.dtype == torch.int64
    assert (labels == idx % 10).all()


def test_bad_arguments():
    ds = _dataset(10)
    with pytest.raises(ValueError, match="rank"):
        TorchLoader(ds, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TorchLoader(ds, 0)
    with pytest.raises(ValueError, match="fewer than one global batch .*lower --batch-size"):
        TorchLoader(ds, 4, world_size=3, rank=0)
    assert len(TorchLoader(ds, 4, world_size=3, rank=2, drop_last=False, num_workers=0)) == 1
    with pytest.raises(ValueError, match="start_batch"):
        TorchLoader(ds, 2, num_workers=0).set_epoch(0, start_batch=99)


class _CollectingDataset(ArrayDataset):
    """Runs the garbage collector inside the worker, as a long epoch eventually does."""

    def __getitem__(self, i):
        import gc

        gc.collect()
        return super().__getitem__(i)


@pytest.mark.timeout(120)
def test_workers_do_not_inherit_dali_garbage():
    """A DALI pipeline left as cyclic garbage (an earlier DaliLoader) must not be freed inside a forked worker:
    its __del__ waits there for threads that were not forked, and the epoch hangs."""
    dali = pytest.importorskip("nvidia.dali")
    import gc

    @dali.pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        return dali.fn.random.uniform(range=[0.0, 1.0], shape=[2])

    gc.disable()  # keep the cycle uncollected until the loader forks, whatever the GC thresholds
    try:
        p = pipe()
        p.build()
        p.run()
        holder = {"pipe": p}
        holder["self"] = holder  # a reference cycle: only the cyclic GC frees it
        del p, holder
        images = np.zeros((6, 4, 4, 3), np.uint8)
        ld = TorchLoader(_CollectingDataset(images, np.arange(6)), 2, shuffle=False, num_workers=2)
        assert sorted(i for _, _, idx in ld for i in idx.tolist()) == list(range(6))
    finally:
        gc.enable()
