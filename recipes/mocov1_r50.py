"""MoCo v1, ResNet-50 (He et al. 2020, https://arxiv.org/abs/1911.05722).

    python recipes/mocov1_r50.py                                 # CIFAR-10, ResNet-18 CIFAR variant
    python recipes/mocov1_r50.py --max-steps 50 --knn-samples 2000     # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/mocov1_r50.py --data /path/to/imagenet   # the paper: 200 ep, 8 GPUs

ImageNet preset = the paper (Sec. 4 / facebookresearch/moco defaults): ResNet-50, linear 128-d head
(no MLP), K=65,536, m=0.999, T=0.07, shuffle BN, MoCo v1 augmentation (RRC 0.2-1, jitter 0.4 incl.
hue 0.4, grayscale 0.2, flip, no blur), SGD lr 0.03 x batch/256, momentum 0.9, wd 1e-4, batch 256,
200 epochs, lr x0.1 at epochs 120 and 160 (``--lr-schedule step``; ``cos`` is MoCo v2's cosine).
"""
import argparse
import functools
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, warmup_epochs=0, optimizer="sgd",
                     wd=1e-4, clip_grad=0.0, knn_every=0, queue_size=65536, bn_splits=8, lr_schedule="step"),
    # MoCo's CIFAR demo setting: ResNet-18 (3x3 stem), K=4096, split BN 8, wd 5e-4, 32x32 crops
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.03, warmup_epochs=0,
                  optimizer="sgd", wd=5e-4, clip_grad=0.0, knn_every=10, queue_size=4096, bn_splits=8,
                  lr_schedule="step"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MoCo v1", parents=[cli.base_parser()])
    g = p.add_argument_group("MoCo v1")
    g.add_argument("--dim", type=cli.int_at_least(1), default=128,
                   help="embedding dim of the linear head (default: 128)")
    g.add_argument("--queue-size", type=cli.int_at_least(1), default=None,
                   help="K, number of negative keys (default: 65536; CIFAR 4096)")
    g.add_argument("--moco-m", type=float, default=0.999, help="key-encoder momentum (default: 0.999)")
    g.add_argument("--moco-t", type=float, default=0.07, help="softmax temperature (default: 0.07)")
    g.add_argument("--bn-splits", type=cli.int_at_least(1), default=None,
                   help="split-BN sub-batches on a single device (shuffle-BN stand-in; DDP shuffles instead)")
    g.add_argument("--lr-schedule", default=None, choices=["step", "cos"],
                   help="step: x0.1 at 60%% and 80%% of training (epochs 120/160 of 200, the paper); "
                        "cos: the engine's cosine (default: step)")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def step_lr(peak: float, epochs: int, steps_per_epoch: int, milestones=(0.6, 0.8), gamma=0.1):
    """Per-step lr: ``peak`` times ``gamma`` for every milestone (fraction of training) passed."""
    from fastcl.engine.optim import step_schedule

    return step_schedule(peak, epochs, steps_per_epoch, milestones, gamma)


def build_method(args):
    from fastcl.engine.distributed import get_world_size
    from fastcl.methods.moco import MoCo
    from fastcl.models import build_backbone

    if args.bn_splits > 1 and get_world_size() == 1 and args.batch_size % args.bn_splits:  # (DDP: shuffle BN)
        raise ValueError(f"--batch-size {args.batch_size} does not split into --bn-splits {args.bn_splits} equal "
                         f"sub-batches (split BN on one device): use a multiple of {args.bn_splits} or --bn-splits 1")
    backbone, feat_dim = build_backbone(args.arch)
    method = MoCo(backbone, feat_dim, dim=args.dim, K=args.queue_size, m=args.moco_m, T=args.moco_t, mlp=False,
                  bn_splits=args.bn_splits)  # MoCo v1: a linear head
    if args.lr_schedule == "step":  # the paper's steps replace the engine's cosine
        method.lr_schedule = functools.partial(step_lr, args.lr * args.batch_size / 256)
    return method


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    size = args.crop_size or (32 if args.data == "cifar10" else 224)
    return cli.run(args, "mocov1_r50", build_method, augment.mocov1(size, mean, std))


if __name__ == "__main__":
    cli.main_guard(main)
