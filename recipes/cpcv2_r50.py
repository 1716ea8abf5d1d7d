"""CPC v2, ResNet-50 patch encoder (Hénaff et al. 2019, https://arxiv.org/abs/1905.09272).

    python recipes/cpcv2_r50.py                                 # CIFAR-10: 7x7 grid of 8px patches (stride 4)
    python recipes/cpcv2_r50.py --max-steps 50 --knn-samples 2000       # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/cpcv2_r50.py --data /path/to/imagenet   # ImageNet, 256px images

ImageNet preset: 256x256 crops cut into a 7x7 grid of 64x64 patches with 32px overlap (the paper), a
ResNet-50 patch encoder with layer norm instead of batch norm (the paper's change; it uses a wider
ResNet-161 for its best result, ResNet-50 for its ResNet-50 row), a PixelCNN-style context network
(masked 3x3 residual blocks: 5 blocks of width 1024, our choice), predictions 1..5 rows ahead in all 4
directions, InfoNCE against every patch in the batch, Adam(W) lr 2e-4 x batch/256 without weight decay,
batch 512, 200 epochs (cosine, our choice). Augmentation: CPC v2 augments every patch separately (color
dropping, jitter, flips); here the whole image is augmented once (RandomResizedCrop, flip, color jitter,
grayscale) before it is cut into patches.
CIFAR-10 preset: 32px crops -> 7x7 grid of 8px patches (stride 4), ResNet-18 CIFAR variant with layer norm,
context width 256 with 3 blocks, batch 512, 200 epochs; the representation is the mean patch feature.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=200, batch_size=512, lr=2e-4, warmup_epochs=0, optimizer="adamw",
                     wd=0.0, clip_grad=0.0, knn_every=0, crop_size=256, patch=64, stride=32, context_dim=1024,
                     context_blocks=5, directions=4),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=2e-4, warmup_epochs=0, optimizer="adamw",
                  wd=0.0, clip_grad=0.0, knn_every=10, crop_size=32, patch=8, stride=4, context_dim=256,
                  context_blocks=3, directions=4),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CPC v2", parents=[cli.base_parser()])
    g = p.add_argument_group("CPC v2")
    g.add_argument("--crop-size", type=cli.int_at_least(1), default=None, help="image crop (default: 256, 32 on CIFAR)")
    g.add_argument("--patch", type=cli.int_at_least(1), default=None, help="patch size (default: 64, 8 on CIFAR)")
    g.add_argument("--stride", type=int, default=None, help="patch stride (default: 32 = half overlap; 4 on CIFAR)")
    g.add_argument("--context-dim", type=cli.int_at_least(1), default=None,
                   help="context-network width (default: 1024 / 256)")
    g.add_argument("--context-blocks", type=int, default=None, help="masked residual blocks (default: 5 / 3)")
    g.add_argument("--steps", type=int, default=5, help="rows predicted ahead (default: 5)")
    g.add_argument("--directions", type=int, default=None, choices=[1, 4],
                   help="prediction directions (default: 4; 1 = top to bottom, CPC v1)")
    return p


def build_method(args):
    from fastcl.methods.cpc import CPC, bn_to_layernorm
    from fastcl.models import build_backbone

    encoder, feat_dim = build_backbone(args.arch)
    return CPC(bn_to_layernorm(encoder), feat_dim, patch=args.patch, stride=args.stride, hidden=args.context_dim,
               n_blocks=args.context_blocks, steps=args.steps, directions=args.directions)


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    view = augment.ViewSpec(size=args.crop_size, scale=(0.2, 1.0), blur_p=0.0, mean=tuple(mean), std=tuple(std))
    return cli.run(args, "cpcv2_r50", build_method, augment.AugmentSpec((view,), (1,)))


if __name__ == "__main__":
    cli.main_guard(main)
