"""Atomic checkpoints (temp file + rename, free space checked first), the run's claim on its output folder, and
per-rank RNG state capture/restore."""
from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "checkpoint.pth"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


TMP_PREFIX = "."  # temp files: .<name>.tmp<pid>, renamed over <name> when complete


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _no_space(path: Path, need: int, free: int) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on the device of {path.parent}: the checkpoint needs about "
                                 f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free; the previous "
                                 f"{path.name} is kept. Free some space or pass another --out")


def save_atomic(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so a crash mid-write never leaves a truncated checkpoint behind. A disk that cannot
    hold it is refused before writing (and a write that fails all the same is reported as such), naming the
    folder and the bytes, with the previous checkpoint untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = _tensor_bytes(obj) + (1 << 20)  # tensors + pickle/zip overhead
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise _no_space(path, need, free)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save on a full disk says "basic_ios::clear: iostream error"
        free = shutil.disk_usage(path.parent).free
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or free < need:
            raise _no_space(path, need, free) from e
        raise OSError(getattr(e, "errno", None) or errno.EIO, f"could not write {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OutDirLock:
    """An exclusive ``fcntl`` lock on ``<out>/.lock`` held while a run uses the folder. The kernel drops it when
    the process dies (kill -9 included), so a dead run's lock is simply taken over."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.release()
        except OSError:
            pass


def claim_out_dir(out_dir: str | Path) -> OutDirLock:
    """Make ``out_dir`` (refusing a file or an unwritable place, naming ``--out``), lock it for this run (a second
    run on it is refused, naming the first one's pid), and remove temp checkpoints a killed run left behind."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"another run (pid {other}) is using --out {out}: wait for it to end, or pass another "
                         "--out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    for orphan in out.glob(f"{TMP_PREFIX}*.tmp*"):  # a kill during a write; no other writer holds the folder
        orphan.unlink(missing_ok=True)
    return OutDirLock(fd, out)


def find_resume(out_dir: str | Path, resume: str | None) -> Path | None:
    """``resume`` is a path, ``"auto"`` (the latest checkpoint in ``out_dir`` if any) or None/"none"."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        p = Path(out_dir) / LATEST
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint file at {p}")
    return p


def load_checkpoint(path: str | Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not read checkpoint {path}: not a PyTorch checkpoint, or torn ({first})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a fastcl training checkpoint")
    return ckpt
