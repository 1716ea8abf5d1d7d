"""Unlabeled data (issue 12 item 1): ``--data`` a folder of images at any depth or a text file of image paths, on the
torchvision and DALI back ends, with the bad-file handling of labeled folders, and the label-free monitor (RankMe)
in log.jsonl and result.json unless ``--eval-data`` gives labels for kNN."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl import cli
from fastcl.data import augment
from fastcl.data import build as data_build
from fastcl.data.loader import TorchLoader
from fastcl.data.transforms import MultiViewTransform
from fastcl.data.unlabeled import UnlabeledImageDataset
from fastcl.engine.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "methods"))
from recipe_loader import load_recipe  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _img(path: Path, seed: int, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20 + seed % 7, 24, 3), dtype=np.uint8)).save(path, fmt)


def _colour(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.float64).mean((0, 1))


@pytest.fixture
def flat(tmp_path):
    for k in range(9):
        _img(tmp_path / "flat" / f"{k}.{['jpg', 'png', 'JPEG'][k % 3]}", k)
    return tmp_path / "flat"


@pytest.fixture
def nested(tmp_path):
    """Images 1 to 4 folders deep, a class-like folder among them; nothing here is a class."""
    root = tmp_path / "nested"
    dirs = ["", "dog", "2024/06", "2024/06/raw/x"]
    for k in range(12):
        _img(root / dirs[k % 4] / f"img{k:02d}.jpg", k)
    return root


@pytest.fixture
def mixed(tmp_path):
    """6 good images, non-images (.txt, .json, a hidden file, a file in a hidden folder), a corrupt and a truncated
    image."""
    root = tmp_path / "mixed"
    for k in range(6):
        _img(root / ("a" if k % 2 else "") / f"{k}.png", k)
    (root / "notes.txt").write_text("hello")
    (root / "a" / "meta.json").write_text("{}")
    (root / ".hidden.jpg").write_bytes(b"x")
    (root / ".cache").mkdir()
    _img(root / ".cache" / "thumb.jpg", 99)
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2)
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    return root


def test_source_kinds(tmp_path, flat, nested):
    (tmp_path / "imnet" / "train" / "c").mkdir(parents=True)
    (tmp_path / "list.txt").write_text("flat/0.jpg\n")
    assert data_build.source_kind("cifar10") == "memory"
    assert data_build.source_kind(str(tmp_path / "imnet")) == "imagefolder"
    assert data_build.source_kind(str(flat)) == data_build.source_kind(str(nested)) == "folder"
    assert data_build.source_kind(str(tmp_path / "list.txt")) == "list"
    with pytest.raises(FileNotFoundError, match="--data .*nope: no such file or folder"):
        data_build.source_kind(str(tmp_path / "nope"))
    assert not data_build.has_labels(str(flat)) and data_build.has_labels(str(tmp_path / "imnet"))


def test_flat_folder(flat):
    ds = UnlabeledImageDataset(flat)
    assert [Path(p).name for p, _ in ds.samples] == [f"{k}.{['jpg', 'png', 'JPEG'][k % 3]}" for k in range(9)]
    assert ds.targets == [-1] * 9 and ds.num_skipped_files == 0
    img, label, idx = ds[4]
    assert label == -1 and idx == 4 and np.allclose(np.asarray(img, np.float64).mean((0, 1)), _colour(flat / "4.png"))


def test_nested_folder_at_any_depth(nested):
    ds = UnlabeledImageDataset(nested)
    rel = [str(Path(p).relative_to(nested)) for p, _ in ds.samples]
    assert len(rel) == 12 and rel == sorted(rel, key=lambda r: (str(Path(r).parent), r))
    assert {r.count("/") for r in rel} == {0, 1, 2, 4}  # 1 to 4 folders deep, all found
    assert set(ds.targets) == {-1}  # 'dog/' is not a class


def test_file_list(tmp_path, flat, nested):
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lines = ["# my images", "", f"{nested}/2024/06/img02.jpg", "../flat/3.jpg", "  ../flat/1.png  ",
             "../flat/notes.md", "../flat/missing.jpg"]
    lst.write_text("\n".join(lines) + "\n")
    ds = UnlabeledImageDataset(lst)
    assert [Path(p).resolve() for p, _ in ds.samples] == [
        nested / "2024/06/img02.jpg", flat / "3.jpg", flat / "1.png", (tmp_path / "flat" / "missing.jpg")]
    assert ds.num_skipped_files == 1 and ds.skipped_files[0].endswith("notes.md")  # not an image: skipped, counted
    # the missing file is a bad file: substituted by the next good sample (wrapping around) and reported
    with pytest.warns(RuntimeWarning, match="missing.jpg"):
        out = [ds[i] for i in range(len(ds))]
    assert np.array_equal(np.asarray(out[3][0]), np.asarray(out[0][0])) and out[3][2] == 3
    assert ds.bad_file_report() == {"bad_files": [str(tmp_path / "lists" / "../flat/missing.jpg")],
                                    "skipped_files": [str(tmp_path / "lists" / "../flat/notes.md")]}


def test_mixed_folder_non_images_skipped_and_counted(mixed):
    with pytest.warns(UserWarning, match="skipped 3 non-image"):
        ds = UnlabeledImageDataset(mixed)
    assert sorted(Path(p).name for p in ds.skipped_files) == [".hidden.jpg", "meta.json", "notes.txt"]
    assert len(ds) == 8  # 6 good + 2 undecodable image files (never the hidden folder's)
    dl = TorchLoader(ds, 4, shuffle=False, drop_last=False, num_workers=0)
    ds.transform = MultiViewTransform(augment.mocov2_aug_plus(size=8))
    with pytest.warns(RuntimeWarning):
        idx = torch.cat([i for _, _, i in dl])
    assert sorted(idx.tolist()) == list(range(8))
    assert sorted(Path(p).name for p in ds.bad_files) == ["corrupt.jpg", "truncated.jpg"]


def test_no_images_is_one_clear_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--data .*docs: no image files .* holds 1 other file\(s\), e.g. .*a.txt"):
        UnlabeledImageDataset(tmp_path / "docs")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt: no image files"):
        UnlabeledImageDataset(tmp_path / "empty.txt")


@pytest.mark.parametrize("kind", ["nested", "list"])
def test_dali_reads_the_same_files_exactly_once(tmp_path, nested, mixed, kind):
    pytest.importorskip("nvidia.dali")
    from fastcl.data.dali import DaliLoader

    if kind == "list":
        lst = tmp_path / "l.txt"
        lst.write_text("\n".join(str(p) for p in sorted(mixed.rglob("*")) if p.is_file()))
        source = lst
    else:
        source = nested
    ds = data_build.train_files(str(source))
    seen = []
    with pytest.warns(RuntimeWarning) if kind == "list" else _nothing():
        for rank in range(2):
            dl = DaliLoader(ds, augment.mocov2_aug_plus(size=16), 2, rank=rank, world_size=2, drop_last=False)
            assert dl.paths == [p for p, _ in ds.samples]
            for views, labels, idx in dl:
                assert (labels == -1).all() and all(torch.isfinite(v).all() for v in views)
                seen += idx.tolist()
    assert sorted(seen) == list(range(len(ds)))
    if kind == "list":  # a list is taken as written: its hidden '.jpg' (one byte) is an image file, and a bad one
        report = dl.bad_file_report()
        assert sorted(Path(p).name for p in report["bad_files"]) == [".hidden.jpg", "corrupt.jpg", "truncated.jpg"]
        assert sorted(Path(p).name for p in report["skipped_files"]) == ["meta.json", "notes.txt"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_monitor_loaders_follow_the_labels(tmp_path, nested):
    from fastcl.eval.rankme import LabelFree

    mon = data_build.build_knn_loaders(str(nested), CPU, 16, knn_samples=5, workers=0)
    assert isinstance(mon, LabelFree) and len(mon.loader.dataset) == 5
    imnet = tmp_path / "imnet"
    for split in ("train", "val"):
        for c in ("a", "b"):
            _img(imnet / split / c / "0.png", 1)
    train, val = data_build.build_knn_loaders(str(nested), CPU, 16, workers=0, eval_data=str(imnet))
    assert train.dataset.classes == ["a", "b"] and len(val.dataset) == 2
    with pytest.raises(ValueError, match="--eval-data .*nested: the kNN monitor needs labels"):
        data_build.build_knn_loaders(str(nested), CPU, 16, workers=0, eval_data=str(nested))
    with pytest.raises(ValueError, match="has no labels, so no val split: .* --eval-data"):
        data_build.dataset(str(nested), "val", None)


def _run(argv, capsys=None):
    return load_recipe("mocov2_r50").main(["--preset", "cifar", "--arch", "resnet18_cifar", "--batch-size", "8",
                                           "--epochs", "2", "--knn-every", "1", *argv])


@pytest.mark.parametrize("backend,workers", [("torch", "0"), ("dali", "1")])
def test_training_on_an_unlabeled_folder_logs_rankme(tmp_path, nested, backend, workers):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    (nested / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    _run(["--data", str(nested), "--data-backend", backend, "--workers", workers, "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["rankme_max"] == 12 and 1 <= result["rankme"] <= 12  # 12 images of 512-d features
    assert result["emb_std"] > 0 and "top1" not in result
    assert result["data"]["num_skipped_files"] == 1 and result["data"]["skipped_files"][0].endswith("notes.txt")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    monitor = [r for r in records if "rankme" in r]
    assert [r["epoch"] for r in monitor] == [1, 2]  # every --knn-every epoch and at the end
    assert monitor[-1]["rankme"] == result["rankme"]


def test_a_file_list_with_eval_data_runs_knn(tmp_path, nested):
    lst = tmp_path / "train.txt"
    lst.write_text("\n".join(str(p) for p in sorted(nested.rglob("*.jpg"))))
    imnet = tmp_path / "imnet"
    for split, n in (("train", 5), ("val", 2)):
        for c in ("a", "b"):
            for k in range(n):
                _img(imnet / split / c / f"{k}.png", k + (c == "b") * 10)
    out = tmp_path / "run"
    _run(["--data", str(lst), "--eval-data", str(imnet), "--data-backend", "torch", "--workers", "0",
          "--knn-k", "3", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert "top1" in result and "rankme" not in result


@pytest.mark.parametrize("argv,message", [
    (["--data", "{tmp}/nope"], "error: --data {tmp}/nope: no such file or folder"),
    (["--data", "{tmp}/docs"], "error: --data {tmp}/docs: no image files"),
])
def test_bad_data_is_one_error_line(tmp_path, capsys, argv, message):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main_guard(lambda: _run(argv + ["--out", str(tmp_path / "o"), "--workers", "0"]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]]


def test_cpu_warning_names_the_monitor_that_runs(flat, capsys):
    """The CPU cap of --knn-samples names the label-free monitor (RankMe) on unlabeled data without --eval-data
    (it embeds no test images and 0 means 25,600, not all), the kNN monitor otherwise."""
    from types import SimpleNamespace

    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    for data, eval_data, monitor in ((str(flat), None, "label-free"), (str(flat), "cifar10", "kNN"),
                                     ("cifar10", None, "kNN")):
        args = SimpleNamespace(knn_samples=None, no_knn=False, data=data, eval_data=eval_data)
        cli.cap_cpu_knn(args, dist)
        err = capsys.readouterr().err
        assert args.knn_samples == cli.CPU_KNN_SAMPLES
        if monitor == "label-free":
            assert err.strip() == ("warning: training on the CPU: the label-free monitor (RankMe, embedding std) "
                                   "embeds 5000 training images, not 25,600; pass --knn-samples 0 for 25,600")
        else:
            assert "the kNN monitor embeds 5000 training images (and 1000 test images)" in err and "RankMe" not in err
