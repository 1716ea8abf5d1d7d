"""MoCo v3, ViT-B/16 (Chen et al. 2021, https://arxiv.org/abs/2104.02057).

    python recipes/mocov3_vitb16.py                              # CIFAR-10, ViT-B with 4x4 patches on 32x32
    torchrun --nproc_per_node=8 recipes/mocov3_vitb16.py --data /path/to/imagenet --zero-stage 2 --grad-ckpt
    torchrun --nproc_per_node=8 --nnodes=8 ... recipes/mocov3_vitb16.py --data /path/to/imagenet   # batch 4096

The same recipe as ``mocov3_vits16.py`` (arguments, augmentation, method: see there) with ViT-B presets.
ImageNet preset = moco-v3 CONFIG.md's ViT-Base run (76.7% linear in the paper): ViT-B/16 (12 heads, 768-d, 12
blocks), patch projection frozen at its random init (--stop-grad-conv1), fixed 2-D sin-cos position embedding,
3-layer projector and 2-layer predictor (4096 hidden, 256 out, BN), T=0.2, momentum 0.99 -> 1 (cosine,
--moco-m-cos), BYOL augmentation (crop 0.08-1), AdamW lr 1.5e-4 x batch/256, wd 0.1, 40 warm-up epochs then
cosine, batch 4096, 300 epochs.
CIFAR-10 preset: the same ViT-B with 4x4 patches on 32x32 crops (64 tokens), hidden 2048, batch 512, 200 epochs,
20 warm-up epochs, no blur (an untuned starting point sized for one GPU; see the README's memory table).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the MoCo v3 ViT code lives in mocov3_vits16.py

import mocov3_vits16 as mocov3  # noqa: E402

get_args_parser, build_method = mocov3.get_args_parser, mocov3.build_method
PRESETS = {
    "imagenet": {**mocov3.PRESETS["imagenet"], "arch": "vit_base_patch16_224", "num_heads": 12},
    "cifar": {**mocov3.PRESETS["cifar"], "arch": "vit_base_patch16_224", "num_heads": 12},
}


def main(argv=None):
    return mocov3.main(argv, presets=PRESETS, recipe="mocov3_vitb16")


if __name__ == "__main__":
    mocov3.cli.main_guard(main)
