import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl.data import augment
from fastcl.data.imagefolder import ImageFolderDataset
from fastcl.data.loader import TorchLoader
from fastcl.data.transforms import MultiViewTransform


def _jpeg_bytes(colour=(200, 30, 40), size=(20, 16), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog}: good RGB JPEGs, a grayscale and a CMYK JPEG, a corrupt and a truncated JPEG, a .txt."""
    root = tmp_path / "train"
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "sub").mkdir(parents=True)
    for i in range(3):
        (root / "cat" / f"{i}.jpg").write_bytes(_jpeg_bytes((200, 30 * i, 40)))
    (root / "cat" / "3_gray.JPEG").write_bytes(_jpeg_bytes(128, mode="L"))
    (root / "cat" / "4_corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" + bytes(range(256)))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "0.jpg").write_bytes(_jpeg_bytes((10, 220, 10)))
    (root / "dog" / "1_cmyk.jpg").write_bytes(_jpeg_bytes((0, 255, 255, 0), mode="CMYK"))  # pure red in CMYK
    good = _jpeg_bytes((10, 10, 220), size=(64, 64))
    (root / "dog" / "sub" / "2_truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def _scan(path, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(path, **kw)
    return ds, [str(x.message) for x in w]


def test_scan_skips_and_counts_non_images(folder):
    ds, msgs = _scan(folder)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 8  # corrupt/truncated files are still samples: the epoch never shrinks
    assert ds.num_skipped_files == 1 and ds.skipped_files[0].endswith("notes.txt")
    assert len(msgs) == 1 and "notes.txt" in msgs[0] and "skipped 1" in msgs[0]
    assert ds.targets == [0] * 5 + [1] * 3


def test_bad_files_substituted_counted_and_warned(folder):
    ds, _ = _scan(folder)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = [ds[i] for i in range(len(ds))]
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(out) == len(ds)
    assert ds.num_bad_loads == 2
    assert {p.rsplit("/", 1)[-1] for p in ds.bad_files} == {"4_corrupt.jpg", "2_truncated.jpg"}
    assert any("4_corrupt.jpg" in m for m in msgs) and any("2_truncated.jpg" in m for m in msgs)
    for img, label, index in out:
        assert img.mode == "RGB"
    assert [index for _, _, index in out] == list(range(len(ds)))  # requested index is kept
    # deterministic replacement: the next readable sample in order (cat/4_corrupt -> dog/0.jpg)
    names = [p.rsplit("/", 1)[-1] for p, _ in ds.samples]
    bad = names.index("4_corrupt.jpg")
    assert np.array_equal(np.asarray(out[bad][0]), np.asarray(out[bad + 1][0])) and out[bad][1] == out[bad + 1][1]
    trunc = names.index("2_truncated.jpg")  # the last sample wraps around to the first
    assert np.array_equal(np.asarray(out[trunc][0]), np.asarray(out[0][0])) and out[trunc][1] == 0
    assert sorted(p.rsplit("/", 1)[-1] for p in ds.verify()) == ["2_truncated.jpg", "4_corrupt.jpg"]


def test_grayscale_and_cmyk_convert_to_rgb(folder):
    ds, _ = _scan(folder)
    names = [p.rsplit("/", 1)[-1] for p, _ in ds.samples]
    gray = np.asarray(ds[names.index("3_gray.JPEG")][0]).astype(int)
    assert gray.shape == (16, 20, 3) and (gray[..., 0] == gray[..., 1]).all() and abs(gray.mean() - 128) < 3
    cmyk = np.asarray(ds[names.index("1_cmyk.jpg")][0]).astype(int).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # red


def test_bad_loads_counted_across_workers(folder):
    ds, _ = _scan(folder, transform=MultiViewTransform(augment.mocov2_aug_plus(size=8)))
    ld = TorchLoader(ds, 3, shuffle=False, drop_last=False, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(ld)
    idx = torch.cat([i for _, _, i in batches])
    assert sorted(idx.tolist()) == list(range(len(ds)))
    assert all(len(v) == 2 and v[0].shape[1:] == (3, 8, 8) for v, _, _ in batches)
    assert ds.num_bad_loads == 2  # incremented inside the worker processes


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope")


def test_no_class_folders(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path)


def test_empty_class_folder(folder):
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(folder)


def test_class_folder_with_only_non_images(folder):
    (folder / "zebra").mkdir()
    (folder / "zebra" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="zebra"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageFolderDataset(folder)


def test_val_uses_train_classes(folder, tmp_path):
    train, _ = _scan(folder)
    val_root = tmp_path / "val"
    (val_root / "dog").mkdir(parents=True)
    (val_root / "dog" / "x.jpg").write_bytes(_jpeg_bytes())
    with pytest.raises(FileNotFoundError, match="cat"):  # a train class missing from val
        ImageFolderDataset(val_root, classes=train.classes)
    (val_root / "cat").mkdir()
    (val_root / "cat" / "y.png").write_bytes(_jpeg_bytes())  # extension decides, PIL sniffs the format
    val = ImageFolderDataset(val_root, classes=train.classes)
    assert val.targets == [0, 1]
    (val_root / "cow").mkdir()
    with pytest.raises(ValueError, match="cow"):
        ImageFolderDataset(val_root, classes=train.classes)


def test_16bit_grey_png_scaled_not_clipped(tmp_path):
    """PIL's convert('RGB') clips 16-bit grey at 255 (a white image); DALI's decoder scales it to 8 bits."""
    import numpy as np
    from PIL import Image

    from fastcl.data.imagefolder import load_rgb

    a = np.random.default_rng(0).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = np.asarray(load_rgb(str(tmp_path / "x.png")))
    assert out.shape == (16, 16, 3) and np.array_equal(out[..., 0], (a >> 8).astype(np.uint8))
