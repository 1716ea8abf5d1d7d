"""MoCo key queue: a ring buffer of L2-normalized keys whose write pointer lives on the device.

Provenance: MoCo (He et al. 2019, arXiv:1911.05722) ``_dequeue_and_enqueue`` keeps the pointer as
a host int and asserts ``K % batch_size == 0``. Here the pointer is a 1-element int64 buffer, so
enqueue never syncs with the host and can be captured in a CUDA graph, and any batch size up to
``size`` works: the slots are ``(ptr + arange(B)) % size``, which wraps a batch that crosses the end
of the buffer. The Triton kernel fuses the dtype cast and the L2 normalization of the incoming keys
into the scattered write. No code was copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import use_triton

# ======================================================================================
# torch reference (also the CPU path); no host sync
# ======================================================================================


def enqueue_reference(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool = True) -> None:
    size, b = queue.shape[0], keys.shape[0]
    rows = keys.float()
    if normalize:
        rows = F.normalize(rows, dim=1)
    idx = (ptr + torch.arange(b, device=queue.device)) % size  # B slots, wrapping
    queue.index_copy_(0, idx, rows.to(queue.dtype))
    ptr.copy_((ptr + b) % size)


def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool = True) -> None:
    """Write ``keys`` (B, C) into the ring buffer ``queue`` (K, C) at the device pointer ``ptr``."""
    if keys.dim() != 2 or keys.shape[1] != queue.shape[1]:
        raise ValueError(f"keys must be (B, {queue.shape[1]}), got {tuple(keys.shape)}")
    if keys.shape[0] > queue.shape[0]:
        raise ValueError(f"a batch of {keys.shape[0]} keys does not fit a queue of {queue.shape[0]}")
    if keys.shape[0] == 0:
        return
    if use_triton(queue, keys) and _triton_enqueue is not None:
        _triton_enqueue(queue, ptr, keys, normalize)
    else:
        enqueue_reference(queue, ptr, keys, normalize)


_triton_enqueue = None


class KeyQueue(torch.nn.Module):
    """Ring buffer of ``size`` keys of width ``dim`` (MoCo's dictionary).

    Buffers: ``queue`` (size, dim), random L2-normalized rows at init; ``ptr`` (1,) int64, the next
    slot, on the same device. Both are in ``state_dict``, so checkpoints restore the queue exactly.

    >>> q = KeyQueue(128, 65536)
    >>> q.enqueue(torch.randn(256, 128))
    """

    def __init__(self, dim: int, size: int, normalize: bool = True):
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"dim and size must be positive, got dim={dim}, size={size}")
        self.dim, self.size, self.normalize = dim, size, normalize
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue_(self.queue, self.ptr, keys.detach(), self.normalize)

    def forward(self) -> torch.Tensor:
        return self.queue

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, normalize={self.normalize}"


__all__ = ["KeyQueue", "enqueue_", "enqueue_reference"]
