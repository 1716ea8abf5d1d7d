"""DINO, ViT-B/16 (Caron et al. 2021, https://arxiv.org/abs/2104.14294), 400 epochs.

    torchrun recipes/dino_vitb16.py                             # CIFAR-10, ViT-B with 8px patches on 32px crops
    torchrun --nproc_per_node=8 recipes/dino_vitb16.py --data /path/to/imagenet --zero-stage 2 --grad-ckpt

The same recipe as ``dino_vits8.py`` (arguments, augmentation, method: see there) with ViT-B/16 presets. DINO
released ViT-B/16 (400 epochs, 78.2% linear, 76.1% k-NN) and ViT-B/8 (300 epochs, 80.1% linear); this recipe
is ViT-B/16 because its full training arguments are public: the ImageNet preset is the released run's args.txt
(dino_vitbase16_pretrain): ViT-B/16 (drop-path 0.1 in the student), head 2048-2048-256 -> K=65,536 with the
weight norm fixed to 1 (norm_last_layer true), last layer frozen for 3 epochs, teacher EMA 0.996 -> 1, τs 0.1,
τt 0.04 -> 0.07 over 50 epochs, center momentum 0.9, multi-crop 2x224 (scale 0.25-1) + 10x96 (0.05-0.25),
AdamW lr 0.00075 x batch/256 (10 warm-up epochs, cosine to 2e-6), wd 0.04 -> 0.4, per-parameter gradient clip
0.3, batch 1024 (32 per GPU on 32 GPUs), fp32 (use_fp16 false), 400 epochs. For ViT-B/8 pass --patch-size 8
(its 785-token global crops: see the README's memory table before choosing a batch).
CIFAR-10 preset: as dino_vits16's (8px patches: 4x4 tokens per 32px global crop, 2x2 per 16px local crop, K=4096,
batch 512, 200 epochs) with the ViT-B.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the DINO recipe code lives in dino_vits8.py

import dino_vits8 as dino  # noqa: E402

PRESETS = {
    "imagenet": {**dino.PRESETS["imagenet"], "arch": "vit_base_patch16_224", "patch_size": 16, "epochs": 400,
                 "lr": 0.00075, "min_lr": 2e-6, "clip_grad_param": 0.3, "norm_last_layer": True,
                 "global_crops_scale": (0.25, 1.0), "local_crops_scale": (0.05, 0.25), "freeze_last_layer": 3,
                 "warmup_teacher_temp_epochs": 50},
    "cifar": {**dino.PRESETS["cifar"], "arch": "vit_base_patch16_224", "patch_size": 8},
}


def main(argv=None):
    return dino.main(argv, presets=PRESETS, recipe="dino_vitb16")


if __name__ == "__main__":
    dino.cli.main_guard(main)
