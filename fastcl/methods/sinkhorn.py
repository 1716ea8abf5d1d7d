"""Sinkhorn-Knopp equipartition of samples over prototypes, for SwAV's online codes.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020 (https://arxiv.org/abs/2006.09882), Sec. 3.1 and the pseudocode of Algorithm 1. The work is
``fastcl.kernels.sinkhorn`` (Triton on CUDA, its torch reference otherwise); this wrapper adds the ranks.

Given scores s_bk = z_b . c_k of the B samples (of all ranks together) against the K prototypes, find
the Q in the transportation polytope {Q >= 0 : Q 1_B = 1_K / K, Q^T 1_K = 1_B / B} closest to
exp(s / ε) (entropic regularization ε): alternately rescale rows to 1/K (every prototype gets an equal
share of the batch) and columns to 1/B. The rows and the total are all-reduced over the ranks, so the
equipartition holds for the global batch; the columns are per sample and stay local.
"""
from __future__ import annotations

import torch

from ..engine.distributed import all_gather_nograd, all_reduce_, get_world_size
from ..kernels.sinkhorn import sinkhorn  # fused scaling-vector passes on CUDA, the same math in torch elsewhere


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
    world = get_world_size()
    # exp(s/ε) up to a factor common to all ranks (the global max; the first normalization removes it)
    shift = all_gather_nograd(scores.max().float().reshape(1)).max() if world > 1 else None
    return sinkhorn(scores, epsilon, n_iters, all_reduce=all_reduce_ if world > 1 else None, world_size=world,
                    shift=shift)
