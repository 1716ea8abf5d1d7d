"""ImageFolder datasets (ImageNet layout: ``root/train/<class>/*.jpg``, ``root/val/<class>/*``).

Scanning (at construction):
- a missing root -> ``FileNotFoundError`` naming it; a root with no class folders, or a class folder
  with no image files -> ``ValueError`` naming the folder;
- files whose extension is not an image extension (``IMG_EXTENSIONS``, case-insensitive) are skipped,
  counted in ``num_skipped_files`` and reported in one warning naming a few of them.

Loading (``__getitem__``): images are decoded with PIL and converted to RGB (grayscale, CMYK, palette
and RGBA inputs included). A file that cannot be read or decoded (corrupt, truncated, unreadable) never
raises mid-epoch and never silently shrinks the epoch: the loader warns (naming the file and the running
count) and substitutes a deterministic replacement -- the next readable sample in dataset order
(``index + 1``, ``index + 2``, ... wrapping around), returned with *its* label and the *requested*
``index`` (so the sampler's exactly-once accounting holds). ``num_bad_loads`` counts substitutions
across DataLoader worker processes; ``bad_files`` holds the paths this process has seen fail;
``verify()`` decodes everything up front and returns the bad paths.

>>> ds = ImageFolderDataset("/data/imagenet/train")          # doctest: +SKIP
>>> val = ImageFolderDataset("/data/imagenet/val", classes=ds.classes)   # doctest: +SKIP
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What a corrupt / truncated / unreadable image raises in PIL (UnidentifiedImageError is an OSError;
# truncated JPEGs raise OSError; some broken headers raise SyntaxError/ValueError/struct errors).
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, IndexError)


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the (non-hidden) class folders in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {str(root)!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder root {str(root)!r} contains no class folders")
    return classes


def load_rgb(path: str) -> Image.Image:
    """Fully decode ``path`` and convert to RGB (raises on corrupt or truncated files)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # force the decode now so truncation errors surface here
        if img.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit grey: convert("RGB") clips at 255 (white);
            img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))  # as DALI
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images in class folders; ``dataset[i] -> (transform(img), label, i)``.

    Args:
        root: the split directory (e.g. ``imagenet/train``) containing one folder per class.
        transform: callable on an RGB PIL image (e.g. ``MultiViewTransform``); ``None`` returns the image.
        classes: class folder names defining the label order (pass the train split's ``classes``
            for val); default: sorted folders of ``root``. A listed class missing from ``root`` raises.
        extensions: accepted file extensions (lower case, with the dot).

    Raises:
        FileNotFoundError: ``root`` (or a listed class folder) is missing.
        ValueError: no class folders, or a class folder without image files.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, *,
                 classes: Sequence[str] | None = None, extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = Path(root)
        self.transform = transform
        found = find_classes(self.root)
        if classes is None:
            classes = found
        else:
            classes = list(classes)
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"ImageFolder root {str(self.root)!r} has class folders not in `classes`: {extra[:5]}")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)

        self.samples: list[tuple[str, int]] = []
        skipped: list[str] = []
        for c in self.classes:
            cdir = self.root / c
            if not cdir.is_dir():
                raise FileNotFoundError(f"class folder {str(cdir)!r} does not exist")
            n_before = len(self.samples)
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    path = os.path.join(dirpath, fn)
                    if fn.lower().endswith(exts) and not fn.startswith("."):
                        self.samples.append((path, self.class_to_idx[c]))
                    else:
                        skipped.append(path)
            if len(self.samples) == n_before:
                raise ValueError(f"class folder {str(cdir)!r} contains no image files "
                                 f"(extensions {', '.join(exts)})")
        self.targets = [y for _, y in self.samples]
        self.num_skipped_files = len(skipped)
        self.skipped_files = skipped
        if skipped:
            warnings.warn(f"ImageFolderDataset({str(self.root)!r}): skipped {len(skipped)} non-image file(s), "
                          f"e.g. {', '.join(skipped[:3])}", stacklevel=2)
        self.bad_files: set[str] = set()
        self._bad_count = multiprocessing.Value("q", 0)  # shared with forked/spawned DataLoader workers

    # -- pickling: keep the shared counter when spawning workers, else start a fresh one ----------
    def __getstate__(self):
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_bad_count"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._bad_count is None:
            self._bad_count = multiprocessing.Value("q", 0)

    @property
    def num_bad_loads(self) -> int:
        """Substituted loads so far, summed over this process and its DataLoader workers."""
        return self._bad_count.value

    def __len__(self) -> int:
        return len(self.samples)

    def _record_bad(self, path: str, err: BaseException, index: int) -> int:
        with self._bad_count.get_lock():
            self._bad_count.value += 1
            count = self._bad_count.value
        self.bad_files.add(path)
        warnings.warn(f"ImageFolderDataset: cannot load {path!r} ({type(err).__name__}: {err}); "
                      f"substituting the next readable sample for index {index} "
                      f"({count} bad load(s) so far)", RuntimeWarning, stacklevel=3)
        return count

    def __getitem__(self, index: int):
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            if k > 0 and path in self.bad_files:
                continue
            try:
                img = load_rgb(path)
            except _LOAD_ERRORS as err:
                self._record_bad(path, err, index)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, label, int(index)
        raise RuntimeError(f"ImageFolderDataset({str(self.root)!r}): no readable image at all")

    def verify(self) -> list[str]:
        """Decode every file now; returns the paths that fail (does not change ``num_bad_loads``)."""
        bad = []
        for path, _ in self.samples:
            try:
                load_rgb(path)
            except _LOAD_ERRORS:
                bad.append(path)
        return bad
