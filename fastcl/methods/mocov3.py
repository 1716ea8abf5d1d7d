"""MoCo v3: momentum contrast with in-batch keys, a predictor, and ViT or ResNet backbones.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021
(https://arxiv.org/abs/2104.02057). Follows facebookresearch/moco-v3 (builder.py, vits.py).

    q1, q2 = pred(proj(f(x1))), pred(proj(f(x2)))          # online: backbone, projector, predictor
    k1, k2 = proj_k(f_k(x1)), proj_k(f_k(x2))              # momentum encoder, no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = 2τ · CE(q̂ k̂ᵀ / τ, labels = arange(N) + rank·N)   # keys all-gathered over ranks

Projector: ``proj_layers`` Linear layers (4096 hidden, 256 out; 3 for ViT, 2 for ResNet in the official
code), BN + ReLU between, an affine-free BN at the end; predictor: 256-4096-256 with BN + ReLU in the
middle and none at the end; no Linear has a bias. The momentum m follows a half-cosine from 0.99 to 1.
For ViTs (``vit_init_(backbone)``): the patch projection is frozen at its random init (the paper's
stability trick, Sec. 4.1), the position embedding is a fixed 2-D sin-cos table, and the weights get
moco-v3's initialization. Under multi-GPU DDP every BN becomes a SyncBN, as in the official code.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

from ..engine.distributed import all_gather_nograd, get_rank, get_world_size
from ..engine.optim import cosine_schedule, param_groups
from ..kernels.ema import EMAUpdater
from ..kernels.infonce import inbatch_infonce
from ..models.heads import MLPHead
from .base import Method, Step


@torch.no_grad()
def sincos_2d_(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1, temperature: float = 1e4) -> None:
    """Write moco-v3's fixed 2-D sin-cos table into ``pos_embed`` (1, prefix + h*w, D); prefix rows = 0."""
    h, w = grid
    d = pos_embed.shape[-1]
    if d % 4:
        raise ValueError(f"2-D sin-cos position embedding needs an embed dim divisible by 4, got {d}")
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                            indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4))  # D/4
    out_w, out_h = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega  # (h*w) x D/4
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # (h*w) x D
    pos_embed.zero_()
    pos_embed[0, num_prefix:] = table


@torch.no_grad()
def vit_init_(vit: nn.Module) -> nn.Module:
    """moco-v3's ViT set-up on a timm VisionTransformer: xavier-uniform Linears (q, k, v as three
    matrices), fixed sin-cos position embedding, tiny cls token, and the patch projection initialized
    uniformly and frozen (requires_grad=False)."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("qkv"):  # treat q, k, v as separate matrices
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if getattr(vit, "cls_token", None) is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    sincos_2d_(vit.pos_embed, vit.patch_embed.grid_size, 0 if vit.no_embed_class else vit.num_prefix_tokens)
    vit.pos_embed.requires_grad = False
    proj = vit.patch_embed.proj  # Conv2d(3, D, p, stride=p)
    val = math.sqrt(6.0 / float(3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -val, val)
    nn.init.zeros_(proj.bias)
    for p in proj.parameters():
        p.requires_grad = False  # stop-gradient on the patch projection: it stays at its random init
    return vit


class MoCoV3(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features (a ResNet, or a timm ViT prepared by ``vit_init_``).
        feat_dim: backbone output width.
        dim: projector/predictor output (default 256). mlp_dim: their hidden width (default 4096).
        proj_layers: projector depth (3 for ViT, 2 for ResNet-50 as in the official code).
        T: temperature τ (0.2 for ViT, 1.0 for ResNet-50).
        m: start momentum (default 0.99); m_end: cosine schedule end (default 1.0; m_end = m: constant).
        decay_all: weight-decay every parameter (moco-v3's AdamW for ViT); False: no decay on biases
            and norms (its LARS for ResNet).
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); mocov3 = MoCoV3(net, d, mlp_dim=2048, proj_layers=2, T=1.0)
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int = 256, mlp_dim: int = 4096,
                 proj_layers: int = 3, T: float = 0.2, m: float = 0.99, m_end: float = 1.0,
                 decay_all: bool = False, sync_bn: bool = True):
        super().__init__()
        if T <= 0:
            raise ValueError(f"MoCo v3 temperature T must be > 0, got {T}")
        if not 0.0 <= m <= m_end <= 1.0:
            raise ValueError(f"MoCo v3 momentum must satisfy 0 <= m <= m_end <= 1, got m={m}, m_end={m_end}")
        if proj_layers < 1:
            raise ValueError(f"MoCo v3 proj_layers must be >= 1, got {proj_layers}")
        self.T, self.m, self.m_end, self.decay_all = T, m, m_end, decay_all
        self.backbone = backbone
        self.projector = MLPHead([feat_dim] + [mlp_dim] * (proj_layers - 1) + [dim], bn=True, last_bn=True,
                                 last_bn_affine=False, bias=False)
        self.predictor = MLPHead([dim, mlp_dim, dim], bn=True, last_bn=False, bias=False)
        self.backbone_k = copy.deepcopy(self.backbone)
        self.projector_k = copy.deepcopy(self.projector)
        for p in [*self.backbone_k.parameters(), *self.projector_k.parameters()]:
            p.requires_grad = False  # the momentum encoder only moves by EMA
        self.ema = EMAUpdater(nn.ModuleList([self.backbone, self.projector]),
                              nn.ModuleList([self.backbone_k, self.projector_k]))
        if sync_bn and get_world_size() > 1 and torch.cuda.is_available():
            nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {"momentum": cosine_schedule(self.m, self.m_end, epochs, steps_per_epoch)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay, exclude_bias_and_norm=not self.decay_all)

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """2τ · InfoNCE of the local queries q (N, C) against the keys of all ranks; positive i ↔ rank·N + i."""
        k_all = all_gather_nograd(k)  # (N·world) x C, L2-normalized inside the fused loss
        return 2 * self.T * inbatch_infonce(q, k_all, self.T, pos_offset=get_rank() * q.shape[0])

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        q1 = self.predictor(self.projector(self.backbone(x1)))  # N x dim
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = self.projector_k(self.backbone_k(x1))  # N x dim
            k2 = self.projector_k(self.backbone_k(x2))
        return {"loss": self.contrastive(q1, k2) + self.contrastive(q2, k1)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        self.ema.update(step["momentum"])
