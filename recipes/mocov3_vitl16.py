"""MoCo v3, ViT-L/16 (Chen et al. 2021, https://arxiv.org/abs/2104.02057).

    python recipes/mocov3_vitl16.py --grad-ckpt                  # CIFAR-10, ViT-L with 4x4 patches on 32x32
    torchrun --nproc_per_node=8 recipes/mocov3_vitl16.py --data /path/to/imagenet --zero-stage 2 --grad-ckpt

The same recipe as ``mocov3_vits16.py`` (arguments, augmentation, method: see there) with ViT-L presets.
ImageNet preset: ViT-L/16 (16 heads, 1024-d, 24 blocks) with the ViT-B settings of moco-v3 CONFIG.md: frozen
random patch projection, sin-cos position embedding, 3-layer projector / 2-layer predictor (4096 hidden, 256
out, BN), T=0.2, momentum 0.99 -> 1 (cosine), AdamW lr 1.5e-4 x batch/256, wd 0.1, 40 warm-up epochs, batch
4096, 300 epochs (the paper's ViT-L row: 300 epochs, 77.6% linear). moco-v3's public code and CONFIG.md cover
ViT-S and ViT-B only; that ViT-L takes the ViT-B hyper-parameters is how mmselfsup's reproduction config
(mocov3_vit-large-p16_64xb64-amp-coslr-300e_in1k.py inherits its ViT-B file, changing only the arch) trains it
-- not verified against the paper's appendix here.
CIFAR-10 preset: the same ViT-L with 4x4 patches on 32x32 crops (64 tokens), hidden 2048, batch 256 (half the
ViT-S/B presets': 24 wider blocks), 200 epochs, 20 warm-up epochs, no blur; an untuned starting point.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the MoCo v3 ViT code lives in mocov3_vits16.py

import mocov3_vits16 as mocov3  # noqa: E402

get_args_parser, build_method = mocov3.get_args_parser, mocov3.build_method
PRESETS = {
    "imagenet": {**mocov3.PRESETS["imagenet"], "arch": "vit_large_patch16_224", "num_heads": 16},
    "cifar": {**mocov3.PRESETS["cifar"], "arch": "vit_large_patch16_224", "num_heads": 16, "batch_size": 256},
}


def main(argv=None):
    return mocov3.main(argv, presets=PRESETS, recipe="mocov3_vitl16")


if __name__ == "__main__":
    mocov3.cli.main_guard(main)
