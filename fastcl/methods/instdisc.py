"""InstDisc: instance discrimination with a memory bank and NCE.

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018
(https://arxiv.org/abs/1805.01978). Follows zhirongw/lemniscate.pytorch (NCEAverage, NCECriterion).

Every training image i has a slot v_i in a memory bank V (n x 128, L2-normalized rows). For a feature
f = ‖g(x_i)‖-normalized, the non-parametric softmax is approximated with NCE against m uniform noise
samples (Pn = 1/n):

    P(i | f) = exp(v_i·f / τ) / Z,    Z ≈ n · mean(exp(v_j·f / τ))  (estimated once, at the first step)
    h(i, f)  = P(i | f) / (P(i | f) + m·Pn)
    J_NCE    = -E_i[ log h(i, f_i) - λ‖f_i - v_i‖² ] - m·E_{j~Pn}[ log(1 - h(j, f_i)) ]

(the λ term is the paper's proximal regularization, Sec. 3.4; lemniscate has λ=0). After the step the
bank moves: v_i ← normalize(0.5·v_i + 0.5·f_i). Under DDP the features and their dataset indices are
all-gathered so every rank applies the same bank update. The method needs the batch's dataset indices:
it sets ``needs_indices`` and the engine passes them in ``step.indices``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import all_gather_nograd, all_reduce_
from .base import Method, Step


def nce_loss(s: torch.Tensor, Z: torch.Tensor, n: int) -> torch.Tensor:
    """NCE loss from scores s = v·f/τ (B, 1+m), column 0 the positive, with noise Pn = 1/n.

    log h = log P - log(P + m/n) = -softplus(log(m/n) - log P) and log(1 - h) = -softplus(log P - log(m/n)),
    with log P = s - log Z: the same value as lemniscate's NCECriterion, without exp overflow.
    """
    m = s.shape[1] - 1
    log_p = s - torch.log(Z)  # B x (1+m)
    log_mpn = math.log(m / n)
    ln_pmt = -F.softplus(log_mpn - log_p[:, 0])  # B: log h(i, f_i)
    ln_pon = -F.softplus(log_p[:, 1:] - log_mpn)  # B x m: log(1 - h(j, f_i))
    return -(ln_pmt.sum() + ln_pon.sum()) / s.shape[0]


class InstDisc(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features.
        feat_dim: backbone output width.
        num_samples: n, the training-set size (one bank slot per image; indices must be < n).
        dim: embedding / bank width (default 128).
        K: noise samples per positive, m in the paper (default 4096).
        T: temperature τ (0.07; lemniscate's CIFAR setting is 0.1).
        bank_momentum: bank update v ← normalize(μ·v + (1-μ)·f) (default 0.5).
        prox_lambda: proximal regularization λ (default 30, the paper; 0 = lemniscate).
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); instdisc = InstDisc(net, d, num_samples=50000, T=0.1)
    """

    decay_bias_and_norm = True  # lemniscate.pytorch main.py: SGD(model.parameters(), weight_decay=...)
    needs_indices = True

    def __init__(self, backbone: nn.Module, feat_dim: int, num_samples: int, dim: int = 128, K: int = 4096,
                 T: float = 0.07, bank_momentum: float = 0.5, prox_lambda: float = 30.0):
        super().__init__()
        if num_samples <= 0:
            raise ValueError(f"InstDisc num_samples must be > 0, got {num_samples}")
        if K <= 0:
            raise ValueError(f"InstDisc K (noise samples) must be > 0, got {K}")
        if T <= 0:
            raise ValueError(f"InstDisc temperature T must be > 0, got {T}")
        if not 0.0 <= bank_momentum < 1.0:
            raise ValueError(f"InstDisc bank_momentum must be in [0, 1), got {bank_momentum}")
        if prox_lambda < 0:
            raise ValueError(f"InstDisc prox_lambda must be >= 0, got {prox_lambda}")
        self.n, self.K, self.T, self.mu, self.prox_lambda = num_samples, K, T, bank_momentum, prox_lambda
        self.backbone = backbone
        self.projector = nn.Linear(feat_dim, dim)  # the paper's 128-d linear embedding
        stdv = 1.0 / math.sqrt(dim / 3)  # uniform(-stdv, stdv): rows of ~unit norm (lemniscate)
        self.register_buffer("memory", torch.rand(num_samples, dim) * 2 * stdv - stdv)  # n x dim
        self.register_buffer("Z", torch.tensor(-1.0))  # NCE normalization constant; < 0 until estimated
        self._z_ready = False
        self._to_write: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def _estimate_Z(self, s: torch.Tensor) -> None:
        """Z = n · mean(exp(s)) over the first batch (all ranks averaged), then fixed (lemniscate). A Z already
        set (a resumed run) is kept, decided on the device: no host read of Z."""
        z = all_reduce_(torch.exp(s).mean() * self.n, "mean")
        self.Z.copy_(torch.where(self.Z > 0, self.Z, z))

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        idx = step.indices
        if idx is None:
            raise ValueError("InstDisc needs the batch's dataset indices in step.indices (needs_indices=True)")
        x = views[0]
        f = self.projector(self.backbone(x))  # B x dim
        with torch.autocast(x.device.type, enabled=False):
            f = F.normalize(f.float(), dim=1)
            B = f.shape[0]
            sample = torch.randint(0, self.n, (B, self.K + 1), device=f.device)  # noise ~ Pn (uniform)
            sample[:, 0] = idx  # column 0: the positive slot v_i
            w = self.memory[sample]  # B x (1+K) x dim (no gradient: the bank is a buffer)
            s = torch.bmm(w, f.unsqueeze(2)).squeeze(2) / self.T  # B x (1+K)
            if not self._z_ready:
                self._estimate_Z(s.detach())
                self._z_ready = True
            nce = nce_loss(s, self.Z, self.n)
            prox = (f - w[:, 0]).pow(2).sum(1).mean()  # ‖f_i - v_i^(t-1)‖², mean over the batch
            loss = nce + self.prox_lambda * prox
        self._to_write = (f.detach(), idx)  # written after the step, as lemniscate's backward does
        return {"loss": loss, "nce": nce.detach(), "prox": prox.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        if self._to_write is None:
            return
        f, idx = (all_gather_nograd(t) for t in self._to_write)  # features AND indices of every rank
        v = self.memory[idx] * self.mu + f * (1 - self.mu)
        self.memory.index_copy_(0, idx, F.normalize(v, dim=1))
        self._to_write = None
