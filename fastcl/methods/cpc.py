"""CPC v2: contrastive predictive coding over a grid of overlapping image patches.

Hénaff et al., "Data-Efficient Image Recognition with Contrastive Predictive Coding", ICML 2020
(https://arxiv.org/abs/1905.09272); van den Oord et al., "Representation Learning with Contrastive
Predictive Coding" (https://arxiv.org/abs/1807.03748).

A 256x256 image is cut into a G x G = 7x7 grid of 64x64 patches with 32px overlap (stride 32). A patch
encoder f_θ (a ResNet whose batch norms become layer norms: BN would leak information between the
patches of one image) maps patch (i, j) to z_ij (mean-pooled). A context network g_φ, PixelCNN-style
(residual blocks whose 3x3 convolutions are masked so that row i only sees rows <= i), summarizes
c_ij = g_φ({z_uv : u <= i}). For k = 1..K steps the prediction ẑ_{i+k,j} = W_k c_ij is scored against the
true z_{i+k,j} and every other patch in the batch (all images, all positions) with InfoNCE (dot products):

    L = −Σ_{i,j,k} log  exp(ẑ_{i+k,j}·z_{i+k,j}) / Σ_{z_l ∈ batch} exp(ẑ_{i+k,j}·z_l)

averaged over the terms of each k and over k. ``directions=4`` repeats this top-to-bottom, bottom-to-top,
left-to-right and right-to-left (CPC v2's extra directions), each with its own g_φ and W_k, by rotating
the grid. The representation (``self.backbone``) is the patch features mean-pooled over the grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.infonce import contrastive_lse
from .base import Method, Step


def patchify(x: torch.Tensor, patch: int, stride: int) -> tuple[torch.Tensor, int]:
    """(B, C, H, W) -> ((B·G·G, C, patch, patch) row-major per image, G); needs a square grid."""
    B, C, H, W = x.shape
    if H != W or (H - patch) % stride:
        raise ValueError(f"patchify: a {H}x{W} image is not tiled by {patch}px patches at stride {stride}")
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)  # B x C x G x G x P x P
    G = p.shape[2]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(B * G * G, C, patch, patch), G


def bn_to_layernorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by GroupNorm(1, C): a layer norm over (C, H, W) of each patch (CPC v2)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, eps=child.eps))
        else:
            bn_to_layernorm(child)
    return module


class PatchGridEncoder(nn.Module):
    """Images -> patch-feature grid (``grid``: B x D x G x G) or its mean over the grid (``forward``: B x D)."""

    def __init__(self, encoder: nn.Module, patch: int, stride: int):
        super().__init__()
        self.encoder, self.patch, self.stride = encoder, patch, stride

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        patches, G = patchify(x, self.patch, self.stride)
        z = self.encoder(patches)  # (B·G·G) x D
        return z.view(x.shape[0], G, G, -1).permute(0, 3, 1, 2)  # B x D x G x G

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x).mean((2, 3))


class MaskedConv2d(nn.Conv2d):
    """k x k convolution that is causal over rows: output row i sees input rows i-k+1 .. i (zero-padded
    above, centered horizontally), i.e. a PixelCNN mask over whole rows."""

    def __init__(self, c_in: int, c_out: int, k: int = 3):
        super().__init__(c_in, c_out, kernel_size=k, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        return super().forward(F.pad(x, (k // 2, k // 2, k - 1, 0)))  # (left, right, top, bottom)


class ContextNetwork(nn.Module):
    """g_φ: 1x1 conv to ``hidden``, then ``n_blocks`` residual blocks ReLU-1x1-ReLU-masked 3x3-ReLU-1x1."""

    def __init__(self, dim: int, hidden: int, n_blocks: int):
        super().__init__()
        self.inp = nn.Conv2d(dim, hidden, 1)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), MaskedConv2d(hidden, hidden, 3), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1)) for _ in range(n_blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)
        for block in self.blocks:
            h = h + block(h)
        return h  # B x hidden x G x G, row i depends on rows <= i only


class CPC(Method):
    """
    Args:
        encoder: patch encoder, (N, 3, patch, patch) -> (N, feat_dim); use ``bn_to_layernorm`` on ResNets.
        feat_dim: its output width. patch, stride: the grid (64 / 32 on 256px images -> 7x7).
        hidden: context-network width (default 1024). n_blocks: its residual blocks (default 5).
        steps: K, rows predicted ahead (default 5: every row below on a 7-row grid, as CPC v1's "up to 5").
        directions: 1 (top to bottom) or 4 (all four, CPC v2).
    Raises:
        ValueError: on steps < 1, n_blocks < 0 or directions not in (1, 4).
    >>> from fastcl.models import build_backbone
    >>> net, d = build_backbone("resnet18_cifar"); cpc = CPC(bn_to_layernorm(net), d, patch=8, stride=4)
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, patch: int = 64, stride: int = 32, hidden: int = 1024,
                 n_blocks: int = 5, steps: int = 5, directions: int = 1):
        super().__init__()
        if steps < 1:
            raise ValueError(f"CPC steps must be >= 1, got {steps}")
        if n_blocks < 0:
            raise ValueError(f"CPC n_blocks must be >= 0, got {n_blocks}")
        if directions not in (1, 4):
            raise ValueError(f"CPC directions must be 1 or 4, got {directions}")
        if not 0 < stride <= patch:
            raise ValueError(f"CPC stride must be in (0, patch={patch}], got {stride}")
        self.steps, self.directions = steps, directions
        self.backbone = PatchGridEncoder(encoder, patch, stride)
        self.context = nn.ModuleList(ContextNetwork(feat_dim, hidden, n_blocks) for _ in range(directions))
        self.predictors = nn.ModuleList(  # W_k, one per step and direction
            nn.ModuleList(nn.Conv2d(hidden, feat_dim, 1) for _ in range(steps)) for _ in range(directions))

    def forward(self, views: list[torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        z = self.backbone.grid(views[0])  # B x D x G x G
        B, D, G, _ = z.shape
        if G < 2:
            raise ValueError(f"CPC needs a grid of at least 2 rows, got {G}x{G}")
        out, losses = {}, []
        for d in range(self.directions):
            zd = torch.rot90(z, d, (2, 3))  # direction d becomes top-to-bottom
            c = self.context[d](zd)  # B x hidden x G x G
            keys = zd.permute(0, 2, 3, 1).reshape(B * G * G, D)  # every patch of the batch, row-major
            for k in range(1, min(self.steps, G - 1) + 1):
                pred = self.predictors[d][k - 1](c[:, :, :G - k])  # ẑ_{i+k,j} = W_k c_ij: B x D x (G-k) x G
                q = pred.permute(0, 2, 3, 1).reshape(-1, D)  # (B·(G-k)·G) x D
                b, i, j = torch.meshgrid(torch.arange(B, device=z.device), torch.arange(G - k, device=z.device),
                                         torch.arange(G, device=z.device), indexing="ij")
                pos = (b * G * G + (i + k) * G + j).reshape(-1)  # index of z_{i+k,j} among the keys
                loss_k = contrastive_lse(q, keys, 1.0, pos_index=pos, normalize_q=False,
                                         normalize_keys=False).mean()
                losses.append(loss_k)
                if d == 0:
                    out[f"loss_k{k}"] = loss_k.detach()
        return {"loss": torch.stack(losses).mean(), **out}
