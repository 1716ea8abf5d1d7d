"""MoCo v3, ResNet-50 (Chen et al. 2021, https://arxiv.org/abs/2104.02057).

    python recipes/mocov3_r50.py                                 # CIFAR-10, ResNet-18 CIFAR variant
    python recipes/mocov3_r50.py --max-steps 50 --knn-samples 2000       # a quick try on a CPU
    torchrun --nproc_per_node=8 --nnodes=2 ... recipes/mocov3_r50.py --data /path/to/imagenet     # batch 4096

ImageNet preset = moco-v3 CONFIG.md (ResNet-50, 300 epochs): 2-layer projector (2048-4096-256, as the
official code for ResNets; --proj-layers 3 for the paper's text) and 2-layer predictor (4096 hidden, BN),
T=1.0, momentum 0.99 -> 1 (cosine), BYOL augmentation with crop 0.2-1, global BN, LARS lr 0.3 x batch/256,
wd 1e-6 (no decay/LARS on BN and biases), 10 warm-up epochs then cosine, batch 4096.
CIFAR-10 preset: ResNet-18 CIFAR variant, hidden 2048, T=0.2, batch 512, LARS lr 0.3, 200 epochs, no blur
(an untuned starting point).
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=300, batch_size=4096, lr=0.3, warmup_epochs=10, optimizer="lars",
                     wd=1e-6, clip_grad=0.0, knn_every=0, mlp_dim=4096, moco_t=1.0),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.3, warmup_epochs=10, optimizer="lars",
                  wd=1e-6, clip_grad=0.0, knn_every=10, mlp_dim=2048, moco_t=0.2),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MoCo v3 (ResNet)", parents=[cli.base_parser()])
    g = p.add_argument_group("MoCo v3")
    g.add_argument("--dim", type=cli.int_at_least(1), default=256, help="projector/predictor output dim (default: 256)")
    g.add_argument("--mlp-dim", type=cli.int_at_least(1), default=None,
                   help="projector/predictor hidden dim (default: 4096; CIFAR 2048)")
    g.add_argument("--proj-layers", type=int, default=2, help="projector depth (default: 2, the official code)")
    g.add_argument("--moco-t", type=float, default=None, help="softmax temperature (default: 1.0 / CIFAR 0.2)")
    g.add_argument("--moco-m", type=float, default=0.99, help="start momentum, cosine to --moco-m-end (default: 0.99)")
    g.add_argument("--moco-m-end", type=float, default=1.0, help="final momentum (default: 1.0; = --moco-m: constant)")
    g.add_argument("--crop-min", type=float, default=0.2, help="RandomResizedCrop min scale (default: 0.2)")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def build_method(args):
    from fastcl.methods.mocov3 import MoCoV3
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    return MoCoV3(backbone, feat_dim, dim=args.dim, mlp_dim=args.mlp_dim, proj_layers=args.proj_layers,
                  T=args.moco_t, m=args.moco_m, m_end=args.moco_m_end, decay_all=False)


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    cifar = args.data == "cifar10"
    spec = augment.byol(args.crop_size or (32 if cifar else 224), mean, std)
    views = tuple(replace(v, scale=(args.crop_min, 1.0), blur_p=0.0 if cifar else v.blur_p) for v in spec.views)
    return cli.run(args, "mocov3_r50", build_method, replace(spec, views=views))


if __name__ == "__main__":
    cli.main_guard(main)
