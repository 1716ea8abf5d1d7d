"""Unlabeled images: ``--data PATH`` where PATH is a folder with no ``train/`` split, or a text file listing images.

- **Folder**: every image file under PATH at any depth (sub-folders are not classes; hidden files and folders are
  left out), sorted by path. Files that are not images (by extension, ``IMG_EXTENSIONS``) are skipped and counted.
- **File list**: a text file, one image path per line; relative paths are relative to the list's folder; blank
  lines and lines starting with ``#`` are ignored. Listed files that are not images (by extension) are skipped
  and counted; listed files that are missing or undecodable are bad files (substituted by the next good sample
  and reported, as in a folder).

Samples carry the label ``-1``. The bad-file handling is ``fastcl.data.imagefolder.ImageFileDataset``'s, and the
DALI back end reads the same file list (``DaliLoader`` accepts the dataset).

>>> ds = UnlabeledImageDataset("/data/my_photos")          # doctest: +SKIP
>>> ds = UnlabeledImageDataset("/data/my_list.txt")        # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from .imagefolder import IMG_EXTENSIONS, ImageFileDataset, scan_images

NO_LABEL = -1


def read_file_list(path: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS
                   ) -> tuple[list[str], list[str]]:
    """(image paths, listed non-image paths) of a file list, in the list's order."""
    path = Path(path)
    base = path.parent
    exts = tuple(e.lower() for e in extensions)
    images: list[str] = []
    others: list[str] = []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"--data {path}: not a text file listing image paths (it is not UTF-8 text)") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = line if os.path.isabs(line) else str(base / line)
        (images if p.lower().endswith(exts) else others).append(p)
    return images, others


_SCANS: dict[tuple, tuple[list[str], list[str]]] = {}  # one scan per source and process (train and monitor share it)


def _scan(root: Path, extensions: Sequence[str]) -> tuple[list[str], list[str]]:
    st = root.stat()
    key = (str(root.resolve()), st.st_mtime_ns, st.st_size, tuple(extensions))
    if key not in _SCANS:
        _SCANS[key] = read_file_list(root, extensions) if root.is_file() else scan_images(root, extensions)
    return _SCANS[key]


class UnlabeledImageDataset(ImageFileDataset):
    """The images of a folder (any depth) or of a file list; ``dataset[i] -> (transform(img), -1, i)``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no image file found (the message names ``source`` and what was found instead).
    """

    def __init__(self, source: str | os.PathLike, transform: Callable | None = None, *,
                 extensions: Sequence[str] = IMG_EXTENSIONS):
        self.root = Path(source)
        if not (self.root.is_file() or self.root.is_dir()):
            raise FileNotFoundError(f"--data {source}: no such file or folder")
        paths, skipped = _scan(self.root, extensions)
        what = "lists" if self.root.is_file() else "holds"
        if not paths:
            raise ValueError(f"--data {source}: no image files ({', '.join(extensions)}); it {what} "
                             f"{len(skipped)} other file(s)" + (f", e.g. {skipped[0]}" if skipped else ""))
        self.classes: list[str] = []
        super().__init__([(p, NO_LABEL) for p in paths], transform, name=str(source), skipped=skipped)
