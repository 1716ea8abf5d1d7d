"""BYOL: Bootstrap Your Own Latent.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020
(https://arxiv.org/abs/2006.07733); follows the paper's Sec. 3 and appendix J (deepmind-research/byol).

An online network (encoder f_θ, projector g_θ, predictor q_θ) predicts the projection of the other
view made by a target network (f_ξ, g_ξ) that has no predictor, gets no gradient and moves only as an
exponential moving average of the online weights, ξ <- τξ + (1 − τ)θ, with τ increased from
τ_base = 0.996 to 1 by τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 over the K training steps.

    L = ||q̄_θ(z_θ) − z̄'_ξ||² = 2 − 2·cos(q_θ(z_θ), z'_ξ)      (bars: L2-normalized)
    L_total = L(v → v') + L(v' → v)                              (symmetrized, summed as in the paper)

Projector and predictor are MLPs 4096 (BN, ReLU) -> 256. The paper trains with LARS (biases and BN
parameters excluded from LARS and weight decay), lr 0.2 x B/256, wd 1.5e-6, 10 warm-up epochs, batch
4096, 1000 epochs, on asymmetric views (blur 1.0 / 0.1, solarize 0 / 0.2: ``augment.byol``).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.optim import cosine_schedule
from ..kernels.ema import EMAUpdater
from ..models.heads import MLPHead
from .base import Method, Step


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in at least fp32 (under autocast the heads give bf16/fp16); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||p/||p|| − z/||z|| ||² = 2 − 2·cos(p, z); ``z`` is not differentiated."""
    p = F.normalize(_fp32(p), dim=1)  # N x d
    z = F.normalize(_fp32(z.detach()), dim=1)  # N x d
    return (2 - 2 * (p * z).sum(dim=1)).mean()


@torch.no_grad()
def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalized outputs: ~1/sqrt(d) when healthy, 0 when collapsed
    (SimSiam paper, Fig. 2)."""
    return F.normalize(_fp32(z.detach()), dim=1).std(dim=0).mean()


class BYOL(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features (f_θ).
        feat_dim: backbone output width.
        proj_hidden: projector hidden width (default 4096).
        dim: projection / prediction size (default 256).
        pred_hidden: predictor hidden width (default 4096).
        tau: base target momentum τ_base (default 0.996).
        tau_end: final target momentum (default 1.0), reached by a cosine schedule.
    Raises:
        ValueError: on a momentum outside [0, 1], tau_end < tau, or a non-positive width.
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); byol = BYOL(net, d)
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, proj_hidden: int = 4096, dim: int = 256,
                 pred_hidden: int = 4096, tau: float = 0.996, tau_end: float = 1.0):
        super().__init__()
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"BYOL base target momentum tau must be in [0, 1], got {tau}")
        if not tau <= tau_end <= 1.0:
            raise ValueError(f"BYOL final target momentum tau_end must be in [tau={tau}, 1], got {tau_end}")
        for name, v in (("feat_dim", feat_dim), ("proj_hidden", proj_hidden), ("dim", dim),
                        ("pred_hidden", pred_hidden)):
            if v <= 0:
                raise ValueError(f"BYOL {name} must be positive, got {v}")
        self.tau, self.tau_end, self.dim = tau, tau_end, dim
        self.backbone = backbone  # f_θ
        self.projector = MLPHead([feat_dim, proj_hidden, dim])  # g_θ
        self.predictor = MLPHead([dim, pred_hidden, dim])  # q_θ
        self.backbone_t = copy.deepcopy(backbone)  # f_ξ
        self.projector_t = copy.deepcopy(self.projector)  # g_ξ
        for p in [*self.backbone_t.parameters(), *self.projector_t.parameters()]:
            p.requires_grad = False  # the target only moves by EMA
        self.ema = EMAUpdater(nn.ModuleList([self.backbone, self.projector]),
                              nn.ModuleList([self.backbone_t, self.projector_t]))

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        # τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2 is exactly a half-cosine from τ_base to 1
        return {"tau": cosine_schedule(self.tau, self.tau_end, epochs, steps_per_epoch)}

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector_t(self.backbone_t(x))  # z'_ξ: N x dim

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        v1, v2 = views[0], views[1]
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))  # z_θ: N x dim each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # q_θ(z_θ): N x dim
        t1, t2 = self._target(v1), self._target(v2)  # z'_ξ: N x dim (no gradient)
        loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)
        return {"loss": loss, "z_std": collapse_std(z1)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        self.ema.update(step["tau"])  # ξ <- τξ + (1 − τ)θ
