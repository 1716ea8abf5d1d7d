"""SimSiam: simple Siamese networks with a stop-gradient.

Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021
(https://arxiv.org/abs/2011.10566); follows the paper's Algorithm 1 and facebookresearch/simsiam.

One encoder f (backbone + projection MLP) and a prediction MLP h; no negatives, no momentum encoder.
With p = h(f(x)) and z = f(x):

    D(p, z) = −(p/||p||)·(z/||z||)
    L = ½ D(p1, stopgrad(z2)) + ½ D(p2, stopgrad(z1))

The stop-gradient is what prevents collapse (the paper's Fig. 2: without it the per-dimension std of
the L2-normalized output drops to 0 at once; with it, it stays near 1/sqrt(d)).
Projector: 3 fc layers 2048-d, BN after each, the output BN without affine (2 layers on CIFAR).
Predictor: 2048 -> 512 (BN, ReLU) -> 2048, trained at a fixed lr (not decayed, ``fixed_lr``).
SGD lr 0.05 x B/256, momentum 0.9, wd 1e-4 on all parameters, cosine, batch 512, 100 epochs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.heads import MLPHead
from .base import Method, Step
from .byol import _fp32, collapse_std


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) averaged over the batch, with the stop-gradient on z (Algorithm 1)."""
    p = F.normalize(_fp32(p), dim=1)  # N x d
    z = F.normalize(_fp32(z.detach()), dim=1)  # N x d, stop-gradient
    return -(p * z).sum(dim=1).mean()


class SimSiam(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features.
        feat_dim: backbone output width.
        dim: projection size d (default 2048).
        proj_hidden: projector hidden width (default 2048).
        pred_hidden: predictor bottleneck (default 512).
        proj_layers: fc layers in the projector (3 on ImageNet, 2 on CIFAR).
        fix_pred_lr: keep the predictor at the base lr (default True, as in the paper).
    Raises:
        ValueError: on a non-positive width or fewer than 1 projector layer.
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); simsiam = SimSiam(net, d, proj_layers=2)
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int = 2048, proj_hidden: int = 2048,
                 pred_hidden: int = 512, proj_layers: int = 3, fix_pred_lr: bool = True):
        super().__init__()
        for name, v in (("feat_dim", feat_dim), ("dim", dim), ("proj_hidden", proj_hidden),
                        ("pred_hidden", pred_hidden), ("proj_layers", proj_layers)):
            if v <= 0:
                raise ValueError(f"SimSiam {name} must be positive, got {v}")
        self.dim, self.fix_pred_lr = dim, fix_pred_lr
        self.backbone = backbone
        # BN on every fc layer, the output BN without affine (fc biases before BN are dropped)
        self.projector = MLPHead([feat_dim] + [proj_hidden] * (proj_layers - 1) + [dim], last_bn=True,
                                 last_bn_affine=False)
        self.predictor = MLPHead([dim, pred_hidden, dim])  # h: bottleneck; output fc has a bias, no BN

    def param_groups(self, weight_decay: float) -> list[dict]:
        # the paper's SGD decays every parameter (BN and biases included); the predictor keeps its lr
        encoder = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("predictor.")]
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        return [dict(params=encoder, weight_decay=weight_decay),
                dict(params=predictor, weight_decay=weight_decay, fixed_lr=self.fix_pred_lr)]

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # z = f(x): N x d
        p1, p2 = self.predictor(z1), self.predictor(z2)  # p = h(z): N x d
        loss = 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)
        return {"loss": loss, "z_std": collapse_std(z1)}
