"""Backbones: images (B, 3, H, W) -> features (B, D), with the classifier removed.

ResNets come from torchvision (``fc`` replaced by Identity, so exported weights load into
``torchvision.models.resnet50()``), ViTs from timm (``num_classes=0``, never pretrained).
``resnet18_cifar`` is the CIFAR variant of the SimCLR/MoCo CIFAR demos: 3x3 stride-1 stem, no max-pool.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision

_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
_VITS = {"vit_small_patch16_224": 384, "vit_small_patch8_224": 384, "vit_base_patch16_224": 768,
         "vit_large_patch16_224": 1024, "vit_tiny_patch16_224": 192}
BACKBONES = sorted([*_RESNETS, *(f"{n}_cifar" for n in _RESNETS), *_VITS])


def build_backbone(name: str, *, img_size: int | None = None, drop_path_rate: float = 0.0,
                   zero_init_residual: bool = False, **kw) -> tuple[nn.Module, int]:
    """Build a backbone by name; returns ``(module, feature_dim)``.

    ``img_size`` sets a ViT's position-embedding grid (other crop sizes are interpolated at run time).
    >>> net, dim = build_backbone("resnet18_cifar"); dim
    512
    """
    base = name.removesuffix("_cifar")
    if base in _RESNETS:
        net = getattr(torchvision.models, base)(weights=None, zero_init_residual=zero_init_residual, **kw)
        if name.endswith("_cifar"):  # small images: keep resolution in the stem
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        return net, _RESNETS[base]
    if name in _VITS:
        import timm

        vit_kw = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, dynamic_img_size=True, **kw)
        if img_size is not None:
            vit_kw["img_size"] = img_size
        net = timm.create_model(name, **vit_kw)
        return net, _VITS[name]
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


def is_vit(name: str) -> bool:
    return name in _VITS
