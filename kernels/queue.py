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
from .utils import cdiv, interpreting, next_power_of_2, nvtx, tl, triton

# ======================================================================================
# kernels
# ======================================================================================


@triton.jit
def _enqueue_forward_kernel(X_ptr, X_row_stride, Q_ptr, Q_row_stride, PTR_ptr, n_rows, n_cols, size,
                            NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows r of the batch go to slot (ptr + r) mod size, cast and (optionally) L2-normalized in
    fp32 on the way: x / max(‖x‖, 1e-12), as F.normalize. The pointer is read on the device."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X_ptr + rows[:, None] * X_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        x = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
    ptr = tl.load(PTR_ptr)
    slot = (ptr + rows) % size  # int64: size·dim may pass 2^31 for big queues
    tl.store(Q_ptr + slot[:, None] * Q_row_stride + cols[None, :], x.to(Q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _advance_ptr_kernel(PTR_ptr, n_rows, size):
    """ptr ← (ptr + B) mod size; a separate launch because every enqueue program reads ptr."""
    tl.store(PTR_ptr, (tl.load(PTR_ptr) + n_rows) % size)


# ======================================================================================
# host
# ======================================================================================


def enqueue_triton(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool = True) -> None:
    b, c = keys.shape
    if queue.stride(1) != 1 or keys.stride(1) != 1:
        raise ValueError("queue and keys need a unit inner stride")
    block_c = max(16, next_power_of_2(c))
    block_r = max(1, min(16 if interpreting() else 32, 8192 // block_c))
    _enqueue_forward_kernel[(cdiv(b, block_r),)](
        keys, keys.stride(0), queue, queue.stride(0), ptr, b, c, queue.shape[0],
        NORMALIZE=normalize, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=1 if interpreting() else 4)
    _advance_ptr_kernel[(1,)](ptr, b, queue.shape[0])

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
    with nvtx("enqueue"):
        if use_triton(queue, keys) and ptr.dtype == torch.int64 and ptr.device == queue.device:
            enqueue_triton(queue, ptr, keys if keys.stride(1) == 1 else keys.contiguous(), normalize)
        else:
            enqueue_reference(queue, ptr, keys, normalize)


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


__all__ = ["KeyQueue", "enqueue_", "enqueue_reference", "enqueue_triton"]
