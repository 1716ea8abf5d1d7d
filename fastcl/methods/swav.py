"""SwAV: swapping assignments between multiple views.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020 (https://arxiv.org/abs/2006.09882); follows the paper's Algorithm 1 and
facebookresearch/swav main_swav.py.

Each crop's L2-normalized projection z is scored against K = 3,000 L2-normalized prototypes C. The
codes q of the two global crops come from those scores by Sinkhorn-Knopp (ε = 0.05, 3 iterations,
equipartition over the global batch, no gradient); every other crop predicts them:

    p_v = softmax(z_v^T C / τ)                            (τ = 0.1)
    L = 1/|S| Σ_{s in S} 1/(V−1) Σ_{v≠s} −Σ_k q_s^(k) log p_v^(k)       (batch mean; S = {0, 1})

Multi-crop: 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14). Prototypes are renormalized after every
update and frozen (no update at all) for the first epoch. For small batches a queue of past
projections (3,840 in all, from epoch 15; per rank in the official code) joins the Sinkhorn batch so
the equipartition is over enough samples. The paper's 800-epoch run: LARS lr 4.8 (batch 4096) cosine to
0.0048, 10 warm-up epochs, wd 1e-6 on all parameters, no queue.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.distributed import get_world_size
from ..engine.optim import param_groups
from ..models.heads import MLPHead
from .base import Method, Step
from .sinkhorn import sinkhorn_knopp


class SwAV(Method):
    """
    Args:
        backbone: images (any crop size) -> (N, feat_dim) features.
        feat_dim: backbone output width.
        hidden: projector hidden width (default 2048).
        dim: projection size (default 128).
        n_prototypes: K (default 3000).
        temperature: τ of the predicted assignments (default 0.1).
        epsilon: Sinkhorn entropic regularization ε (default 0.05).
        sinkhorn_iters: Sinkhorn iterations (default 3).
        crops_for_assign: crops whose codes are predicted (default the two global crops, 0 and 1).
        queue_length: projections kept per crop in S, over all ranks (default 3840; 0 = no queue).
        queue_start_epoch: epoch from which the queue is filled (default 15); it is used once full.
        freeze_prototypes_epochs: prototypes get no update for this many epochs (default 1).
        proj_layers: Linear layers of the projector (default 2; SEER 3). proj_bn: BN between them (default True).
    Raises:
        ValueError: on a non-positive size, τ, ε or iteration count, a negative queue, or an empty S.
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); swav = SwAV(net, d, queue_length=0)
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, hidden: int = 2048, dim: int = 128,
                 n_prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iters: int = 3, crops_for_assign: tuple[int, ...] = (0, 1), queue_length: int = 3840,
                 queue_start_epoch: int = 15, freeze_prototypes_epochs: float = 1.0, proj_layers: int = 2,
                 proj_bn: bool = True):
        super().__init__()
        for name, v in (("feat_dim", feat_dim), ("hidden", hidden), ("dim", dim), ("n_prototypes", n_prototypes),
                        ("proj_layers", proj_layers),
                        ("temperature", temperature), ("epsilon", epsilon), ("sinkhorn_iters", sinkhorn_iters)):
            if v <= 0:
                raise ValueError(f"SwAV {name} must be positive, got {v}")
        if queue_length < 0 or queue_start_epoch < 0 or freeze_prototypes_epochs < 0:
            raise ValueError(f"SwAV queue_length, queue_start_epoch and freeze_prototypes_epochs must be >= 0, got "
                             f"{queue_length}, {queue_start_epoch}, {freeze_prototypes_epochs}")
        if not crops_for_assign or min(crops_for_assign) < 0:
            raise ValueError(f"SwAV crops_for_assign must be non-empty crop indices, got {crops_for_assign}")
        self.T, self.eps, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters
        self.crops_for_assign = tuple(crops_for_assign)
        self.queue_start_epoch, self.freeze_prototypes_epochs = queue_start_epoch, freeze_prototypes_epochs
        self.backbone = backbone
        # Linear-BN-ReLU-Linear (SwAV); SEER: 3 Linear layers with ReLU, no BN (VISSL swav_head use_bn False)
        self.projector = MLPHead([feat_dim] + [hidden] * (proj_layers - 1) + [dim], bn=proj_bn)
        self.prototypes = nn.Linear(dim, n_prototypes, bias=False)  # C: K x dim
        self._normalize_prototypes()
        # per-rank queue of past projections, one per assigned crop: |S| x (L / world) x dim, newest first
        self.register_buffer("queue", torch.zeros(len(self.crops_for_assign), queue_length // get_world_size(), dim))
        self._to_enqueue: torch.Tensor | None = None

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def param_groups(self, weight_decay: float) -> list[dict]:
        # the official LARC wraps every parameter (BN and biases included) with the same decay
        return param_groups(self, weight_decay, exclude_bias_and_norm=False)

    def _embed(self, views: list[torch.Tensor]) -> torch.Tensor:
        """One backbone pass per run of same-size crops (multi-resolution), one head pass for all."""
        feats, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            feats.append(self.backbone(torch.cat(views[i:j])))
            i = j
        return F.normalize(self.projector(torch.cat(feats)), dim=1)  # (V*B) x dim

    def _queue_ready(self, step: Step, B: int) -> bool:
        """Full queue: every step since the queue started enqueued B rows (no host sync needed)."""
        L = self.queue.shape[1]
        if L == 0 or step.epoch < self.queue_start_epoch:
            return False
        if L < B:
            raise ValueError(f"SwAV queue of {L} per rank is shorter than the per-rank batch {B}: raise queue_length")
        return (step.step - self.queue_start_epoch * step.steps_per_epoch) * B >= L

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        B, V = views[0].shape[0], len(views)
        if max(self.crops_for_assign) >= V:
            raise ValueError(f"SwAV crops_for_assign {self.crops_for_assign} needs at least "
                             f"{max(self.crops_for_assign) + 1} crops, got {V}")
        z = self._embed(views)  # (V*B) x dim
        scores = self.prototypes(z)  # (V*B) x K: z^T C
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        use_queue = self._queue_ready(step, B)
        log_p = F.log_softmax(scores / self.T, dim=1).chunk(V)  # V x (B x K)
        loss = 0.0
        for i, s in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = scores[s * B:(s + 1) * B].detach()  # B x K
                if use_queue:
                    out = torch.cat([(self.queue[i] @ self.prototypes.weight.t()).to(out.dtype), out])  # (L+B) x K
                q = sinkhorn_knopp(out, self.eps, self.sinkhorn_iters)[-B:]  # B x K codes of crop s
            loss = loss + sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(V) if v != s) / (V - 1)
        if self.queue.shape[1] and step.epoch >= self.queue_start_epoch:
            self._to_enqueue = torch.stack([z[s * B:(s + 1) * B].detach() for s in self.crops_for_assign])
        return {"loss": loss / len(self.crops_for_assign)}

    def skippable_parameters(self) -> list[nn.Parameter]:
        return [self.prototypes.weight] if self.freeze_prototypes_epochs else []

    def before_optimizer_step(self, step: Step) -> None:
        if step.step < self.freeze_prototypes_epochs * step.steps_per_epoch:
            self.prototypes.weight.grad = None  # no update at all (no decay, no momentum) while frozen

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        self._normalize_prototypes()
        if self._to_enqueue is not None:  # shift by B, newest first (official order)
            b = self._to_enqueue.shape[1]
            self.queue[:, b:] = self.queue[:, :-b].clone()
            self.queue[:, :b] = self._to_enqueue.to(self.queue.dtype)
            self._to_enqueue = None
