"""InstDisc, ResNet-50 (Wu et al. 2018, https://arxiv.org/abs/1805.01978).

    python recipes/instdisc_r50.py                               # CIFAR-10, ResNet-18 CIFAR variant
    python recipes/instdisc_r50.py --max-steps 50 --knn-samples 2000     # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/instdisc_r50.py --data /path/to/imagenet   # the paper: 200 ep, batch 256

ImageNet preset = the paper / lemniscate.pytorch main.py: ResNet-50 with a 128-d linear embedding, memory
bank (one L2-normalized slot per image, momentum 0.5), NCE with m=4096 uniform noise samples, T=0.07,
Z estimated once, proximal regularization lambda=30 (--prox-lambda 0 = lemniscate), one view per image
with MoCo v1 / InstDisc augmentation (RRC 0.2-1, grayscale 0.2, jitter 0.4 incl. hue, flip), SGD lr 0.03
x batch/256, momentum 0.9, wd 1e-4, batch 256, 200 epochs, lr x0.1 at epochs 120 and 160.
CIFAR-10 preset (lemniscate cifar.py): ResNet-18 CIFAR variant, T=0.1, wd 5e-4, batch 512, 200 epochs.
The engine passes the batch's dataset indices to the method (``InstDisc.needs_indices``).
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
                     wd=1e-4, clip_grad=0.0, knn_every=0, nce_t=0.07, lr_schedule="step"),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.03, warmup_epochs=0, optimizer="sgd",
                  wd=5e-4, clip_grad=0.0, knn_every=10, nce_t=0.1, lr_schedule="step"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("InstDisc", parents=[cli.base_parser()])
    g = p.add_argument_group("InstDisc")
    g.add_argument("--dim", type=cli.int_at_least(1), default=128, help="embedding / memory-bank dim (default: 128)")
    g.add_argument("--nce-k", type=cli.int_at_least(1), default=4096, help="noise samples per positive (default: 4096)")
    g.add_argument("--nce-t", type=float, default=None, help="temperature (default: 0.07 / CIFAR 0.1)")
    g.add_argument("--bank-momentum", type=float, default=0.5, help="memory-bank update momentum (default: 0.5)")
    g.add_argument("--prox-lambda", type=float, default=30.0,
                   help="proximal regularization weight (default: 30, the paper; 0 = lemniscate.pytorch)")
    g.add_argument("--lr-schedule", default=None, choices=["step", "cos"],
                   help="step: x0.1 at 60%% and 80%% of training (epochs 120/160 of 200); cos: cosine")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def step_lr(peak: float, epochs: int, steps_per_epoch: int, milestones=(0.6, 0.8), gamma=0.1):
    """Per-step lr: ``peak`` times ``gamma`` for every milestone (fraction of training) passed."""
    from fastcl.engine.optim import step_schedule

    return step_schedule(peak, epochs, steps_per_epoch, milestones, gamma)


def train_set_size(args) -> int:
    if args.data == "cifar10":
        return 50_000  # dataset indices of every subset (--train-samples) stay below this
    from fastcl.data.build import num_train_samples

    return num_train_samples(args.data)  # (any --data kind)


def build_method(args):
    from fastcl.methods.instdisc import InstDisc
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    method = InstDisc(backbone, feat_dim, train_set_size(args), dim=args.dim, K=args.nce_k, T=args.nce_t,
                      bank_momentum=args.bank_momentum, prox_lambda=args.prox_lambda)
    if args.lr_schedule == "step":  # the paper's steps replace the engine's cosine
        method.lr_schedule = functools.partial(step_lr, args.lr * args.batch_size / 256)
    return method


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    size = args.crop_size or (32 if args.data == "cifar10" else 224)
    one_view = augment.mocov1(size, mean, std)
    spec = augment.AugmentSpec(one_view.views, (1,))  # InstDisc: a single augmented view per image
    return cli.run(args, "instdisc_r50", build_method, spec)


if __name__ == "__main__":
    cli.main_guard(main)
