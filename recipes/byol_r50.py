"""BYOL, ResNet-50 (Grill et al. 2020, https://arxiv.org/abs/2006.07733).

    torchrun recipes/byol_r50.py                                # CIFAR-10, ResNet-18 CIFAR variant
    torchrun recipes/byol_r50.py --max-steps 50 --knn-samples 2000     # a quick try on a CPU
    torchrun --nnodes=8 --nproc_per_node=8 recipes/byol_r50.py --data /path/to/imagenet   # the paper: batch 4096

ImageNet preset = the paper: ResNet-50, projector and predictor MLPs 4096 (BN, ReLU) -> 256, target
momentum τ 0.996 -> 1 (cosine), LARS lr 0.2 x batch/256 (biases and BN excluded from LARS and decay),
wd 1.5e-6, 10 warm-up epochs, cosine, 1000 epochs, batch 4096, asymmetric views (blur 1.0 / 0.1,
solarize 0 / 0.2), synchronized BN across processes.

CIFAR preset: ResNet-18 (3x3 stem), 32x32 views without blur (solarize kept), τ 0.99 -> 1, SGD lr
0.12 x batch/256, wd 5e-4, batch 512, 200 epochs (the lightly CIFAR-10 benchmark settings: 0.06 x batch/128).
"""
import argparse
import dataclasses
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=1000, batch_size=4096, lr=0.2, warmup_epochs=10, optimizer="lars",
                     wd=1.5e-6, clip_grad=0.0, knn_every=0, tau=0.996, crop_size=224, blur=True),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.12, warmup_epochs=0, optimizer="sgd",
                  wd=5e-4, clip_grad=0.0, knn_every=10, tau=0.99, crop_size=32, blur=False),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("BYOL", parents=[cli.base_parser()])
    g = p.add_argument_group("BYOL")
    g.add_argument("--proj-hidden", type=cli.int_at_least(1), default=4096,
                   help="projector hidden width (default: 4096)")
    g.add_argument("--pred-hidden", type=cli.int_at_least(1), default=4096,
                   help="predictor hidden width (default: 4096)")
    g.add_argument("--dim", type=cli.int_at_least(1), default=256, help="projection size (default: 256)")
    g.add_argument("--tau", type=float, default=None,
                   help="base target momentum, raised to 1 by a cosine (default: 0.996 / 0.99 on CIFAR-10; "
                        "lower it, e.g. 0.99, for short runs or small batches)")
    g.add_argument("--crop-size", type=cli.int_at_least(1), default=None,
                   help="view size (default: 224 / 32 on CIFAR-10)")
    g.add_argument("--blur", type=int, default=None, choices=[0, 1],
                   help="Gaussian blur in the views (default: 1 / 0 on 32x32 CIFAR-10)")
    g.add_argument("--no-sync-bn", action="store_true",
                   help="keep per-process BN statistics under multi-GPU DDP (default: synchronized BN)")
    return p


def build_method(args):
    import torch
    from fastcl.methods.byol import BYOL
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    method = BYOL(backbone, feat_dim, proj_hidden=args.proj_hidden, dim=args.dim, pred_hidden=args.pred_hidden,
                  tau=args.tau)
    if torch.distributed.is_initialized() and torch.cuda.is_available() and not args.no_sync_bn:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # keeps the Parameter objects (EMA lists)
    return method


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    spec = augment.byol(args.crop_size, mean, std)
    if not args.blur:  # no blur on 32x32 images; solarization (0 / 0.2) stays
        spec = dataclasses.replace(spec, views=tuple(dataclasses.replace(v, blur_p=0.0) for v in spec.views))
    return cli.run(args, "byol_r50", build_method, spec)


if __name__ == "__main__":
    cli.main_guard(main)
