"""DINO, ViT-S/8 (Caron et al. 2021, https://arxiv.org/abs/2104.14294): the fastcl headline recipe.

    torchrun recipes/dino_vits8.py                              # CIFAR-10, ViT-S with 4px patches on 32px crops
    torchrun recipes/dino_vits8.py --max-steps 50 --knn-samples 2000   # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/dino_vits8.py --data /path/to/imagenet   # the paper's ViT-S/8 run

ImageNet preset = the released ViT-S/8 run (dino_deitsmall8_pretrain/args.txt; 79.7% linear, 78.3% k-NN):
ViT-S/8 (drop-path 0.1 in the student), DINO head 2048-2048-256 -> K=65,536 with a trainable weight norm
(norm_last_layer false), last layer frozen in epoch 0, teacher EMA 0.996 -> 1 (cosine), τs = 0.1,
τt 0.04 -> 0.07 over 30 epochs, center momentum 0.9, multi-crop 2x224 (scale 0.4-1) + 10x96 (0.05-0.4),
AdamW lr 0.0005 x batch/256 (10 warm-up epochs, cosine to 1e-6), wd 0.04 -> 0.4 (cosine, not on biases
and norms), per-parameter gradient clip 3.0, 800 epochs, batch 1024 (the paper's global batch).

CIFAR-10 preset (used with no arguments): the same recipe scaled to 32x32 images: ViT-S with 4x4-pixel
patches (8x8 tokens per 32px global crop, 4x4 per 16px local crop), 2x32px (scale 0.32-1) + 10x16px
(0.05-0.32) crops without blur, K=4096, norm_last_layer true, batch 512, 200 epochs, kNN every 10 epochs.
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="vit_small_patch8_224", patch_size=8, epochs=800, batch_size=1024, lr=0.0005,
                     min_lr=1e-6, warmup_epochs=10, optimizer="adamw", wd=0.04, wd_end=0.4, clip_grad=0.0,
                     clip_grad_param=3.0, out_dim=65536, norm_last_layer=False, global_crop_size=224,
                     local_crop_size=96, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                     local_crops_number=10, blur=True, knn_every=0, freeze_last_layer=1,
                     warmup_teacher_temp_epochs=30),
    "cifar": dict(arch="vit_small_patch8_224", patch_size=4, epochs=200, batch_size=512, lr=0.0005,
                  min_lr=1e-6, warmup_epochs=10, optimizer="adamw", wd=0.04, wd_end=0.4, clip_grad=0.0,
                  clip_grad_param=3.0, out_dim=4096, norm_last_layer=True, global_crop_size=32,
                  local_crop_size=16, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32),
                  local_crops_number=10, blur=False, knn_every=10, freeze_last_layer=1,
                  warmup_teacher_temp_epochs=30),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DINO", parents=[cli.base_parser()])
    p.set_defaults(min_lr=None)  # DINO's final lr comes from the preset (1e-6)
    g = p.add_argument_group("DINO")
    g.add_argument("--patch-size", type=cli.int_at_least(1), default=None,
                   help="ViT patch size in pixels (default: 8 on ImageNet, 4 on 32px CIFAR crops)")
    g.add_argument("--drop-path", type=cli.float_in(0.0, 1.0), default=0.1,
                   help="student stochastic depth (default: 0.1)")
    g.add_argument("--out-dim", type=cli.int_at_least(1), default=None,
                   help="K, head outputs (default: 65536; 4096 on CIFAR)")
    g.add_argument("--head-hidden", type=cli.int_at_least(1), default=2048, help="head MLP width (default: 2048)")
    g.add_argument("--bottleneck", type=cli.int_at_least(1), default=256, help="head bottleneck (default: 256)")
    g.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=None,
                   help="fix the last layer's weight norm to 1; more stable, 'true' for bigger ViTs "
                        "(default: false for ViT-S/8 on ImageNet, true on CIFAR)")
    g.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="teacher EMA momentum at step 0, cosine to 1 (default: 0.996; try 0.9995 for small batches)")
    g.add_argument("--student-temp", type=float, default=0.1, help="τs (default: 0.1)")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="τt at epoch 0 (default: 0.04)")
    g.add_argument("--teacher-temp", type=float, default=0.07,
                   help="τt after the warm-up (default: 0.07; lower it if the loss stalls early)")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=None, help="τt warm-up epochs")
    g.add_argument("--center-momentum", type=float, default=0.9, help="center EMA momentum (default: 0.9)")
    g.add_argument("--freeze-last-layer", type=int, default=None,
                   help="epochs without updates of the last layer (no decay, no AdamW moments either)")
    g.add_argument("--clip-grad-param", type=float, default=None,
                   help="per-parameter grad-norm clip as in DINO, 0 = off; --clip-grad is the engine's global-norm "
                        "clip, 0 in the presets")
    g = p.add_argument_group("multi-crop")
    g.add_argument("--global-crop-size", type=cli.int_at_least(1), default=None, help="default: 224 (32 on CIFAR)")
    g.add_argument("--local-crop-size", type=cli.int_at_least(1), default=None, help="default: 96 (16 on CIFAR)")
    g.add_argument("--global-crops-scale", type=float, nargs=2, default=None,
                   help="area range of the 2 global crops (default: 0.4 1 for ViT-S/8)")
    g.add_argument("--local-crops-scale", type=float, nargs=2, default=None,
                   help="area range of the local crops (default: 0.05 0.4 for ViT-S/8)")
    g.add_argument("--local-crops-number", type=int, default=None, help="local crops per image (default: 10)")
    g.add_argument("--blur", action=argparse.BooleanOptionalAction, default=None,
                   help="Gaussian blur (default: on; off on 32px CIFAR images)")
    return p


def build_spec(args) -> augment.AugmentSpec:
    mean, std = cli.dataset_stats(args)
    spec = augment.multicrop(args.global_crop_size, args.local_crop_size, args.local_crops_number,
                             tuple(args.global_crops_scale), tuple(args.local_crops_scale), mean, std,
                             asymmetric=True)
    if not args.blur:
        spec = replace(spec, views=tuple(replace(v, blur_p=0.0) for v in spec.views))
    return spec


def build_method(args):
    from fastcl.methods.dino import DINO
    from fastcl.models import build_backbone
    from fastcl.models.backbones import is_vit

    kw = dict(img_size=args.global_crop_size, patch_size=args.patch_size) if is_vit(args.arch) else {}
    student, feat_dim = build_backbone(args.arch, drop_path_rate=args.drop_path, **kw)
    teacher, _ = build_backbone(args.arch, **kw)  # no drop-path in the teacher
    return DINO(student, feat_dim, teacher_backbone=teacher, out_dim=args.out_dim, hidden_dim=args.head_hidden,
                bottleneck_dim=args.bottleneck, norm_last_layer=args.norm_last_layer,
                momentum_teacher=args.momentum_teacher, student_temp=args.student_temp,
                warmup_teacher_temp=args.warmup_teacher_temp, teacher_temp=args.teacher_temp,
                warmup_teacher_temp_epochs=args.warmup_teacher_temp_epochs, center_momentum=args.center_momentum,
                freeze_last_layer=args.freeze_last_layer, clip_grad=args.clip_grad_param)


def main(argv=None, presets=PRESETS, recipe="dino_vits8"):
    args = cli.parse_args(get_args_parser(), presets, argv)
    if args.amp == "fp16" and args.clip_grad_param > 0:
        raise ValueError("--amp fp16 with --clip-grad-param: the per-parameter clip would see loss-scaled "
                         "gradients; use --amp bf16 (default on CUDA) or --clip-grad-param 0 --clip-grad X")
    return cli.run(args, recipe, build_method, build_spec(args), knn_size=args.global_crop_size)


if __name__ == "__main__":
    cli.main_guard(main)
