"""DINO, ViT-S/16 (Caron et al. 2021, https://arxiv.org/abs/2104.14294), 100 epochs.

    torchrun recipes/dino_vits16.py                             # CIFAR-10, ViT-S with 8px patches on 32px crops
    torchrun recipes/dino_vits16.py --max-steps 50 --knn-samples 2000  # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/dino_vits16.py --data /path/to/imagenet   # ImageNet, 100 epochs

The same recipe as ``dino_vits8.py`` (arguments, augmentation, method: see there) with other presets.
ImageNet preset = the paper's 100-epoch ViT-S/16 setting: drop-path 0.1 in the student, head 2048-2048-256
-> K=65,536 with the weight norm fixed to 1, last layer frozen in epoch 0, teacher EMA 0.996 -> 1,
τs = 0.1, τt 0.04 -> 0.07 over 30 epochs, center momentum 0.9, multi-crop 2x224 (scale 0.32-1) + 10x96
(0.05-0.32), AdamW lr 0.0005 x 1024/256 (10 warm-up epochs, cosine to 1e-6), wd 0.04 -> 0.4,
per-parameter gradient clip 3.0, batch 1024.
CIFAR-10 preset: as dino_vits8's with the patch doubled like the name says (8px patches: 4x4 tokens per
32px global crop, 2x2 per 16px local crop).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the DINO recipe code lives in dino_vits8.py

import dino_vits8 as dino  # noqa: E402

PRESETS = {
    "imagenet": {**dino.PRESETS["imagenet"], "arch": "vit_small_patch16_224", "patch_size": 16, "epochs": 100,
                 "norm_last_layer": True, "global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32)},
    "cifar": {**dino.PRESETS["cifar"], "arch": "vit_small_patch16_224", "patch_size": 8},
}


def main(argv=None):
    return dino.main(argv, presets=PRESETS, recipe="dino_vits16")


if __name__ == "__main__":
    dino.cli.main_guard(main)
