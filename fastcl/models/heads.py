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

    Sub-batch j holds samples j, j+S, j+2S, ... (S = ``num_splits``), MoCo's grouping. On a single device this
    emulates MoCo's shuffle BN: each sub-batch gets its own statistics, so the query/key pair of one sample
    never shares BN statistics (otherwise MoCo "cheats" through them). Running statistics are the mean over
    splits (of the unbiased variances, as batch_norm keeps them). In eval mode it is a plain BatchNorm2d.

    The demo's form, ``batch_norm`` on x reshaped to (N/S, S*C, H, W), copies a channels_last activation to
    NCHW and back at every layer. Here x is *viewed* as (N/S, S, C, H, W) (a view in any memory format),
    the (S, C) statistics are reduced in fp32 (mean and mean square, no upcast copy), and one
    ``addcmul`` applies the per-split scale and shift: the output keeps x's layout and dtype.
    """

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        s = self.num_splits
        if n % s:
            raise ValueError(f"SplitBatchNorm2d: batch {n} is not divisible by num_splits={s}")
        x5 = x.view(n // s, s, c, h, w)  # sub-batch j = samples j, j+S, ...
        dims, count = (0, 3, 4), (n // s) * h * w
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics for half inputs (fp64 kept)
        mean = x5.mean(dims, dtype=acc)  # (S, C)
        var = (torch.linalg.vector_norm(x5, 2, dim=dims, dtype=acc).square() / count
               - mean.square()).clamp_min(0.0)  # biased, as batch_norm normalizes
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        out = torch.addcmul(shift.to(x.dtype).view(1, s, c, 1, 1), x5, scale.to(x.dtype).view(1, s, c, 1, 1))
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():  # each split's running stats, averaged over the splits
                m = 0.1 if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), m)
                unbiased = var * (count / max(count - 1, 1))
                self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), m)
        return out.view(n, c, h, w)


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
