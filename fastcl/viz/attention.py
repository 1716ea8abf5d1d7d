"""The last block's CLS self-attention of a ViT, per head, overlaid on the image, with DINO's thresholded masks.

    python -m fastcl.viz attention --checkpoint runs/dino_vits8/checkpoint.pth --image cat.jpg [--out DIR]

As DINO's ``visualize_attention.py``: the image is fitted (centre crop + bicubic resize) to the size the ViT was
trained at and normalized with its training data's statistics; the attention of the CLS token in the last block,
softmax(q kᵀ / sqrt(d)) per head, is read over the patch tokens and drawn on the patch grid; the mask of a head
keeps its most-attended patches holding ``--threshold`` (default 0.6) of the head's patch attention mass
(``visualize_attention.py --threshold 0.6``).

The attention is recomputed from the last block's ``qkv`` projection, captured with a forward hook (timm's fused
``scaled_dot_product_attention`` never materializes it), through the block's own ``q_norm`` / ``k_norm`` and
``scale``. ``cls_attention`` returns the full CLS rows (each sums to 1 over all tokens, the CLS token included);
the picture shows the patch columns, each head scaled to its own maximum.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .model import is_vit

__all__ = ["cls_attention", "patch_maps", "threshold_masks", "load_image", "attention_figure", "run"]


@torch.no_grad()
def cls_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, H, N): the last block's attention of the CLS token (query 0) to all N tokens, per head, float32;
    every row sums to 1. ``images`` (B, 3, S, S) normalized as in training."""
    if not is_vit(vit):
        raise ValueError(f"{type(vit).__name__} is not a timm ViT (no blocks[-1].attn.qkv)")
    attn = vit.blocks[-1].attn
    seen = {}
    handle = attn.qkv.register_forward_hook(lambda mod, inp, out: seen.__setitem__("qkv", out))
    try:
        vit(images)
    finally:
        handle.remove()
    qkv = seen["qkv"].float()  # (B, N, 3C)
    B, N, _ = qkv.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", qkv.shape[-1] // 3 // heads)
    q, k, _ = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N): the CLS query's row only
    return logits.softmax(dim=-1)[:, :, 0]


def patch_maps(vit: nn.Module, attn: torch.Tensor) -> torch.Tensor:
    """(B, H, gh, gw): the patch columns of ``cls_attention``'s rows (prefix tokens dropped) on the patch grid."""
    gh, gw = vit.patch_embed.grid_size
    prefix = getattr(vit, "num_prefix_tokens", 1)
    return attn[..., prefix:].reshape(*attn.shape[:-1], gh, gw)


def threshold_masks(maps: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """DINO's mask (visualize_attention.py): per head, the most-attended patches holding ``threshold`` of the
    head's patch attention mass (renormalized over the patches), i.e. the smallest such top set. Bool, same
    shape as ``maps`` (..., gh, gw)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    flat = maps.flatten(-2)
    val, idx = torch.sort(flat, dim=-1)  # ascending
    val = val / val.sum(dim=-1, keepdim=True)
    keep_sorted = val.cumsum(dim=-1) > (1 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, idx, keep_sorted)  # back to patch order
    return keep.view_as(maps)


def load_image(path: str | Path, size: int):
    """(uint8 (size, size, 3) array: the image as the model sees it, before normalization). Centre crop to a
    square and bicubic resize, as an eval transform; any PIL-readable file (OSError if not)."""
    import numpy as np
    from PIL import Image, ImageOps

    from .common import need_file

    need_file(path, "image")
    with Image.open(path) as im:
        im = ImageOps.fit(im.convert("RGB"), (size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _normalize(img, mean, std) -> torch.Tensor:
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


def attention_figure(img, maps: torch.Tensor, masks: torch.Tensor, threshold: float, title: str = ""):
    """Row 1: the image, then each head's CLS attention (scaled to the head's max) over it; row 2: the mean over
    heads, then each head's mask (outside dimmed, outline drawn)."""
    import numpy as np

    from .common import pyplot

    plt = pyplot()
    H = maps.shape[0]
    S = img.shape[0]
    extent = (0, S, S, 0)
    fig, axes = plt.subplots(2, H + 1, figsize=(1.7 * (H + 1), 4.1), squeeze=False)
    shown = (maps / maps.flatten(1).amax(dim=1)[:, None, None]).numpy()  # display normalization, per head
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=8)
    mean = maps.mean(0).numpy()
    axes[1, 0].imshow(img)
    axes[1, 0].imshow(mean / mean.max(), cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
    axes[1, 0].set_title("mean of heads", fontsize=8)
    for h in range(H):
        ax = axes[0, h + 1]
        ax.imshow(img)
        ax.imshow(shown[h], cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=8)
        m = masks[h].numpy()
        up = np.kron(m, np.ones((S // m.shape[0], S // m.shape[1]), dtype=bool))  # mask at image resolution
        ax = axes[1, h + 1]
        ax.imshow((img * (0.25 + 0.75 * up[..., None])).astype(np.uint8))
        ax.contour(up.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"mask: top {threshold:.0%} mass\n({m.mean():.0%} of patches)", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    return fig


def run(checkpoint: str | Path, image: str | Path, out: str | Path | None = None, threshold: float = 0.6) -> dict:
    """Draw the picture; returns ``{"png", "attn" (H, N) CLS rows, "maps" (H, gh, gw), "masks" (H, gh, gw)}``."""
    from . import model
    from .common import out_dir, save

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    bb = model.load(checkpoint)
    if not bb.is_vit:
        raise ValueError(f"{checkpoint}: the backbone is {bb.arch}, not a ViT; attention maps need a ViT checkpoint "
                         "(DINO, MoCo v3)")
    img = load_image(image, bb.size)
    attn = cls_attention(bb.net, _normalize(img, bb.mean, bb.std))[0]  # (H, N)
    maps = patch_maps(bb.net, attn)
    masks = threshold_masks(maps, threshold)
    gh, gw = maps.shape[-2:]
    fig = attention_figure(img, maps, masks, threshold,
                           title=f"{Path(checkpoint).name}: {bb.arch}, last block CLS attention, {gh}x{gw} patches, "
                                 f"{bb.size} px")
    d = out_dir(out, Path(checkpoint).resolve().parent)
    png = save(fig, d / f"attention_{Path(image).stem}.png")
    return {"png": png, "attn": attn, "maps": maps, "masks": masks, "arch": bb.arch}
