"""InvaSpread, ResNet-18 (Ye et al. 2019, https://arxiv.org/abs/1904.03436).

    python recipes/invaspread_r18.py                             # CIFAR-10, ResNet-18 CIFAR variant
    python recipes/invaspread_r18.py --max-steps 50 --knn-samples 2000   # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/invaspread_r18.py --data /path/to/imagenet   # batch 256, 200 epochs

Settings of the paper / official code (mangye16/Unsupervised_Embedding_Learning, CIFAR-10): one shared
ResNet-18 on both augmented views (one forward over the 2m images), 128-d linear embedding with L2
normalization, instance-spread loss with T=0.1 over the batch, augmentation RRC 0.2-1, jitter 0.4 incl.
hue 0.4, grayscale 0.2, flip (= MoCo v1's), SGD lr 0.03 (at batch 128; here x batch/256 from base 0.06),
momentum 0.9, wd 5e-4, lr x0.1 at 60% of training (epoch 120 of 200; the official code's effective
schedule). ImageNet preset: the same with the torchvision ResNet-18 at 224 px, batch 256, 200 epochs
(the paper has no ImageNet run). CIFAR-10 preset: ResNet-18 CIFAR variant, batch 512, 200 epochs.
"""
import argparse
import functools
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet18", epochs=200, batch_size=256, lr=0.06, warmup_epochs=0, optimizer="sgd",
                     wd=5e-4, clip_grad=0.0, knn_every=0, lr_schedule="step"),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.06, warmup_epochs=0, optimizer="sgd",
                  wd=5e-4, clip_grad=0.0, knn_every=10, lr_schedule="step"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("InvaSpread", parents=[cli.base_parser()])
    g = p.add_argument_group("InvaSpread")
    g.add_argument("--dim", type=cli.int_at_least(1), default=128, help="embedding dim (default: 128)")
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature (default: 0.1)")
    g.add_argument("--grad-keys", action="store_true",
                   help="let gradients flow through the keys too (default: detached, as the official code)")
    g.add_argument("--lr-schedule", default=None, choices=["step", "cos"],
                   help="step: x0.1 at 60%% of training; cos: the engine's cosine")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def step_lr(peak: float, epochs: int, steps_per_epoch: int, milestones=(0.6,), gamma=0.1):
    """Per-step lr: ``peak`` times ``gamma`` for every milestone (fraction of training) passed."""
    from fastcl.engine.optim import step_schedule

    return step_schedule(peak, epochs, steps_per_epoch, milestones, gamma)


def build_method(args):
    from fastcl.methods.invaspread import InvaSpread
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    method = InvaSpread(backbone, feat_dim, dim=args.dim, T=args.temperature, stop_grad_keys=not args.grad_keys)
    if args.lr_schedule == "step":  # the paper's step replaces the engine's cosine
        method.lr_schedule = functools.partial(step_lr, args.lr * args.batch_size / 256)
    return method


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    size = args.crop_size or (32 if args.data == "cifar10" else 224)
    return cli.run(args, "invaspread_r18", build_method, augment.mocov1(size, mean, std))


if __name__ == "__main__":
    cli.main_guard(main)
