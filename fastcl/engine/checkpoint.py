"""Atomic checkpoints (temp file + rename) and per-rank RNG state capture/restore."""
from __future__ import annotations

import os
import random
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


def save_atomic(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say which
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e
