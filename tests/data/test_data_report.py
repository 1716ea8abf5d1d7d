"""result.json records the training set's bad files distinctly (issue 10, leftover of item 8): the undecodable image
files that were substituted, and the non-image files the scan skipped, each by name and count -- distinct files,
not load attempts, over DataLoader workers and both back ends."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcl.data.imagefolder import ImageFolderDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "methods"))
from recipe_loader import load_recipe  # noqa: E402

BAD = ["c1/2_truncated.jpg", "c0/5_garbage.jpg"]
SKIPPED = ["c0/notes.txt", "c1/.DS_Store"]


@pytest.fixture
def dirty(tmp_path):
    """train/{c0,c1}: 14 good PNG/JPEGs, a truncated JPEG, a garbage '.jpg', a text file and a hidden file."""
    rng = np.random.default_rng(0)
    train = tmp_path / "train"
    for c in ("c0", "c1"):
        (train / c).mkdir(parents=True)
        for k in range(7):
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(train / c / f"{k}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    (train / BAD[0]).write_bytes(buf.getvalue()[:300])
    (train / BAD[1]).write_bytes(b"\xff\xd8\xff" + rng.bytes(500))
    (train / SKIPPED[0]).write_text("not an image")
    (train / SKIPPED[1]).write_bytes(b"\x00\x01")
    return tmp_path


def test_distinct_bad_files_counted_across_workers_and_epochs(dirty):
    from fastcl.data import augment
    from fastcl.data.loader import TorchLoader
    from fastcl.data.transforms import MultiViewTransform

    with pytest.warns(UserWarning, match="skipped 2 non-image"):
        ds = ImageFolderDataset(dirty / "train", MultiViewTransform(augment.mocov2_aug_plus(size=8)))
    dl = TorchLoader(ds, 4, num_workers=2, drop_last=False)
    for epoch in range(3):  # (the workers warn, in their own processes)
        dl.set_epoch(epoch)
        list(dl)
    assert ds.num_bad_files == 2 and ds.num_bad_loads == 6  # 2 files, substituted once per epoch each
    report = dl.bad_file_report()
    assert report == {"bad_files": sorted(str(dirty / "train" / b) for b in BAD),
                      "skipped_files": sorted(str(dirty / "train" / s) for s in SKIPPED)}


@pytest.mark.parametrize("backend,workers", [("torch", "2"), ("dali", "1")])
def test_result_json_names_and_counts_bad_and_skipped_files(dirty, tmp_path, backend, workers):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    load_recipe("mocov2_r50").main(["--data", str(dirty), "--preset", "cifar", "--arch", "resnet18_cifar",
                                    "--data-backend", backend, "--workers", workers, "--batch-size", "8",
                                    "--epochs", "2", "--no-knn", "--out", str(out)])
    data = json.loads((out / "result.json").read_text())["data"]
    assert data == {"num_bad_files": 2, "bad_files": sorted(str(dirty / "train" / b) for b in BAD),
                    "num_skipped_files": 2, "skipped_files": sorted(str(dirty / "train" / s) for s in SKIPPED)}


@pytest.mark.parametrize("backend,workers", [("torch", "2"), ("dali", "1")])
def test_result_json_names_undecodable_shard_samples_as_shard_and_key(dirty, tmp_path, backend, workers):
    """The same images as tar shards: both shard readers train through the truncated and the garbage JPEG and list
    them as ``shard.tar:KEY`` (DALI: flagged from their header bytes when the index is read, never decoded)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from fastcl.data.shards import write_shards

    with pytest.warns(UserWarning, match="skipped 2 non-image"):
        samples = ImageFolderDataset(dirty / "train").samples
    pattern, n, _ = write_shards(dirty / "train", tmp_path / "shards", 6, labels=True)
    assert n == 16
    keys = [i for i, (path, _) in enumerate(samples) if any(path.endswith(b) for b in BAD)]
    bad = sorted(f"{tmp_path / 'shards'}/shard-{i // 6:06d}.tar:{i:09d}" for i in keys)
    out = tmp_path / "run"
    load_recipe("mocov2_r50").main(["--data", pattern, "--preset", "cifar", "--arch", "resnet18_cifar",
                                    "--data-backend", backend, "--workers", workers, "--batch-size", "8",
                                    "--epochs", "2", "--no-knn", "--out", str(out)])
    data = json.loads((out / "result.json").read_text())["data"]
    assert data == {"num_bad_files": 2, "bad_files": bad, "num_skipped_files": 0, "skipped_files": []}
