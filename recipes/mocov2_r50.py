"""MoCo v2, ResNet-50 (Chen et al. 2020, https://arxiv.org/abs/2003.04297).

    torchrun recipes/mocov2_r50.py                              # CIFAR-10, ResNet-18 CIFAR variant
    torchrun recipes/mocov2_r50.py --max-steps 50 --knn-samples 2000   # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/mocov2_r50.py --data /path/to/imagenet   # the paper: 200 ep, 8 GPUs

ImageNet preset = the paper: ResNet-50, MLP head 2048-2048-128, K=65,536, m=0.999, T=0.2, aug+,
SGD lr 0.03 x batch/256, momentum 0.9, wd 1e-4, cosine, 200 epochs, batch 256.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=200, batch_size=256, lr=0.03, warmup_epochs=0, optimizer="sgd",
                     wd=1e-4, clip_grad=0.0, knn_every=0, queue_size=65536, bn_splits=8, crop_size=224,
                     moco_m=0.999, moco_t=0.2),
    # MoCo's CIFAR demo: ResNet-18 (3x3 stem), K=4096, m=0.99, T=0.1, lr 0.06 at batch 512, wd 5e-4, split BN 8,
    # no blur on 32x32 images
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.03, warmup_epochs=0,
                  optimizer="sgd", wd=5e-4, clip_grad=0.0, knn_every=10, queue_size=4096, bn_splits=8, crop_size=32,
                  moco_m=0.99, moco_t=0.1),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MoCo v2", parents=[cli.base_parser()])
    g = p.add_argument_group("MoCo")
    g.add_argument("--dim", type=cli.int_at_least(1), default=128, help="embedding dim (default: 128)")
    g.add_argument("--queue-size", type=cli.int_at_least(1), default=None,
                   help="K, number of negative keys (default: 65536; CIFAR 4096)")
    g.add_argument("--moco-m", type=float, default=None, help="key-encoder momentum (default: 0.999; CIFAR 0.99)")
    g.add_argument("--moco-t", type=float, default=None, help="softmax temperature (default: 0.2; CIFAR 0.1)")
    g.add_argument("--bn-splits", type=cli.int_at_least(1), default=None,
                   help="split-BN sub-batches on a single device (shuffle-BN stand-in; DDP shuffles instead)")
    g.add_argument("--symmetric", action="store_true", help="symmetric loss (MoCo CIFAR demo option)")
    g.add_argument("--crop-size", type=cli.int_at_least(1), default=None,
                   help="view size (default: 224 / 32 on CIFAR-10)")
    return p


def build_method(args):
    from fastcl.engine.distributed import get_world_size
    from fastcl.methods.moco import MoCo
    from fastcl.models import build_backbone

    if args.bn_splits > 1 and get_world_size() == 1 and args.batch_size % args.bn_splits:  # (DDP: shuffle BN)
        raise ValueError(f"--batch-size {args.batch_size} does not split into --bn-splits {args.bn_splits} equal "
                         f"sub-batches (split BN on one device): use a multiple of {args.bn_splits} or --bn-splits 1")
    backbone, feat_dim = build_backbone(args.arch)
    return MoCo(backbone, feat_dim, dim=args.dim, K=args.queue_size, m=args.moco_m, T=args.moco_t, mlp=True,
                bn_splits=args.bn_splits, symmetric=args.symmetric)


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    spec = augment.mocov2_aug_plus(args.crop_size, mean, std, blur_p=0.0 if args.data == "cifar10" else 0.5)
    return cli.run(args, "mocov2_r50", build_method, spec)


if __name__ == "__main__":
    cli.main_guard(main)
