"""benchmarks/stage_cifar10.py: CIFAR-10 packed as lossless WebP for a GPU machine comes back bit-exact, and a
damaged or incomplete staging is refused with one error line instead of a wrong dataset."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastcl.data.cifar10 import load_cifar10

_spec = importlib.util.spec_from_file_location(
    "stage_cifar10", Path(__file__).resolve().parents[2] / "benchmarks" / "stage_cifar10.py")
stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage)


@pytest.fixture
def staged(tmp_path):
    """A small CIFAR-shaped npy cache (random pixels: worst case for the codec), packed in blocks of 16."""
    rng = np.random.default_rng(0)
    npy = tmp_path / "src" / "cifar10" / "npy"
    npy.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 40), ("test", 20)):
        arrays[split] = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
        np.save(npy / f"{split}_images.npy", arrays[split][0])
        np.save(npy / f"{split}_labels.npy", arrays[split][1])
    (npy / "source.json").write_text(json.dumps({"source": "test"}))
    (tmp_path / "dest").mkdir()
    folders = stage.pack(str(tmp_path / "src"), tmp_path / "dest", block=16)
    pool = tmp_path / "pool"  # what the device calls gather: every folder's files in one place
    pool.mkdir()
    for f in folders:
        for p in f.iterdir():
            shutil.copy(p, pool)
    return arrays, pool, tmp_path


def test_round_trip_is_bit_exact(staged):
    arrays, pool, tmp = staged
    assert len(list(pool.glob("*.webp"))) == 3 + 2  # ceil(40/16) + ceil(20/16) blocks
    stage.unpack(pool, tmp / "dev")
    for split, (x, y) in arrays.items():
        xs, ys = load_cifar10(tmp / "dev", split=split)
        assert xs.dtype == np.uint8 and np.array_equal(xs, x) and np.array_equal(ys, y)
    assert json.loads((tmp / "dev" / "cifar10" / "npy" / "source.json").read_text())["source"] == "test"


def test_damaged_or_missing_part_is_refused(staged, capsys):
    arrays, pool, tmp = staged
    y = np.load(pool / "test_labels.npy")
    np.save(pool / "test_labels.npy", (y + 1) % 10)
    with pytest.raises(SystemExit, match="error: staged CIFAR-10 test does not match its SHA-256"):
        stage.unpack(pool, tmp / "dev")
    assert not (tmp / "dev" / "cifar10" / "npy").exists()  # nothing half-written is published
    (pool / "train_0.webp").unlink()
    with pytest.raises(SystemExit, match=r"error: .* lacks \['train_0.webp'\]"):
        stage.unpack(pool, tmp / "dev")
