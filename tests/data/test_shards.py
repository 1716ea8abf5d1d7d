"""Sharded tar datasets (issue 12 item 2): the writer round-trips a folder; the streaming reader gives every kept sample
exactly once per epoch across 2 ranks x workers, reshuffled per epoch, and resumes mid-epoch with exactly the
batches not yet trained on; a recipe trains on a shard pattern."""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl.data import build as data_build
from fastcl.data.shards import ShardIndex, ShardLoader, expand, main, write_shards

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "methods"))
from recipe_loader import load_recipe  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """37 images in 3 class folders (nested sub-folder in one), PNG and JPEG, plus a text file."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    for k in range(37):
        d = root / f"c{k % 3}" / ("deep" if k % 5 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 18, 3), dtype=np.uint8)).save(d / f"{k:02d}.{'png' if k % 2 else 'jpeg'}")
    (root / "c0" / "notes.txt").write_text("x")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    pattern, n, skipped = write_shards(folder, out, 8, labels=True)
    return pattern, n


def _pixels(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


def test_writer_round_trip(folder, tmp_path, capsys):
    main(["--src", str(folder), "--out", str(tmp_path / "s"), "--shard-size", "8", "--labels"])
    printed = capsys.readouterr().out
    pattern = f"{tmp_path / 's'}/shard-{{000000..000004}}.tar"
    assert "wrote 37 samples in 5 shard(s); skipped 1 non-image file(s)" in printed and f"--data '{pattern}'" in printed
    paths = expand(pattern)
    assert [Path(p).name for p in paths] == [f"shard-{k:06d}.tar" for k in range(5)]
    from fastcl.data.imagefolder import ImageFolderDataset

    ref = ImageFolderDataset(folder)
    got = []
    for p in paths:
        with tarfile.open(p) as tar:
            members = tar.getmembers()
            for img_m, cls_m in zip(members[::2], members[1::2]):
                assert img_m.name.split(".")[0] == cls_m.name.split(".")[0] and cls_m.name.endswith(".cls")
                got.append((tar.extractfile(img_m).read(), int(tar.extractfile(cls_m).read())))
    assert len(got) == 37 and [len(tarfile.open(p).getmembers()) for p in paths] == [16, 16, 16, 16, 10]
    for (data, label), (path, ref_label) in zip(got, ref.samples):  # same bytes, same labels, in the folder's order
        assert data == Path(path).read_bytes() and label == ref_label
    # unlabeled: images only
    pattern2, n, _ = write_shards(folder, tmp_path / "u", 100)
    assert n == 37 and all(not m.name.endswith(".cls") for m in tarfile.open(expand(pattern2)[0]).getmembers())
    assert ShardIndex(pattern2).has_labels is False and ShardIndex(pattern).has_labels


def test_index_reads_the_samples(shards, folder):
    pattern, n = shards
    index = ShardIndex(pattern)
    assert len(index) == 37
    from fastcl.data.imagefolder import ImageFolderDataset

    ref = ImageFolderDataset(folder)
    dl = ShardLoader(pattern, None, 1, num_workers=0, shuffle_buffer=1)
    handles = {}
    for i in (0, 9, 36):
        s, r = dl._locate(i)
        img, label, idx = dl._load(handles, i, s, r)
        assert idx == i and label == ref.samples[i][1] and _pixels(img) == _pixels(Image.open(ref.samples[i][0]))


def _epoch(dl, epoch, start=0):
    dl.set_epoch(epoch, start)
    return [(idx.tolist(), labels.tolist()) for _, labels, idx in dl]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_exactly_once_per_epoch_over_two_ranks(shards, workers):
    pattern, n = shards
    from fastcl.data import augment
    from fastcl.data.transforms import MultiViewTransform

    tf = MultiViewTransform(augment.mocov2_aug_plus(size=8))
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(2):  # two ranks simulated: each builds its loader as under torchrun
            dl = ShardLoader(pattern, tf, 3, rank=rank, world_size=2, seed=4, num_workers=workers, shuffle_buffer=5)
            assert len(dl) == 37 // 6
            batches = _epoch(dl, epoch)
            assert len(batches) == len(dl) and all(len(b) == 3 for b, _ in batches)
            assert [b for b, _ in batches] == [b.tolist() for b in dl.epoch_indices(epoch)]  # the plan, read back
            seen += [i for b, _ in batches for i in b]
        assert len(seen) == len(set(seen)) == 36  # each kept sample once; 37 - 36 dropped (< 2 ranks x 3)
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_batches_not_trained_on(shards, workers):
    pattern, _ = shards
    dl = ShardLoader(pattern, None, 2, rank=1, world_size=2, seed=1, num_workers=workers, shuffle_buffer=4)
    dl.transform = lambda img: torch.from_numpy(np.asarray(img)).float().mean()  # (collatable)
    full = _epoch(dl, 3)
    for k in (1, 4, len(dl) - 1):
        assert _epoch(dl, 3, k) == full[k:]  # same batches, same order, same labels


def test_resume_with_workers_0_is_bit_exact_with_augmentations(shards):
    pattern, _ = shards
    from fastcl.data import augment
    from fastcl.data.transforms import MultiViewTransform

    dl = ShardLoader(pattern, MultiViewTransform(augment.mocov2_aug_plus(size=8)), 4, num_workers=0)
    dl.set_epoch(1)
    torch.manual_seed(0)
    full = [views for views, _, _ in dl]
    it = iter(dl)
    torch.manual_seed(0)
    dl.set_epoch(1)
    it = iter(dl)
    head = [next(it)[0] for _ in range(3)]
    state = torch.get_rng_state()  # what the trainer's checkpoint holds
    dl2 = ShardLoader(pattern, MultiViewTransform(augment.mocov2_aug_plus(size=8)), 4, num_workers=0)
    dl2.set_epoch(1, 3)
    torch.set_rng_state(state)
    tail = [views for views, _, _ in dl2]
    assert all(torch.equal(a, b) for va, vb in zip(full, head + tail) for a, b in zip(va, vb))


def test_recipe_trains_on_a_shard_pattern(shards, tmp_path):
    pattern, _ = shards
    out = tmp_path / "run"
    load_recipe("mocov2_r50").main(["--data", pattern, "--preset", "cifar", "--arch", "resnet18_cifar",
                                    "--batch-size", "8", "--epochs", "1", "--workers", "0", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 37 // 8 and 1 <= result["rankme"] <= result["rankme_max"]
    assert data_build.resolve_backend(pattern, "auto", torch.device("cpu"), workers=0) == "torch"


def test_bad_patterns_are_clear_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"3 of 3 shard\(s\) missing, e.g. .*s-000000.tar"):
        expand(str(tmp_path / "s-{000000..000002}.tar"))
    with pytest.raises(ValueError, match="--data-backend dali needs --workers >= 1"):
        data_build.resolve_backend(shards[0], "dali", torch.device("cpu"), workers=0)


@pytest.mark.parametrize("workers", [2, 0])
def test_undecodable_samples_found_in_workers_reach_the_report(tmp_path, workers):
    """Samples that do not decode in DataLoader workers (bytes that are no image, a truncated JPEG) are substituted
    and listed by bad_file_report() in the main process -- what result.json's data.bad_files records."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for k in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / f"{k:02d}.jpg")
    (src / "03.jpg").write_bytes(b"not an image")
    (src / "07.jpg").write_bytes((src / "06.jpg").read_bytes()[:60])
    pattern, _, _ = write_shards(src, tmp_path / "s", 5)
    dl = ShardLoader(pattern, lambda img: torch.from_numpy(np.asarray(img).copy()), 2, num_workers=workers)
    with pytest.warns(RuntimeWarning, match="cannot decode") if workers == 0 else _no_check():
        seen = [i for _, _, idx in dl for i in idx.tolist()]
    assert sorted(seen) == list(range(12))  # substituted, not dropped
    paths = expand(pattern)
    assert dl.bad_file_report() == {"bad_files": [f"{paths[0]}:000000003", f"{paths[1]}:000000007"],
                                    "skipped_files": []}
    assert data_build.data_report(dl) == {"data": {"num_bad_files": 2, "bad_files": dl.bad_file_report()["bad_files"],
                                                   "num_skipped_files": 0, "skipped_files": []}}


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
