"""SwAV Sinkhorn-Knopp equipartition of prototype scores, fused into scaling-vector passes.

Provenance: SwAV (Caron et al. 2020, arXiv:2006.09882), facebookresearch/swav main_swav.py
``distributed_sinkhorn`` (eps 0.05, 3 iterations). SwAV materializes Q = exp(scores/eps)ᵀ and
rescales it in place ~10 times. Every rescaling is a diagonal scaling, so here
Q_bk = E_bk · r_k · c_b with E = exp(scores/eps) recomputed on the fly, and one iteration is two
passes that only produce vectors:

    r_k = 1 / (K · Σ_b E_bk c_b)        (prototype sums; all-reduced across ranks as in SwAV)
    c_b = 1 / (B · Σ_k E_bk r_k)        (sample sums, local; B = global batch)

SwAV's initial division by ΣQ is a scalar that the first prototype normalization cancels exactly
(its all-reduce too). The last sample pass also writes Q·B = E·r·c·B. No code was copied.
"""
from __future__ import annotations

import torch

from . import use_triton
from .utils import cdiv, interpreting, nvtx, tl, triton

LOG2E = 1.4426950408889634  # exp(x/eps) = exp2(x · log2(e)/eps)

# ======================================================================================
# kernels
# ======================================================================================


