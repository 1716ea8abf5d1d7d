"""Label-free monitor for unlabeled data: RankMe and the per-dimension spread of the normalized embedding.

RankMe (Garrido, Balestriero, Najman, LeCun 2023, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank", https://arxiv.org/abs/2210.02885, eq. 1): with
sigma_1..sigma_K the singular values of the (N, D) embedding matrix (K = min(N, D)),

    p_k = sigma_k / ||sigma||_1 + eps,        RankMe = exp(- sum_k p_k log p_k),

the exponential of the entropy of the normalized spectrum: 1 for a collapsed (rank-1) embedding, K for one whose
singular values are all equal. eps = 1e-7 as in the paper. The features are used as they come (not centered).

Embedding std (SimSiam, Chen & He 2021, section 4.1): the std over samples of each dimension of the L2-normalized
embedding, averaged over dimensions: 0 when every image maps to one direction, about 1/sqrt(D) when the
embeddings spread over the sphere; ``emb_std_ref`` = 1/sqrt(D) is logged next to it.

Both are computed on the backbone's features (what the kNN monitor and the exported model use) of a fixed subset of
the training images with the evaluation transform.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RANKME_EPS", "LabelFree", "rankme", "embedding_std", "label_free_eval"]

RANKME_EPS = 1e-7


class LabelFree(NamedTuple):
    """What the data layer hands the trainer instead of kNN loaders when the data has no labels: one loader
    ``(images, labels, indices)`` of training images with the evaluation transform, and how many it yields."""
    loader: object
    num_images: int = 0


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of an (N, D) embedding (module docstring): singular values in float32 (float64 for float64 input),
    the entropy in float64."""
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(f"rankme expects a non-empty (N, D) matrix, got shape {tuple(z.shape)}")
    s = torch.linalg.svdvals(z if z.dtype == torch.float64 else z.float()).double()
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of the L2-normalized embedding (module docstring)."""
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


@torch.no_grad()
def label_free_eval(backbone: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
                    progress: bool = False) -> dict:
    """``{"rankme", "rankme_max", "emb_std", "emb_std_ref"}`` of ``backbone``'s features over ``loader`` (all ranks'
    shards gathered, so every rank returns the same numbers). ``rankme_max`` = min(N, D), the largest RankMe."""
    from .knn import extract_features

    z, _ = extract_features(backbone, loader, device, amp_dtype=amp_dtype,
                            progress="label-free monitor" if progress else None)
    n, d = z.shape
    return {"rankme": rankme(z), "rankme_max": min(n, d), "emb_std": embedding_std(z), "emb_std_ref": 1 / math.sqrt(d)}
