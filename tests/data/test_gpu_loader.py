"""The device-resident back end (``fastcl.data.gpu``), on CPU tensors: the loader protocol with the other back ends'
sharding (every sample once per epoch across ranks, reshuffled per epoch), bit-exact mid-epoch resume, labels
that follow their images, and evaluation batches equal to the torchvision eval pipeline's (so the kNN monitor
gives the same numbers)."""
import numpy as np
import pytest
import torch

from fastcl.data import augment
from fastcl.data.gpu import DeviceEvalLoader, DeviceLoader
from fastcl.data.loader import TorchLoader, shard_batches

MEAN, STD = augment.CIFAR10_MEAN, augment.CIFAR10_STD


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 100)
    return images, labels


def _loader(data, **kw):
    kw = dict(dict(spec=augment.mocov2_aug_plus(32, MEAN, STD, blur_p=0.0), batch_size=8), **kw)
    return DeviceLoader(*data, kw.pop("spec"), kw.pop("batch_size"), **kw)


def test_every_sample_once_per_epoch_across_ranks_and_reshuffled(data):
    ranks = [_loader(data, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 100 // 16
    seen = {}
    for epoch in (0, 1):
        idx = []
        for dl in ranks:
            dl.set_epoch(epoch)
            idx += [int(i) for _, _, batch in dl for i in batch]
        assert len(idx) == len(set(idx)) == 6 * 16  # drop_last: 96 of 100, none twice
        seen[epoch] = idx
        for dl in ranks:  # the same batches as the torchvision loader's (one sharding for every back end)
            assert [b.tolist() for b in dl.epoch_indices()] == \
                [b.tolist() for b in shard_batches(100, 8, rank=dl.rank, world_size=2, epoch=epoch)]
    assert seen[0] != seen[1]


def test_labels_follow_images_and_views_are_normalized(data):
    dl = _loader(data)
    dl.set_epoch(0)
    views, labels, idx = next(iter(dl))
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 and all(v.dtype == torch.float32 for v in views)
    assert torch.equal(labels, torch.as_tensor(data[1][idx.numpy()]))
    assert all(torch.isfinite(v).all() and v.abs().mean() < 3 for v in views)


def test_resume_mid_epoch_yields_the_uninterrupted_views(data):
    full = _loader(data, seed=3)
    full.set_epoch(2)
    batches = list(full)
    resumed = _loader(data, seed=3)  # a new process: nothing carried over but (epoch, batch)
    resumed.set_epoch(2, start_batch=4)
    rest = list(resumed)
    assert len(rest) == len(batches) - 4
    for (v1, l1, i1), (v2, l2, i2) in zip(batches[4:], rest):
        assert torch.equal(i1, i2) and torch.equal(l1, l2)
        assert all(torch.equal(a, b) for a, b in zip(v1, v2))  # bit-exact augmentation too
    other = _loader(data, seed=4)
    other.set_epoch(2)
    assert not torch.equal(next(iter(other))[0][0], batches[0][0][0])


def test_eval_batches_equal_the_torchvision_eval_pipeline(data):
    from fastcl.data.datasets import ArrayDataset
    from fastcl.data.transforms import eval_transform

    dev = DeviceEvalLoader(*data, MEAN, STD, batch_size=32)
    ref = TorchLoader(ArrayDataset(*data, eval_transform(32, MEAN, STD)), 32, shuffle=False, drop_last=False,
                      num_workers=0)
    for (x, y, i), (rx, ry, ri) in zip(dev, ref, strict=True):
        assert torch.equal(i, ri) and torch.equal(y, ry)
        torch.testing.assert_close(x, rx, rtol=0, atol=1e-6)


def test_knn_on_device_equals_the_torchvision_path(data):
    from fastcl.data.datasets import ArrayDataset
    from fastcl.data.transforms import eval_transform
    from fastcl.eval.knn import knn_eval

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    train, val = (data[0][:80], data[1][:80]), (data[0][80:], data[1][80:])
    tf = eval_transform(32, MEAN, STD)
    ref = knn_eval(net, *(TorchLoader(ArrayDataset(*d, tf), 16, shuffle=False, drop_last=False, num_workers=0)
                          for d in (train, val)), torch.device("cpu"), k=10, T=0.1)
    dev = knn_eval(net, *(DeviceEvalLoader(*d, MEAN, STD, batch_size=64) for d in (train, val)),
                   torch.device("cpu"), k=10, T=0.1)
    assert dev == ref


def test_build_picks_the_device_back_end_for_cifar_on_cuda_only():
    from fastcl.data.build import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("cifar10", "auto", cuda) == "gpu"
    assert resolve_backend("cifar10", "auto", cpu) in ("dali", "torch")
    assert resolve_backend("cifar10", "gpu", cpu) == "gpu"  # asked for: runs on CPU tensors
    with pytest.raises(ValueError, match="--data-backend gpu holds an in-memory dataset"):
        resolve_backend("/data/imagenet", "gpu", cuda)
