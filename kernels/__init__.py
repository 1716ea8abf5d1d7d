"""Fused Triton kernels for contrastive learning, installed as ``fastcl.kernels``.

Every op has a plain-torch reference beside its Triton kernel; which one runs is chosen here:
``auto`` (default) uses Triton for CUDA tensors and torch otherwise, ``triton`` forces Triton
(on CPU that needs ``TRITON_INTERPRET=1`` set before this package is imported), ``torch`` forces
the references. Set it with ``set_backend`` or the ``FASTCL_KERNELS`` environment variable; recipes
expose it as ``--kernels {auto,triton,torch}``.

| Kernel | API | file |
|---|---|---|
| flash-style InfoNCE (MoCo queue, in-batch, NT-Xent) | ``moco_infonce``, ``inbatch_infonce``, ``ntxent``, ``contrastive_lse`` | infonce.py |
| key queue (ring buffer, device pointer) | ``KeyQueue`` | queue.py |
| EMA / momentum update | ``ema_update_``, ``EMAUpdater`` | ema.py |
| DINO loss | ``dino_loss`` | dino_loss.py |
| SwAV Sinkhorn-Knopp | ``sinkhorn`` | sinkhorn.py |
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_backend = os.environ.get("FASTCL_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"FASTCL_KERNELS must be one of {BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """``with fastcl.kernels.backend("torch"): ...`` runs the block under ``name``, then restores the previous one."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the op on ``tensors`` should run its Triton kernel under the current backend."""
    if _backend == "torch":
        return False
    if _backend == "triton":
        if not triton_available():
            raise RuntimeError("--kernels triton was asked for but triton is not installed")
        return True
    return triton_available() and all(t.is_cuda for t in tensors)


from .dino_loss import dino_loss  # noqa: E402
from .ema import EMAUpdater, ema_update_  # noqa: E402
from .infonce import contrastive_lse, inbatch_infonce, moco_infonce, ntxent  # noqa: E402
from .queue import KeyQueue  # noqa: E402
from .sinkhorn import sinkhorn  # noqa: E402

__all__ = ["BACKENDS", "set_backend", "get_backend", "triton_available", "use_triton", "moco_infonce",
           "inbatch_infonce", "ntxent", "contrastive_lse", "KeyQueue", "ema_update_", "EMAUpdater", "dino_loss",
           "sinkhorn"]
