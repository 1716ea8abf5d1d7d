"""MoCo v1 / v2: momentum contrast with a queue of keys.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(https://arxiv.org/abs/1911.05722); Chen et al., "Improved Baselines with Momentum Contrastive
Learning" (https://arxiv.org/abs/2003.04297). Follows facebookresearch/moco builder.py.

v1: linear 128-d head, T=0.07. v2: 2-layer MLP head (hidden = feature dim), T=0.2, aug+ and cosine lr.
Keys come from a momentum (EMA, m=0.999) copy of the encoder and are L2-normalized into a queue of
K=65,536 negatives. Shuffle BN: under DDP the key batch is shuffled across ranks; on one device every
BN becomes a split BN over ``bn_splits`` sub-batches and the key batch is shuffled locally (MoCo's
CIFAR demo), so query and key never share BN statistics.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from ..engine.distributed import all_gather_nograd, batch_shuffle_ddp, batch_unshuffle_ddp, get_world_size
from ..engine.optim import cosine_schedule
from ..kernels.ema import EMAUpdater
from ..kernels.infonce import moco_infonce
from ..kernels.queue import KeyQueue
from ..models.heads import MLPHead, convert_to_split_bn
from .base import Method, Step


class MoCo(Method):
    """
    Args:
        backbone: images -> (N, feat_dim) features.
        feat_dim: backbone output width.
        dim: embedding size (default 128).
        K: queue size (default 65536).
        m: key-encoder momentum (default 0.999); ``m_end`` > m gives a cosine schedule to it.
        T: softmax temperature (0.07 for v1, 0.2 for v2).
        mlp: 2-layer MLP head (v2) instead of a linear head (v1).
        bn_splits: split-BN sub-batches on a single device (ignored under DDP, which shuffles).
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); moco = MoCo(net, d, K=4096)
    """

    decay_bias_and_norm = True  # facebookresearch/moco main_moco.py: SGD(model.parameters(), weight_decay=...)

    def __init__(self, backbone: nn.Module, feat_dim: int, dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.2, mlp: bool = True, bn_splits: int = 8, m_end: float | None = None,
                 symmetric: bool = False):
        super().__init__()
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"MoCo momentum m must be in [0, 1], got {m}")
        if T <= 0:
            raise ValueError(f"MoCo temperature T must be > 0, got {T}")
        self.K, self.m, self.m_end, self.T, self.symmetric = K, m, m if m_end is None else m_end, T, symmetric
        self.single_device = get_world_size() == 1
        self.bn_splits = bn_splits if self.single_device else 1
        self.backbone = convert_to_split_bn(backbone, self.bn_splits)
        self.projector = MLPHead([feat_dim, feat_dim, dim], bn=False) if mlp else nn.Linear(feat_dim, dim)
        self.backbone_k = copy.deepcopy(self.backbone)
        self.projector_k = copy.deepcopy(self.projector)
        for p in [*self.backbone_k.parameters(), *self.projector_k.parameters()]:
            p.requires_grad = False  # the key encoder only moves by EMA
        self.queue = KeyQueue(dim, K)
        self.ema = EMAUpdater(nn.ModuleList([self.backbone, self.projector]),
                              nn.ModuleList([self.backbone_k, self.projector_k]))
        self._keys_to_enqueue: torch.Tensor | None = None

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        # constant m (v1/v2: m_end == m) or a cosine increase m -> m_end, one per-step array either way
        return {"momentum": cosine_schedule(self.m, self.m_end, epochs, steps_per_epoch)}

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        if self.single_device:  # split BN + local shuffle emulates shuffle BN
            # both indices come out of argsort, never straight from randperm: torch 2.11's inductor rewrites
            # x[randperm(n)] (pattern randperm_index) and fails on it, so the whole forward fell back to eager
            # ("WON'T CONVERT forward"); the inverse of a uniform permutation is uniform too
            shuffle = torch.argsort(torch.randperm(im_k.shape[0], device=im_k.device))
            k = self.projector_k(self.backbone_k(im_k[shuffle]))
            k = k[torch.argsort(shuffle)]
        else:
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
            k = batch_unshuffle_ddp(self.projector_k(self.backbone_k(im_k)), idx_unshuffle)
        return k  # N x dim, L2-normalized where it is used: inside the fused loss and the enqueue kernel

    def _contrast(self, im_q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = self.projector(self.backbone(im_q))  # N x dim, normalized inside the fused loss
        return moco_infonce(q, k, self.queue.queue, self.T)  # logits: N x (1+K), never materialized

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        im_q, im_k = views[0], views[1]
        k2 = self._keys(im_k)
        if self.symmetric:
            k1 = self._keys(im_q)
            loss = 0.5 * (self._contrast(im_q, k2) + self._contrast(im_k, k1))
            keys = torch.cat([k1, k2])
        else:
            loss = self._contrast(im_q, k2)
            keys = k2
        self._keys_to_enqueue = keys  # enqueued after backward: the loss still reads the queue
        return {"loss": loss}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        self.ema.update(step["momentum"])
        if self._keys_to_enqueue is not None:
            self.queue.enqueue(all_gather_nograd(self._keys_to_enqueue))
            self._keys_to_enqueue = None
