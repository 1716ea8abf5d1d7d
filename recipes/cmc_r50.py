"""CMC, two half-width ResNet-50s on L and ab (Tian et al. 2019, https://arxiv.org/abs/1906.05849).

    python recipes/cmc_r50.py                                   # CIFAR-10, half-width ResNet-18 CIFAR variants
    python recipes/cmc_r50.py --max-steps 50 --knn-samples 2000         # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/cmc_r50.py --data /path/to/imagenet   # ImageNet (HobbitLong/CMC settings)

ImageNet preset = HobbitLong/CMC train_CMC.py with ``--model resnet50 --batch_size 128 --crop_low 0.08``
(ResNetV1: one half-width ResNet-50 per view, 1024-d each, 2048-d concatenated representation): L / ab of
Lab as the views, 128-d embeddings, memory banks (momentum 0.5) with K=4096 negatives, softmax InfoNCE
T=0.07 both ways, augmentation RandomResizedCrop(224, scale 0.08-1) + flip only (color is the view),
SGD lr 0.03 at batch 128 (train_CMC.py does not scale it; here 0.06 x batch/256), momentum 0.9, wd 1e-4, 400 epochs, lr x0.1 at epochs 250, 300 and 350.
CIFAR-10 preset: half-width ResNet-18s with the 3x3 stem, crops 32px (scale 0.2-1), batch 512, 200 epochs,
lr x0.1 at the same fractions of training, wd 5e-4, kNN on the concatenated features every 10 epochs.
"""
import argparse
import functools
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=400, batch_size=128, lr=0.06, warmup_epochs=0, optimizer="sgd",
                     wd=1e-4, clip_grad=0.0, knn_every=0, crop_size=224, crop_scale=(0.08, 1.0)),
    "cifar": dict(arch="resnet18", epochs=200, batch_size=512, lr=0.03, warmup_epochs=0, optimizer="sgd",
                  wd=5e-4, clip_grad=0.0, knn_every=10, crop_size=32, crop_scale=(0.2, 1.0)),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CMC", parents=[cli.base_parser()])
    g = p.add_argument_group("CMC")
    g.add_argument("--feat-dim", type=cli.int_at_least(1), default=128,
                   help="embedding / memory-bank dim (default: 128)")
    g.add_argument("--nce-k", type=cli.int_at_least(1), default=4096, help="negatives per anchor (default: 4096)")
    g.add_argument("--nce-t", type=float, default=0.07, help="temperature (default: 0.07)")
    g.add_argument("--nce-m", type=float, default=0.5, help="memory-bank update momentum (default: 0.5)")
    g.add_argument("--crop-size", type=cli.int_at_least(1), default=None, help="crop size (default: 224, 32 on CIFAR)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None,
                   help="RandomResizedCrop area range (default: 0.08 1, 0.2 1 on CIFAR)")
    g.add_argument("--lr-decay-fracs", type=cli.float_in(0.0, 1.0, low_open=True),
                   nargs="*", default=(0.625, 0.75, 0.875),
                   help="lr x0.1 at these fractions of training (default: 250, 300, 350 of 400 epochs); "
                        "none = cosine")
    return p


def step_lr(peak: float, epochs: int, steps_per_epoch: int, milestones, gamma=0.1):
    """Per-step lr: ``peak`` times ``gamma`` for every milestone (fraction of training) passed."""
    from fastcl.engine.optim import step_schedule

    return step_schedule(peak, epochs, steps_per_epoch, milestones, gamma)


def train_set_size(args) -> int:
    if args.data == "cifar10":
        return 50_000  # indices of a --train-samples subset stay below this
    from fastcl.data.build import num_train_samples

    return num_train_samples(args.data)  # (any --data kind)


def build_method(args):
    from fastcl.methods.cmc import CMC, half_width_resnet

    depth = int(args.arch.removeprefix("resnet"))
    cifar = args.crop_size <= 64
    enc_l, d = half_width_resnet(depth, 1, cifar_stem=cifar)
    enc_ab, _ = half_width_resnet(depth, 2, cifar_stem=cifar)
    mean, std = cli.dataset_stats(args)
    method = CMC(enc_l, enc_ab, d, train_set_size(args), mean, std, dim=args.feat_dim, K=args.nce_k, T=args.nce_t,
                 bank_momentum=args.nce_m)
    if args.lr_decay_fracs:  # CMC's steps replace the engine's cosine
        method.lr_schedule = functools.partial(step_lr, args.lr * args.batch_size / 256,
                                               milestones=tuple(args.lr_decay_fracs))
    return method


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    view = augment.ViewSpec(size=args.crop_size, scale=tuple(args.crop_scale), jitter_p=0.0, grayscale_p=0.0,
                            blur_p=0.0, mean=tuple(mean), std=tuple(std))  # crop + flip: color is the view
    return cli.run(args, "cmc_r50", build_method, augment.AugmentSpec((view,), (1,)))


if __name__ == "__main__":
    cli.main_guard(main)
