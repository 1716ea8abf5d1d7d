"""Load a trained backbone back as the public model it is: ``torchvision.models.resnet*`` (with the 3x3 stem
and no max-pool for the ``*_cifar`` variants) or a ``timm`` ViT, weights checked key by key.

    from fastcl.models import load_backbone
    net = load_backbone("runs/mocov2_r50/resnet18_cifar.pth")       # an export (python -m fastcl.eval.export)
    net = load_backbone("runs/mocov2_r50/checkpoint.pth")           # or the training checkpoint itself
    feats = net(images)                                             # (B, 512) features; fc is Identity

Whatever was trained (ResNet-50 at 224 px, the ResNet-18 CIFAR variant, a ViT with CIFAR patches, MoCo v3's
12-head ViT-S) comes back with the architecture recorded in the file; nothing to remember about stems.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn


def load_backbone(path: str | Path, arch: str | None = None) -> nn.Module:
    """The backbone in ``path`` (a training checkpoint, ``backbone.pth`` or an export) as its torchvision /
    timm module in eval mode: images (B, 3, H, W) -> features (B, D), ``num_features`` = D.

    Raises FileNotFoundError / ValueError naming ``path`` for a missing or unreadable file, a file with no
    backbone, an ``arch`` that contradicts the recorded one, or an encoder with no public counterpart
    (CMC, CPC v2)."""
    from ..eval.export import (backbone_state_dict, check_public_backbone, load_into_reference, model_kwargs_of,
                               read_checkpoint)

    ckpt = read_checkpoint(path)
    check_public_backbone(ckpt, str(path))
    sd, found = backbone_state_dict(ckpt, str(path))
    if arch and found and arch != found:
        raise ValueError(f"{path}: arch {arch} (--arch) given but the checkpoint was trained with {found}")
    arch = arch or found
    if not arch:
        raise ValueError(f"{path}: no architecture recorded in the file; pass --arch (arch=, e.g. 'resnet50')")
    net = load_into_reference(sd, arch, **model_kwargs_of(ckpt))
    net.fastcl_arch = arch
    return net.eval()
