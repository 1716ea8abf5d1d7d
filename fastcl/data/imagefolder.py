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
``index`` (so the sampler's exactly-once accounting holds). A file is warned about once, when first found
bad, and never decoded again. ``num_bad_loads`` counts substitutions and ``bad_files`` / ``num_bad_files``
the distinct bad files, both across DataLoader worker processes (shared memory: one byte per sample);
``bad_file_report()`` lists them with the scan's non-image files (what ``result.json`` records);
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


_WARNED: set[tuple] = set()  # the skipped-files warnings given (train and monitor datasets share a scan)


class ImageFileDataset(Dataset):
    """Image files with labels; ``dataset[i] -> (transform(img), label, i)``, with the bad-file handling of the
    module docstring. The base of ``ImageFolderDataset`` (class folders) and the unlabeled datasets
    (``fastcl.data.unlabeled``: label ``-1``).

    Args:
        samples: ``(path, label)`` pairs, in index order.
        transform: callable on an RGB PIL image; ``None`` returns the image.
        name: how messages name the dataset (its folder or list file).
        skipped: paths the scan left out (not image files), reported with the bad files.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None, *, name: str = "",
                 skipped: Sequence[str] = ()):
        self.samples = list(samples)
        self.transform = transform
        self.name = name
        self.targets = [y for _, y in self.samples]
        self.num_skipped_files = len(skipped)
        self.skipped_files = list(skipped)
        if skipped and (type(self).__name__, name, len(skipped)) not in _WARNED:  # (once per process and folder)
            _WARNED.add((type(self).__name__, name, len(skipped)))
            warnings.warn(f"{type(self).__name__}({name!r}): skipped {len(skipped)} non-image file(s), "
                          f"e.g. {', '.join(self.skipped_files[:3])}", stacklevel=3)
        # shared with forked/spawned DataLoader workers: substitutions, and one flag per sample found undecodable
        self._bad_count = multiprocessing.Value("q", 0)
        self._bad_flags = multiprocessing.Array("b", max(1, len(self.samples)), lock=False)

    # -- pickling: keep the shared counters when spawning workers, else start fresh ones ----------
    def __getstate__(self):
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["_bad_count"] = state["_bad_flags"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._bad_count is None:
            self._bad_count = multiprocessing.Value("q", 0)
            self._bad_flags = multiprocessing.Array("b", max(1, len(self.samples)), lock=False)

    @property
    def num_bad_loads(self) -> int:
        """Substituted loads so far (requests for an undecodable file), summed over this process and its
        DataLoader workers."""
        return self._bad_count.value

    @property
    def bad_files(self) -> set[str]:
        """The distinct files found undecodable so far, by this process or its DataLoader workers."""
        return {self.samples[i][0] for i in range(len(self.samples)) if self._bad_flags[i]}

    @property
    def num_bad_files(self) -> int:
        return sum(1 for i in range(len(self.samples)) if self._bad_flags[i])

    def bad_file_report(self) -> dict:
        """``{"bad_files": sorted undecodable paths, "skipped_files": non-image paths left out by the scan}``."""
        return {"bad_files": sorted(self.bad_files), "skipped_files": list(self.skipped_files)}

    def __len__(self) -> int:
        return len(self.samples)

    def _record_bad(self, j: int, path: str, err: BaseException) -> None:
        if self._bad_flags[j]:
            return
        self._bad_flags[j] = 1
        warnings.warn(f"{type(self).__name__}: cannot load {path!r} ({type(err).__name__}: {err}); substituting "
                      f"the next readable sample ({self.num_bad_files} bad file(s) so far)", RuntimeWarning,
                      stacklevel=3)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for k in range(n):
            j = (index + k) % n
            path, label = self.samples[j]
            if not self._bad_flags[j]:
                try:
                    img = load_rgb(path)
                except _LOAD_ERRORS as err:
                    self._record_bad(j, path, err)
                else:
                    if k > 0:
                        with self._bad_count.get_lock():
                            self._bad_count.value += 1
                    if self.transform is not None:
                        img = self.transform(img)
                    return img, label, int(index)
        example = f", e.g. {self.samples[0][0]}" if n else ""  # (a user's data: one error line via cli.main_guard)
        raise ValueError(f"{self.name or type(self).__name__}: none of its {n} image file(s) can be read{example}")

    def verify(self) -> list[str]:
        """Decode every file now; returns the paths that fail (does not change ``num_bad_loads``)."""
        bad = []
        for path, _ in self.samples:
            try:
                load_rgb(path)
            except _LOAD_ERRORS:
                bad.append(path)
        return bad


class ImageFolderDataset(ImageFileDataset):
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

        samples: list[tuple[str, int]] = []
        skipped: list[str] = []
        for c in self.classes:
            cdir = self.root / c
            if not cdir.is_dir():
                raise FileNotFoundError(f"class folder {str(cdir)!r} does not exist")
            paths, skip = scan_images(cdir, exts)
            if not paths:
                raise ValueError(f"class folder {str(cdir)!r} contains no image files "
                                 f"(extensions {', '.join(exts)})")
            samples += [(p, self.class_to_idx[c]) for p in paths]
            skipped += skip
        super().__init__(samples, transform, name=str(self.root), skipped=skipped)


def scan_images(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> tuple[list[str], list[str]]:
    """(image files, other files) under ``root`` at any depth, each sorted by path (folders in sorted order,
    symlinks followed); hidden files count as other files, hidden folders are not entered."""
    exts = tuple(e.lower() for e in extensions)
    images: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            (images if fn.lower().endswith(exts) and not fn.startswith(".") else others).append(path)
    return images, others
