"""InvaSpread: invariant and spreading instance features, end-to-end within the batch.

Ye, Zhang, Yuen, Chang, "Unsupervised Embedding Learning via Invariant and Spreading Instance Feature",
CVPR 2019 (https://arxiv.org/abs/1904.03436). Follows mangye16/Unsupervised_Embedding_Learning
(BatchCriterion with negM=1).

One shared (Siamese) encoder embeds both augmented views of m images into 128-d L2-normalized features
x_1..x_2m (x_a and x_{a±m} are the same instance). With the non-parametric softmax over the batch

    P_ak = exp(x_a·x_k / τ) / Σ_{l≠a} exp(x_a·x_l / τ)              (τ = 0.1)

the loss makes the two views agree (invariance) and every other instance disagree (spreading):

    J = -1/(2m) Σ_a [ log P_{a,a⁺} + Σ_{k∉{a, a⁺}} log(1 − P_ak) ]

Every feature is an anchor in turn; as in the official code the keys x_k are detached (``stop_grad_keys``;
gradients reach each feature through its anchor rows). Under DDP the keys are all-gathered, so each
anchor sees the 2m·world − 2 negatives of the global batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import all_gather_grad, all_gather_nograd, get_rank, get_world_size
from .base import Method, Step


def invaspread_loss(x: torch.Tensor, T: float, keys: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Instance-spread loss of the local anchors ``x`` = cat(view1, view2) (2m, C), L2-normalized.

    ``keys`` (M, C): all features (default ``x``; under DDP the all-gather of every rank's ``x``, in rank
    order, with this rank's block starting at ``offset``). Anchor a's self column is offset + a, its
    positive offset + (a + m) mod 2m.
    """
    two_m = x.shape[0]
    if two_m % 2:
        raise ValueError(f"InvaSpread needs an even number of features (two views), got {two_m}")
    keys = x if keys is None else keys
    a = torch.arange(two_m, device=x.device)
    self_col, pos_col = a + offset, (a + two_m // 2) % two_m + offset
    logits = (x @ keys.t()) / T  # 2m x M
    logits = logits.scatter(1, self_col[:, None], float("-inf"))  # l ≠ a
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log P_ak
    log_p_pos = log_p.gather(1, pos_col[:, None]).squeeze(1)  # 2m
    log_1m_p = torch.log1p(-log_p.exp())  # log(1 - P_ak); 0 on the self column (P = 0)
    neg = log_1m_p.sum(1) - log_1m_p.gather(1, pos_col[:, None]).squeeze(1)  # Σ over k ∉ {a, a⁺}
    return -(log_p_pos + neg).mean()


class InvaSpread(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features.
        feat_dim: backbone output width.
        dim: embedding size (default 128, a linear layer then L2 normalization).
        T: temperature τ (default 0.1).
        stop_grad_keys: detach the keys as the official code does (default True).
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); invaspread = InvaSpread(net, d)
    """

    decay_bias_and_norm = True  # the official code: SGD(net.parameters(), weight_decay=5e-4)

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int = 128, T: float = 0.1,
                 stop_grad_keys: bool = True):
        super().__init__()
        if T <= 0:
            raise ValueError(f"InvaSpread temperature T must be > 0, got {T}")
        if dim <= 0:
            raise ValueError(f"InvaSpread dim must be > 0, got {dim}")
        self.T, self.stop_grad_keys = T, stop_grad_keys
        self.backbone = backbone
        self.projector = nn.Linear(feat_dim, dim)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (2m, C) L2-normalized features of [view 1; view 2]."""
        k = x.detach() if self.stop_grad_keys else x
        if get_world_size() == 1:
            return invaspread_loss(x, self.T, k)
        keys = all_gather_nograd(k) if self.stop_grad_keys else all_gather_grad(k)  # (2m·world) x C
        return invaspread_loss(x, self.T, keys, offset=get_rank() * x.shape[0])

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        x = self.projector(self.backbone(torch.cat([views[0], views[1]])))  # 2m x dim, one pass (shared BN)
        with torch.autocast(x.device.type, enabled=False):
            return {"loss": self.loss(F.normalize(x.float(), dim=1))}
