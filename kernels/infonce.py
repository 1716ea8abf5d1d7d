"""Flash-style fused InfoNCE: L2-normalize + q·kᵀ/T + online log-sum-exp over key tiles.

Provenance: the online-softmax recurrence is Milakov & Gimelshein 2018 ("Online normalizer
calculation for softmax", arXiv:1805.02867) as used by FlashAttention (Dao et al. 2022,
arXiv:2205.14135) and the Triton tutorial 06-fused-attention; the split over key chunks with a
log-sum-exp merge is flash-decoding. The losses are MoCo (He et al. 2019, arXiv:1911.05722),
MoCo v3's in-batch InfoNCE (Chen et al. 2021, arXiv:2104.02057) and SimCLR's NT-Xent (Chen et al.
2020, arXiv:2002.05709). No code was copied.

All three losses are one core, ``contrastive_lse``: for every query row i

    s_ij   = q̂_i · k̂_j / T                       (j over the shared keys, self column excluded)
    s_i+   = q̂_i · p̂_i / T                       (the positive: a key of its own, or keys[pos_i])
    loss_i = logsumexp({s_ij} ∪ {s_i+ if the positive is not among the keys}) − s_i+

The N×K logits are never materialized: the forward keeps a running (max m, sum l) per row while it
streams key tiles, the backward recomputes each tile from the saved log-sum-exp.
``normalize`` never writes normalized copies either: the dot is taken on the raw rows in fp32 and
scaled by the inverse row norms 1/max(‖x‖, 1e-12) (as ``F.normalize``).

Backend: ``fastcl.kernels.use_triton`` (Triton for CUDA tensors by default, the torch reference
otherwise). The torch reference materializes the logits and is meant for CPU and for checking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import use_triton

# ======================================================================================
# torch reference (also the CPU path)
# ======================================================================================


def contrastive_lse_reference(q, keys, temperature, pos_index=None, pos_keys=None, self_index=None,
                              normalize_q=True, normalize_keys=True, normalize_pos=True):
    """Per-row InfoNCE losses (N,) in fp32; see the module docstring for the math."""
    qf = q.float()
    kf = keys.float()
    if normalize_q:
        qf = F.normalize(qf, dim=1)
    if normalize_keys:
        kf = F.normalize(kf, dim=1)
    logits = qf @ kf.t()  # N x K
    if self_index is not None:
        logits = logits.scatter(1, self_index.view(-1, 1), float("-inf"))
    if pos_keys is not None:
        pf = pos_keys.float()
        if normalize_pos:
            pf = F.normalize(pf, dim=1)
        l_pos = (qf * pf).sum(1, keepdim=True)  # N x 1
        logits = torch.cat([l_pos, logits], dim=1) / temperature  # N x (1+K)
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        logits = logits / temperature
        target = pos_index
    return F.cross_entropy(logits, target, reduction="none")


def _triton_supported(q, keys):
    return False  # Triton path lands in the next commit


ContrastiveLSEFunction = None

# ======================================================================================
# core dispatch
# ======================================================================================


def contrastive_lse(q, keys, temperature, pos_index=None, pos_keys=None, self_index=None,
                    normalize_q=True, normalize_keys=True, normalize_pos=True):
    """Per-row InfoNCE losses (N,) fp32. Exactly one of ``pos_index`` (positive = keys[pos_index[i]])
    or ``pos_keys`` (positive = pos_keys[i], an (N, C) tensor not among ``keys``) must be given.
    ``self_index`` (N,) int64 excludes column self_index[i] from row i's softmax."""
    if (pos_index is None) == (pos_keys is None):
        raise ValueError("give exactly one of pos_index or pos_keys")
    if q.dim() != 2 or keys.dim() != 2 or q.shape[1] != keys.shape[1]:
        raise ValueError(f"q (N,C) and keys (K,C) must agree on C, got {tuple(q.shape)} and {tuple(keys.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tensors = [t for t in (q, keys, pos_keys) if t is not None]
    if use_triton(*tensors) and _triton_supported(q, keys):
        return ContrastiveLSEFunction.apply(q, keys, pos_keys, pos_index, self_index, float(temperature),
                                            normalize_q, normalize_keys, normalize_pos)
    return contrastive_lse_reference(q, keys, temperature, pos_index, pos_keys, self_index,
                                     normalize_q, normalize_keys, normalize_pos)


# ======================================================================================
# public API
# ======================================================================================


def moco_infonce(q, k, queue, temperature, normalize=True):
    """MoCo InfoNCE: mean_i CE([q̂_i·k̂_i, q̂_i·queue_j]/T, target 0).

    Args:
        q: (N, C) queries. k: (N, C) positive keys (grad flows if it requires grad).
        queue: (K, C) negatives, rows already L2-normalized, no grad.
        normalize: L2-normalize q and k inside the kernel (the queue is used as is).

    >>> loss = moco_infonce(torch.randn(8, 16), torch.randn(8, 16), F.normalize(torch.randn(32, 16), dim=1), 0.2)
    """
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    return contrastive_lse(q, queue.detach(), temperature, pos_keys=k, normalize_q=normalize,
                           normalize_keys=False, normalize_pos=normalize).mean()


def inbatch_infonce(q, k, temperature, pos_offset=0, normalize=True):
    """In-batch InfoNCE (MoCo v3): mean_i CE(q̂_i·k̂ᵀ/T, i + pos_offset).

    q: (N, C) local queries; k: (M, C) keys with M >= N (e.g. all-gathered, then
    pos_offset = rank * N). Grads flow to q and k. MoCo v3 multiplies the result by 2T itself.

    >>> loss = inbatch_infonce(torch.randn(8, 16), torch.randn(8, 16), 0.2)
    """
    n, m = q.shape[0], k.shape[0]
    if not 0 <= pos_offset <= m - n:
        raise ValueError(f"pos_offset={pos_offset} puts positives outside the {m} keys for {n} queries")
    pos = torch.arange(n, device=q.device) + pos_offset
    return contrastive_lse(q, k, temperature, pos_index=pos, normalize_q=normalize,
                           normalize_keys=normalize).mean()


def ntxent(z1, z2, temperature, normalize=True, z_all=None, offset=0):
    """SimCLR NT-Xent over the 2N anchors of ``z = cat([z1, z2])``: each anchor's positive is its
    other view, the 2N-2 (or, with ``z_all``, all other gathered) rows are negatives, self excluded.

    DDP layout: ``z_all`` is the all-gather over ranks, in rank order, of each rank's
    ``cat([z1_r, z2_r])`` ((2N·world, C)), and ``offset`` is where this rank's block starts
    (``rank * 2N``). Local anchor a (0 <= a < 2N) then has self column offset + a and positive
    column offset + (a + N) mod 2N. Gradients flow to z1 and z2 through the anchors, and through
    the keys too if ``z_all`` requires grad (a differentiable all-gather routes them back);
    with a plain (no-grad) all-gather only the anchor side contributes. Loss = mean over 2N anchors.

    >>> loss = ntxent(torch.randn(8, 16), torch.randn(8, 16), 0.5)
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)  # 2N x C
    keys = z if z_all is None else z_all
    if z_all is None and offset != 0:
        raise ValueError("offset is only meaningful with z_all")
    if not 0 <= offset <= keys.shape[0] - 2 * n:
        raise ValueError(f"offset={offset} puts the local block outside the {keys.shape[0]} gathered rows")
    a = torch.arange(2 * n, device=z.device)
    self_index = a + offset
    pos_index = (a + n) % (2 * n) + offset
    return contrastive_lse(z, keys, temperature, pos_index=pos_index, self_index=self_index,
                           normalize_q=normalize, normalize_keys=normalize).mean()


__all__ = ["moco_infonce", "inbatch_infonce", "ntxent", "contrastive_lse", "contrastive_lse_reference"]
