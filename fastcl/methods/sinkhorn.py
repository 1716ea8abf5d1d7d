"""Sinkhorn-Knopp equipartition of samples over prototypes, for SwAV's online codes.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020 (https://arxiv.org/abs/2006.09882), Sec. 3.1 and the pseudocode of Algorithm 1. Plain torch:
the op is 3 iterations over a (K x B) matrix, bandwidth-bound and small next to the backbone.

Given scores s_bk = z_b . c_k of the B samples (of all ranks together) against the K prototypes, find
the Q in the transportation polytope {Q >= 0 : Q 1_B = 1_K / K, Q^T 1_K = 1_B / B} closest to
exp(s / ε) (entropic regularization ε): alternately rescale rows to 1/K (every prototype gets an equal
share of the batch) and columns to 1/B. The rows and the total are all-reduced over the ranks, so the
equipartition holds for the global batch; the columns are per sample and stay local.
"""
from __future__ import annotations

import torch

from ..engine.distributed import all_gather_nograd, all_reduce_, get_world_size


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3) -> torch.Tensor:
    """Codes for this rank's samples.

    Args:
        scores: (B_local, K) prototype scores (SwAV: cosines, in [-1, 1]).
        epsilon: entropic regularization ε (default 0.05; smaller = sharper codes).
        n_iters: Sinkhorn iterations (default 3).
    Returns:
        (B_local, K) soft assignments; each row sums to 1, and over all ranks each prototype gets
        (B / K) of the mass after enough iterations (approximately after 3).
    Raises:
        ValueError: on epsilon <= 0 or n_iters < 1.
    >>> q = sinkhorn_knopp(torch.randn(32, 10))
    """
    if epsilon <= 0:
        raise ValueError(f"Sinkhorn epsilon must be > 0, got {epsilon}")
    if n_iters < 1:
        raise ValueError(f"Sinkhorn n_iters must be >= 1, got {n_iters}")
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    # exp(s/ε) up to a factor common to all ranks (the global max; the first normalization removes it)
    s_max = all_gather_nograd(s.max().reshape(1)).max()
    Q = torch.exp((s - s_max) / epsilon).t()  # K x B_local
    K, B = Q.shape[0], Q.shape[1] * get_world_size()
    total = all_reduce_(Q.sum())
    Q /= total  # the whole matrix sums to 1
    for _ in range(n_iters):
        rows = all_reduce_(Q.sum(dim=1, keepdim=True))  # K x 1, over the global batch
        Q /= rows * K  # every prototype: total weight 1/K
        Q /= Q.sum(dim=0, keepdim=True) * B  # every sample: total weight 1/B
    return (Q * B).t()  # B_local x K, rows are assignments summing to 1
