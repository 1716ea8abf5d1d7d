"""Projection / prediction heads described as data, and split batch norm for single-device MoCo."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class MLPHead(nn.Module):
    """Linear layers from ``dims``; between them (and after the last if ``last_bn``) BN + ReLU.

    ``MLPHead([2048, 2048, 128])`` is MoCo v2's head (no BN: ``bn=False``); SimCLR/BYOL/SimSiam heads
    use ``bn=True``. ``last_bn_affine=False`` gives SimSiam's / MoCo v3's affine-free output BN.
    """

    def __init__(self, dims: Sequence[int], *, bn: bool = True, last_bn: bool = False,
                 last_bn_affine: bool = True, bias: bool | None = None, act=nn.ReLU):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"MLPHead needs at least input and output dims, got {list(dims)}")
        layers: list[nn.Module] = []
        n = len(dims) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == n - 1
            use_bn = (bn and not last) or (last and last_bn)
            layers.append(nn.Linear(d_in, d_out, bias=(not use_bn) if bias is None else bias))
            if use_bn:
                layers.append(nn.BatchNorm1d(d_out, affine=(last_bn_affine or not last)))
            if not last:
                layers.append(act(inplace=True) if act is nn.ReLU else act())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ProjectionHead = MLPHead


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over ``num_splits`` sub-batches, as in the MoCo CIFAR demo.

    Sub-batch j holds samples j, j+S, j+2S, ... (S = ``num_splits``): that is what a free reshape of
    (N, C, H, W) to (N/S, S*C, H, W) gives, so no copy is made.

    On a single device this emulates MoCo's shuffle BN: each sub-batch gets its own statistics, so
    the query/key pair of one sample never shares BN statistics (otherwise MoCo "cheats" through them).
    Running statistics are the mean over splits. In eval mode it is a plain BatchNorm2d.
    """

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"SplitBatchNorm2d: batch {n} is not divisible by num_splits={self.num_splits}")
        running_mean = self.running_mean.repeat(self.num_splits)
        running_var = self.running_var.repeat(self.num_splits)
        out = nn.functional.batch_norm(
            x.reshape(n // self.num_splits, c * self.num_splits, h, w), running_mean, running_var,
            self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
            True, self.momentum, self.eps).reshape(n, c, h, w)
        self.running_mean.copy_(running_mean.view(self.num_splits, c).mean(0))
        self.running_var.copy_(running_var.view(self.num_splits, c).mean(0))
        return out


def convert_to_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a SplitBatchNorm2d (weights and stats kept)."""
    if num_splits <= 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            new = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_to_split_bn(child, num_splits)
    return module
