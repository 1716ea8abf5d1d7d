"""Shared by the picture commands: the headless matplotlib back end, where a PNG goes, and image files."""
from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg back end (no display needed; set before pyplot is first imported).
    matplotlib is an optional dependency (``pip install -e '.[viz]'``); without it the commands stop with one
    ``error:`` line (ValueError, as for DeepSpeed) instead of a traceback."""
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("the picture commands need matplotlib: pip install matplotlib (or pip install -e "
                         f"'.[viz]'); import failed: {e}") from None

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def out_dir(out: str | Path | None, default: str | Path) -> Path:
    """``--out`` if given, else ``default`` (the input's folder); created if missing, refused if a file."""
    d = Path(out) if out is not None else Path(default)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out {d} is a file, not a folder")
    from ..cli import make_dir

    make_dir(d, f"--out {d}")  # (was: "[Errno 20] Not a directory: ..." for an --out under a file, naming no flag)
    return d


def save(fig, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (via a temp file and rename, so a reader never sees half a PNG) and close it."""
    plt = pyplot()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def need_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: no such file")
    if not p.is_file():
        raise ValueError(f"{what} {p}: not a file")
    return p
