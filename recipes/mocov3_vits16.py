"""MoCo v3, ViT-S/16 (Chen et al. 2021, https://arxiv.org/abs/2104.02057).

    python recipes/mocov3_vits16.py                              # CIFAR-10, ViT-S with 4x4 patches on 32x32
    python recipes/mocov3_vits16.py --max-steps 50 --knn-samples 2000    # a quick try on a CPU
    torchrun --nproc_per_node=8 --nnodes=4 ... recipes/mocov3_vits16.py --data /path/to/imagenet    # batch 4096
    (ViT-B/16 and ViT-L/16: recipes/mocov3_vitb16.py, recipes/mocov3_vitl16.py, with this file's code)

ImageNet preset = the paper / moco-v3 CONFIG.md: ViT-S/16 (12 heads, as moco-v3's vit_small), patch
projection frozen at its random init, fixed 2-D sin-cos position embedding, 3-layer projector and
2-layer predictor (4096 hidden, 256 out, BN), T=0.2, momentum 0.99 -> 1 (cosine), BYOL augmentation
(crop 0.08-1), AdamW lr 1.5e-4 x batch/256, wd 0.1 (on every parameter), 40 warm-up epochs then cosine,
batch 4096, 300 epochs.
CIFAR-10 preset: the same ViT-S with 4x4 patches on 32x32 crops (64 tokens), hidden 2048, batch 512,
200 epochs, 20 warm-up epochs, no blur (an untuned starting point).
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="vit_small_patch16_224", epochs=300, batch_size=4096, lr=1.5e-4, warmup_epochs=40,
                     optimizer="adamw", wd=0.1, clip_grad=0.0, knn_every=0, patch_size=16, mlp_dim=4096, num_heads=12),
    "cifar": dict(arch="vit_small_patch16_224", epochs=200, batch_size=512, lr=1.5e-4, warmup_epochs=20,
                  optimizer="adamw", wd=0.1, clip_grad=0.0, knn_every=10, patch_size=4, mlp_dim=2048, num_heads=12),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MoCo v3 (ViT)", parents=[cli.base_parser()])
    g = p.add_argument_group("MoCo v3")
    g.add_argument("--dim", type=cli.int_at_least(1), default=256, help="projector/predictor output dim (default: 256)")
    g.add_argument("--mlp-dim", type=cli.int_at_least(1), default=None,
                   help="projector/predictor hidden dim (default: 4096; CIFAR 2048)")
    g.add_argument("--proj-layers", type=int, default=3, help="projector depth (default: 3)")
    g.add_argument("--moco-t", type=float, default=0.2, help="softmax temperature (default: 0.2)")
    g.add_argument("--moco-m", type=float, default=0.99, help="start momentum, cosine to --moco-m-end (default: 0.99)")
    g.add_argument("--moco-m-end", type=float, default=1.0, help="final momentum (default: 1.0; = --moco-m: constant)")
    g.add_argument("--patch-size", type=cli.int_at_least(1), default=None,
                   help="ViT patch size (default: 16 / CIFAR 4)")
    g.add_argument("--num-heads", type=cli.int_at_least(1), default=None,
                   help="attention heads (moco-v3's ViT-S has 12, timm's 6)")
    g.add_argument("--drop-path", type=cli.float_in(0.0, 1.0), default=0.0, help="stochastic depth (default: 0)")
    g.add_argument("--crop-min", type=float, default=0.08, help="RandomResizedCrop min scale (default: 0.08)")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def build_method(args):
    from fastcl.methods.mocov3 import MoCoV3, vit_init_
    from fastcl.models import build_backbone

    size = args.crop_size or (32 if args.data == "cifar10" else 224)
    backbone, feat_dim = build_backbone(args.arch, img_size=size, drop_path_rate=args.drop_path,
                                        patch_size=args.patch_size, num_heads=args.num_heads)
    return MoCoV3(vit_init_(backbone), feat_dim, dim=args.dim, mlp_dim=args.mlp_dim, proj_layers=args.proj_layers,
                  T=args.moco_t, m=args.moco_m, m_end=args.moco_m_end, decay_all=True)


def main(argv=None, presets=PRESETS, recipe="mocov3_vits16"):
    args = cli.parse_args(get_args_parser(), presets, argv)
    mean, std = cli.dataset_stats(args)
    cifar = args.data == "cifar10"
    spec = augment.byol(args.crop_size or (32 if cifar else 224), mean, std)
    views = tuple(replace(v, scale=(args.crop_min, 1.0), blur_p=0.0 if cifar else v.blur_p) for v in spec.views)
    return cli.run(args, recipe, build_method, replace(spec, views=views))


if __name__ == "__main__":
    cli.main_guard(main)
