"""SEER-style SwAV on RegNetY (Goyal et al. 2021, https://arxiv.org/abs/2103.01988; SwAV: Caron et al. 2020).

    torchrun recipes/swav_regnety.py                            # CIFAR-10, RegNetY-400MF with a 3x3 stride-1 stem
    torchrun --nproc_per_node=8 --nnodes=64 recipes/swav_regnety.py --data /path/to/images --zero-stage 2 --grad-ckpt
    ... --arch regnet_y_128gf --hidden 8192     # torchvision's largest RegNetY (VISSL head d7392_d8192_d8192_d256)

The same recipe as ``swav_r50.py`` (arguments, augmentation, method: see there) with SEER's settings where VISSL's
public configs state them. ImageNet preset:
  * model: RegNetY-256GF (VISSL configs/config/pretrain/swav/models/regnet256Gf_1.yaml: depth 27, w_0 640,
    w_a 230.83, w_m 2.53, group width 373), built with torchvision's RegNet class (SE ratio 0.25 as its RegNetYs).
  * head: 10444-8192-8192-256 with ReLU and no BN, 16,000 prototypes (heads/d10444_d8192_d8192_d256_proto16k.yaml).
  * crops: 2x224 (scale 0.14-1) + 4x96 (0.05-0.14), flip, colour distortion 1.0, blur p 0.5
    (transforms/multicrop_6crop_2x224_4x96.yaml).
  * loss / optimizer (seer/models/regnet10B.yaml, the one SEER config stored here): Sinkhorn ε 0.03 x 10
    iterations, τ 0.1, 16 images per GPU (here a global batch of 8,192 = 16 x 512 GPUs, SEER's count), LARC (our
    LARS, trust 0.001, no clipping; VISSL's LARC puts wd·||w|| in the denominator, ours takes ||g + wd·w||: the
    same up to that term) with weight decay 1e-5 on every parameter in one group, lr 0.3 x batch/256 (auto
    scaling, base 0.3), warm-up the first 4.3648% of training (lengths [0.043648, 0.956352]) then cosine, here
    to lr/1000, synchronized BN, mixed precision, activation checkpointing.
  * not SEER's: the data (SEER: 1 B random Instagram images, one pass) -- this preset trains 100 epochs on the
    folder given (ImageNet layout or, once the unlabeled data layer lands, any images); the prototype freeze
    is 0 (SEER's base SwAV config froze them for its first 313 iterations; --freeze-prototypes-epochs N, under
    ZeRO too).
CIFAR-10 preset: swav_r50's (2x32 + 6x16 crops without blur, LARS 0.6 x batch/256, a 3,840 queue from epoch 15,
batch 512, 200 epochs) with RegNetY-400MF (3x3 stride-1 stem).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the SwAV recipe code lives in swav_r50.py

import swav_r50 as swav  # noqa: E402

get_args_parser, build_method = swav.get_args_parser, swav.build_method
_EPOCHS, _BATCH, _LR = 100, 8192, 0.3
PRESETS = {
    "imagenet": {**swav.PRESETS["imagenet"], "arch": "regnet_y_256gf", "epochs": _EPOCHS, "batch_size": _BATCH,
                 "lr": _LR, "min_lr": _LR * _BATCH / 256 / 1000, "warmup_epochs": 0.043648 * _EPOCHS, "wd": 1e-5,
                 "n_local": 4, "hidden": 8192, "dim": 256, "proj_layers": 3, "proj_bn": False,
                 "n_prototypes": 16000, "epsilon": 0.03, "sinkhorn_iters": 10, "freeze_prototypes_epochs": 0.0},
    "cifar": {**swav.PRESETS["cifar"], "arch": "regnet_y_400mf_cifar"},
}


def main(argv=None):
    return swav.main(argv, presets=PRESETS, recipe="swav_regnety")


if __name__ == "__main__":
    swav.cli.main_guard(main)
