"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(https://arxiv.org/abs/2104.14294). Follows facebookresearch/dino main_dino.py and vision_transformer.py
(DINOHead, MultiCropWrapper, DINOLoss, clip_gradients, cancel_gradients_last_layer).

A student g_θs (backbone + DINO head) sees every crop V = {x1g, x2g, local crops}; a teacher g_θt of the
same architecture (no drop-path, no gradient) sees only the global crops. With
P_s(x) = softmax(g_θs(x) / τs) and P_t(x) = softmax((g_θt(x) − c) / τt), the loss is (paper eq. 3)

    min_θs  Σ_{x ∈ {x1g, x2g}}  Σ_{x' ∈ V, x' ≠ x}  H(P_t(x), P_s(x')),      H(a, b) = −a · log b

averaged over the pairs and the batch. After each step θt ← λ θt + (1 − λ) θs (λ: cosine 0.996 → 1)
and the center c ← m c + (1 − m) mean_batch g_θt(x) (m = 0.9, batch mean over all ranks). Centering
(against one dimension dominating) and sharpening (τt 0.04 → 0.07 ≪ τs = 0.1, against the uniform
output) together avoid collapse.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from ..engine.distributed import all_reduce_
from ..engine.optim import cosine_schedule
from ..kernels.dino_loss import dino_loss
from ..kernels.ema import EMAUpdater
from .base import Method, Step


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU, hidden 2048) to a 256-d bottleneck, L2-normalize, then a
    weight-normalized linear layer to K outputs ("prototypes") without bias.

    ``norm_last_layer=True`` fixes the weight norm g to 1, so the last layer is cosine similarity to
    K unit prototypes (DINO's default; more stable). The MLP uses trunc-normal(0.02) weights, zero bias.
    >>> head = DINOHead(384, out_dim=4096); head(torch.randn(2, 384)).shape
    torch.Size([2, 4096])
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
        if out_dim < 1:
            raise ValueError(f"DINOHead out_dim (K) must be >= 1, got {out_dim}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            linear = nn.Linear(d_in, d_out)
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))  # W = g v / ||v||
        g = self.last_layer.parametrizations.weight.original0  # (K, 1)
        g.data.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # B x bottleneck, unit norm
        return self.last_layer(x)  # B x K


def multicrop_forward(backbone: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all crops, one forward per run of same-resolution crops (MultiCropWrapper).

    Returns (sum_i B_i) x D in crop order: crops of one size are concatenated into one batch.
    """
    out, i = [], 0
    while i < len(crops):
        j = i + 1
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        out.append(backbone(torch.cat(crops[i:j])))
        i = j
    return torch.cat(out)


class DINO(Method):
    """
    Args:
        backbone: the student backbone, images -> (N, feat_dim) (a timm ViT takes any crop size).
        feat_dim: backbone output width.
        teacher_backbone: the teacher's backbone, same architecture without drop-path (DINO builds the
            two separately); default: a deep copy of ``backbone``. It is overwritten with the student's
            weights.
        out_dim: K, head outputs (default 65536). hidden_dim, bottleneck_dim, nlayers: head shape.
        norm_last_layer: fix the last layer's weight norm to 1 (default True).
        momentum_teacher: λ at step 0, cosine-increased to 1 (default 0.996).
        student_temp: τs (default 0.1).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: τt rises linearly per epoch from
            0.04 to 0.07 over 30 epochs, then stays (main_dino.py DINOLoss.teacher_temp_schedule).
        center_momentum: m of the center EMA (default 0.9).
        n_global_crops: the first ``n_global_crops`` views are the teacher's (default 2).
        freeze_last_layer: epochs during which the last layer gets no update (default 1).
        clip_grad: per-parameter gradient-norm clip (DINO utils.clip_gradients; default 3.0; 0 = off).
            Runs on the raw gradients in ``before_optimizer_step``: don't combine with fp16 loss scaling.
    Raises:
        ValueError: on a non-positive temperature, a momentum outside [0, 1], ...
    >>> from fastcl.models import build_backbone
    >>> s, d = build_backbone("vit_small_patch16_224", drop_path_rate=0.1)
    >>> t, _ = build_backbone("vit_small_patch16_224")
    >>> dino = DINO(s, d, teacher_backbone=t)
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, *, teacher_backbone: nn.Module | None = None,
                 out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 norm_last_layer: bool = True, momentum_teacher: float = 0.996, student_temp: float = 0.1,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_temp_epochs: int = 30, center_momentum: float = 0.9, n_global_crops: int = 2,
                 freeze_last_layer: int = 1, clip_grad: float = 3.0):
        super().__init__()
        if not 0.0 <= momentum_teacher <= 1.0:
            raise ValueError(f"DINO momentum_teacher must be in [0, 1], got {momentum_teacher}")
        for name, t in (("student_temp", student_temp), ("warmup_teacher_temp", warmup_teacher_temp),
                        ("teacher_temp", teacher_temp)):
            if t <= 0:
                raise ValueError(f"DINO {name} must be > 0, got {t}")
        if not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"DINO center_momentum must be in [0, 1), got {center_momentum}")
        if warmup_teacher_temp_epochs < 0:
            raise ValueError(f"DINO warmup_teacher_temp_epochs must be >= 0, got {warmup_teacher_temp_epochs}")
        if n_global_crops < 1:
            raise ValueError(f"DINO n_global_crops must be >= 1, got {n_global_crops}")
        if freeze_last_layer < 0:
            raise ValueError(f"DINO freeze_last_layer must be >= 0 epochs, got {freeze_last_layer}")
        if clip_grad < 0:
            raise ValueError(f"DINO clip_grad must be >= 0 (0 = off), got {clip_grad}")
        self.momentum_teacher, self.student_temp = momentum_teacher, student_temp
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs, self.center_momentum = warmup_teacher_temp_epochs, center_momentum
        self.n_global_crops, self.freeze_last_layer, self.clip_grad = n_global_crops, freeze_last_layer, clip_grad

        self.student_backbone = backbone
        self.student_head = DINOHead(feat_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
        self.teacher_backbone = copy.deepcopy(backbone) if teacher_backbone is None else teacher_backbone
        self.teacher_backbone.load_state_dict(backbone.state_dict())  # teacher starts as the student
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad = False  # the teacher only moves by EMA
        self.ema = EMAUpdater(nn.ModuleList([self.student_backbone, self.student_head]),
                              nn.ModuleList([self.teacher_backbone, self.teacher_head]))
        self.register_buffer("center", torch.zeros(1, out_dim))  # c: 1 x K
        self._batch_center: torch.Tensor | None = None
        self._trainable: list[nn.Parameter] | None = None  # the clip's parameter list, gathered once

    @property
    def backbone(self) -> nn.Module:
        """The teacher's backbone: DINO evaluates and releases the teacher (eval_knn.py checkpoint_key)."""
        return self.teacher_backbone

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        warm = np.linspace(self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)
        per_epoch = np.concatenate([warm, np.full(max(epochs - len(warm), 0), self.teacher_temp)])[:epochs]
        return {"momentum": cosine_schedule(self.momentum_teacher, 1.0, epochs, steps_per_epoch),
                "teacher_temp": np.repeat(per_epoch, steps_per_epoch)}

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        if len(views) < max(self.n_global_crops, 2):
            raise ValueError(f"DINO needs the {self.n_global_crops} global crops and a second view, got {len(views)} views")
        with torch.no_grad():
            t_feat = multicrop_forward(self.teacher_backbone, views[:self.n_global_crops])  # (n_g·B) x D
            t_out = self.teacher_head(t_feat)  # (n_g·B) x K
        s_out = self.student_head(multicrop_forward(self.student_backbone, views))  # (n_crops·B) x K
        loss, self._batch_center = dino_loss(s_out, t_out, self.center, self.student_temp, step["teacher_temp"],
                                             self.n_global_crops)
        with torch.no_grad():  # collapse monitors: std ≈ 1/sqrt(D) when healthy; H(P_t) in (0, log K)
            std = F.normalize(t_feat.float(), dim=1).std(0).mean()
            p_t = F.softmax((t_out.float() - self.center) / step["teacher_temp"], dim=-1)
            entropy = -(p_t * torch.log(p_t.clamp_min(1e-12))).sum(-1).mean()
        return {"loss": loss, "std": std, "teacher_entropy": entropy}

    @torch.no_grad()
    def before_optimizer_step(self, step: Step) -> None:
        if self.clip_grad > 0:  # per-parameter clip (DINO utils.clip_gradients), without host syncs
            if self._trainable is None:
                self._trainable = [p for p in self.parameters() if p.requires_grad]
            grads = [p.grad for p in self._trainable if p.grad is not None]
            if grads:  # g *= min(1, clip / (|g| + 1e-6)) per tensor, in a fixed number of foreach ops
                coef = torch._foreach_norm(grads)
                torch._foreach_add_(coef, 1e-6)
                torch._foreach_reciprocal_(coef)
                torch._foreach_mul_(coef, self.clip_grad)
                torch._foreach_clamp_max_(coef, 1.0)
                torch._foreach_mul_(grads, coef)
        if step.epoch < self.freeze_last_layer:  # no update at all (AdamW skips params without grad)
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    def skippable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student_head.last_layer.parameters() if p.requires_grad] \
            if self.freeze_last_layer else []

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        self.ema.update(step["momentum"])
        if self._batch_center is not None:  # c <- m c + (1 - m) mean over all ranks' teacher outputs
            batch_center = all_reduce_(self._batch_center.float(), "mean")
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
            self._batch_center = None
