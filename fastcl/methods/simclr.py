"""SimCLR v1 / v2: in-batch contrastive learning with the NT-Xent loss.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020
(https://arxiv.org/abs/2002.05709); Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised
Learners", NeurIPS 2020 (https://arxiv.org/abs/2006.10029). Follows google-research/simclr.

For a batch of N images, two views give z_1..z_2N (z = g(f(x)), L2-normalized); the loss of the
positive pair (i, j) is

    l(i, j) = -log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)        (2N-2 negatives)

averaged over all 2N anchors. Under DDP the z of every rank are all-gathered with gradient, so each
anchor sees 2N·world − 2 negatives (SimCLR's cross-replica concat), and batch norm is global (SyncBN).

v1: projection head g = 2 layers (feat → feat → 128, BN everywhere, ReLU between; the output BN has a
scale but no bias, as SimCLR's code). v2: 3 layers; downstream fine-tuning starts from the first
projection layer (``finetune_head()``); optionally a MoCo-style momentum encoder whose outputs fill a
queue of extra negatives (``queue_size`` > 0; v2 Sec. 2: "a memory network ... whose output will be
buffered as negative examples").
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from ..engine.distributed import all_gather_grad, all_gather_nograd, get_rank, get_world_size
from ..kernels.ema import EMAUpdater
from ..kernels.infonce import contrastive_lse, ntxent
from ..kernels.queue import KeyQueue
from ..models.heads import MLPHead
from .base import Method, Step


def simclr_projector(feat_dim: int, hidden_dim: int, dim: int, num_layers: int) -> MLPHead:
    """``num_layers`` linear layers, BN after each (ReLU between); the output BN has no bias (``center=False``)."""
    head = MLPHead([feat_dim] + [hidden_dim] * (num_layers - 1) + [dim], bn=True, last_bn=True)
    out_bn = head.net[-1]
    nn.init.zeros_(out_bn.bias)
    out_bn.bias.requires_grad = False  # stays 0: scale-only output BN
    return head


class SimCLR(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features (f).
        feat_dim: backbone output width.
        dim: output of the projection head (default 128).
        hidden_dim: hidden width of the head (default: feat_dim, i.e. 2048 for ResNet-50).
        proj_layers: 2 (v1) or 3 (v2) linear layers in the head.
        T: temperature τ (0.1 at batch 4096 on ImageNet; 0.5 for small batches / CIFAR).
        queue_size: v2 memory: K negatives from a momentum encoder (0 = off, v1 and the default).
        m: momentum of that encoder (default 0.999).
        sync_bn: global BN under multi-GPU DDP (default True).
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); simclr = SimCLR(net, d, T=0.5)
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int = 128, hidden_dim: int | None = None,
                 proj_layers: int = 2, T: float = 0.1, queue_size: int = 0, m: float = 0.999,
                 sync_bn: bool = True):
        super().__init__()
        if T <= 0:
            raise ValueError(f"SimCLR temperature T must be > 0, got {T}")
        if proj_layers < 1:
            raise ValueError(f"SimCLR proj_layers must be >= 1, got {proj_layers}")
        if queue_size < 0:
            raise ValueError(f"SimCLR queue_size must be >= 0, got {queue_size}")
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"SimCLR momentum m must be in [0, 1], got {m}")
        self.T, self.m, self.proj_layers = T, m, proj_layers
        self.backbone = backbone
        self.projector = simclr_projector(feat_dim, hidden_dim or feat_dim, dim, proj_layers)
        self.queue = KeyQueue(dim, queue_size) if queue_size else None
        if self.queue is not None:  # v2 memory: momentum encoder + queue
            self.backbone_k = copy.deepcopy(self.backbone)
            self.projector_k = copy.deepcopy(self.projector)
            for p in [*self.backbone_k.parameters(), *self.projector_k.parameters()]:
                p.requires_grad = False
            self.ema = EMAUpdater(nn.ModuleList([self.backbone, self.projector]),
                                  nn.ModuleList([self.backbone_k, self.projector_k]))
        if sync_bn and get_world_size() > 1 and torch.cuda.is_available():
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self._keys_to_enqueue: torch.Tensor | None = None

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {"momentum": np.full(epochs * steps_per_epoch, self.m)} if self.queue is not None else {}

    def finetune_head(self) -> nn.Sequential:
        """SimCLR v2 fine-tuning network: the backbone plus the first projection layer (Linear, BN, ReLU).
        The modules are shared with this method (``copy.deepcopy`` the result to detach it)."""
        return nn.Sequential(self.backbone, *self.projector.net[:3])

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, queue: torch.Tensor | None = None) -> torch.Tensor:
        """NT-Xent of the local pairs (z1_i, z2_i) against every gathered z (and ``queue`` rows)."""
        n = z1.shape[0]
        world = get_world_size()
        z_all = all_gather_grad(torch.cat([z1, z2])) if world > 1 else None  # (2N·world) x C, rank order
        offset = get_rank() * 2 * n if world > 1 else 0
        if queue is None:
            return ntxent(z1, z2, self.T, z_all=z_all, offset=offset)
        keys = torch.cat([torch.cat([z1, z2]) if z_all is None else z_all, queue.detach()])  # (2N·world + K) x C
        a = torch.arange(2 * n, device=z1.device)
        return contrastive_lse(torch.cat([z1, z2]), keys, self.T, pos_index=(a + n) % (2 * n) + offset,
                               self_index=a + offset).mean()

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]
        n = x1.shape[0]
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # 2N x dim: one pass, BN over both views
        z1, z2 = z[:n], z[n:]
        if self.queue is None:
            return {"loss": self.loss(z1, z2)}
        with torch.no_grad():
            k = self.projector_k(self.backbone_k(torch.cat([x1, x2])))  # 2N x dim
        self._keys_to_enqueue = k  # enqueued (L2-normalized by the queue) after the step: the loss reads the queue
        return {"loss": self.loss(z1, z2, self.queue.queue)}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        if self.queue is None:
            return
        self.ema.update(step["momentum"])
        if self._keys_to_enqueue is not None:
            self.queue.enqueue(all_gather_nograd(self._keys_to_enqueue))
            self._keys_to_enqueue = None