@triton.jit
def _sinkhorn_proto_kernel(S_ptr, S_row_stride, SHIFT_ptr, C_ptr, R_ptr, n_b, n_k, scale2,
                           HAS_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program = a block of prototypes: R_k = Σ_b exp2((s_bk − shift)·scale2) · c_b (c = 1 on the
    first pass). The shift is a constant common to all ranks, so the normalizations cancel it."""
    shift = tl.load(SHIFT_ptr).to(tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    cm = cols < n_k
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for b0 in range(0, n_b, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rm = rows < n_b
        mask = rm[:, None] & cm[None, :]
        s = tl.load(S_ptr + rows.to(tl.int64)[:, None] * S_row_stride + cols[None, :], mask=mask, other=0.0)
        e = tl.where(mask, tl.exp2((s.to(tl.float32) - shift) * scale2), 0.0)
        if HAS_C:
            e = e * tl.load(C_ptr + rows, mask=rm, other=0.0)[:, None]
        acc += tl.sum(e, axis=0)
    tl.store(R_ptr + cols, acc, mask=cm)


@triton.jit
def _sinkhorn_sample_kernel(S_ptr, S_row_stride, SHIFT_ptr, R_ptr, C_ptr, Q_ptr, n_b, n_k, scale2, inv_k,
                            b_total, WRITE_Q: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program = a block of samples: r_k = 1/(K·R_k) from the (all-reduced) prototype sums,
    c_b = 1/(B · Σ_k E_bk r_k); on the last iteration a second sweep writes Q_bk = E_bk r_k c_b B."""
    shift = tl.load(SHIFT_ptr).to(tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < n_b
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = cols < n_k
        mask = rm[:, None] & cm[None, :]
        s = tl.load(S_ptr + rows[:, None] * S_row_stride + cols[None, :], mask=mask, other=0.0)
        r = inv_k / tl.load(R_ptr + cols, mask=cm, other=1.0)
        acc += tl.sum(tl.where(mask, tl.exp2((s.to(tl.float32) - shift) * scale2) * r[None, :], 0.0), axis=1)
    c = 1.0 / (tl.where(rm, acc, 1.0) * b_total)  # masked tail rows: avoid 1/0
    tl.store(C_ptr + rows, c, mask=rm)
    if WRITE_Q:
        cb = c * b_total
        for k0 in range(0, n_k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cm = cols < n_k
            mask = rm[:, None] & cm[None, :]
            s = tl.load(S_ptr + rows[:, None] * S_row_stride + cols[None, :], mask=mask, other=0.0)
            r = inv_k / tl.load(R_ptr + cols, mask=cm, other=1.0)
            q = tl.exp2((s.to(tl.float32) - shift) * scale2) * r[None, :] * cb[:, None]
            tl.store(Q_ptr + rows[:, None] * n_k + cols[None, :], q, mask=mask)


# ======================================================================================
# host
# ======================================================================================


def sinkhorn_triton(scores, eps, n_iters, all_reduce, world_size, shift):
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    n_b, n_k = scores.shape
    dev = scores.device
    interp = interpreting()
    bb_p, bk_p = (16, 64) if interp else (32, 128)
    bb_s, bk_s = (16, 64) if interp else (16, 256)
    scale2 = LOG2E / eps
    R = torch.empty(n_k, dtype=torch.float32, device=dev)
    c = torch.empty(n_b, dtype=torch.float32, device=dev)
    Q = torch.empty(n_b, n_k, dtype=torch.float32, device=dev)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=dev).reshape(1)
    for it in range(n_iters):
        _sinkhorn_proto_kernel[(cdiv(n_k, bk_p),)](scores, scores.stride(0), shift, c, R, n_b, n_k, scale2,
                                                   HAS_C=it > 0, BLOCK_B=bb_p, BLOCK_K=bk_p,
                                                   num_warps=1 if interp else 8)  # (4 spilled 12 B in fp16)
        if all_reduce is not None:
            all_reduce(R)
        _sinkhorn_sample_kernel[(cdiv(n_b, bb_s),)](scores, scores.stride(0), shift, R, c, Q, n_b, n_k, scale2,
                                                    1.0 / n_k, float(n_b * world_size), WRITE_Q=it == n_iters - 1,
                                                    BLOCK_B=bb_s, BLOCK_K=bk_s, num_warps=1 if interp else 4)
    return Q


@torch.library.custom_op("fastcl::sinkhorn", mutates_args=())
def sinkhorn_op(scores: torch.Tensor, eps: float, n_iters: int, shift: torch.Tensor) -> torch.Tensor:
    """Single-process Sinkhorn codes (B, K) fp32, as one op torch.compile does not trace into."""
    with nvtx("sinkhorn"):
        return sinkhorn_triton(scores, eps, n_iters, None, 1, shift)


@sinkhorn_op.register_fake
def _(scores, eps, n_iters, shift):
    return scores.new_empty(scores.shape, dtype=torch.float32)


# ======================================================================================
# torch reference (SwAV distributed_sinkhorn, transcribed)
# ======================================================================================


@torch.no_grad()
def sinkhorn_reference(scores, eps=0.05, n_iters=3, all_reduce=None, world_size=1, shift=0.0):
    x = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores  # float64 stays float64
    Q = torch.exp((x - shift) / eps).t()  # Q is K-by-B for consistency with notations from SwAV
    B = Q.shape[1] * world_size  # number of samples to assign
    K = Q.shape[0]  # how many prototypes
    sum_Q = torch.sum(Q)
    if all_reduce is not None:
        all_reduce(sum_Q)
    Q /= sum_Q
    for _ in range(n_iters):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        if all_reduce is not None:
            all_reduce(sum_of_rows)
        Q /= sum_of_rows
        Q /= K
        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


@torch.no_grad()
def sinkhorn(scores, eps=0.05, n_iters=3, all_reduce=None, world_size=1, shift=None):
    """SwAV codes Q (B, K) fp32 from prototype scores (B, K), rows summing to 1.

    Args:
        scores: (B, K) local prototype scores (cosine similarities; exp(scores/eps) must fit fp32,
            as in SwAV). eps: entropic regularization (SwAV 0.05). n_iters: Sinkhorn iterations (3).
        all_reduce: optional in-place sum across ranks (e.g. ``torch.distributed.all_reduce``),
            applied to the per-prototype sums as in SwAV; world_size: ranks (global B = B·world).
        shift: a constant subtracted from the scores before exp, for range safety; it must be the
            same on every rank (e.g. the all-gathered max). None: the local max on one rank (a
            device reduction, no sync), 0 (SwAV) with world_size > 1.

    >>> q = sinkhorn(torch.randn(32, 100).tanh())
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if eps <= 0 or n_iters < 1:
        raise ValueError(f"need eps > 0 and n_iters >= 1, got eps={eps}, n_iters={n_iters}")
    scores = scores.detach()
    if shift is None:
        shift = scores.max().float() if world_size == 1 else 0.0
    if use_triton(scores) and scores.dtype in (torch.float32, torch.float16, torch.bfloat16):
        if all_reduce is None and world_size == 1:  # one opaque op for torch.compile (no Python callable inside)
            return torch.ops.fastcl.sinkhorn(scores, eps, n_iters,
                                             torch.as_tensor(shift, dtype=torch.float32, device=scores.device))
        return sinkhorn_triton(scores, eps, n_iters, all_reduce, world_size, shift)
    return sinkhorn_reference(scores, eps, n_iters, all_reduce, world_size, shift)


__all__ = ["sinkhorn", "sinkhorn_reference", "sinkhorn_triton"]
