"""SimCLR v1, ResNet-50 (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    python recipes/simclr_r50.py                                 # CIFAR-10, ResNet-18 CIFAR variant
    python recipes/simclr_r50.py --max-steps 50 --knn-samples 2000       # a quick try on a CPU
    torchrun --nproc_per_node=8 --nnodes=4 ... recipes/simclr_r50.py --data /path/to/imagenet   # batch 4096

ImageNet preset = the paper (Sec. 2.2, B.1): ResNet-50, projection head 2048-2048-128 with BN, NT-Xent
with 2N-2 negatives gathered over all ranks, T=0.1, global (Sync) BN, SimCLR augmentation (RRC 0.08-1,
jitter strength 1.0 p=0.8, grayscale 0.2, blur p=0.5, flip), LARS lr 0.3 x batch/256, momentum 0.9,
wd 1e-6 (no decay/LARS on BN and biases), 10 warm-up epochs then cosine, batch 4096, 100 epochs
(the paper's ablation length; its best model uses --epochs 1000).
CIFAR-10 preset (paper B.9): ResNet-18 CIFAR variant, T=0.5, jitter strength 0.5, no blur, batch 512,
LARS lr 1.0 x batch/256, 200 epochs.
cifar_fast preset (``--preset cifar_fast``): the settings of the fastest public 90 % CIFAR-10 kNN run,
dkobak/simclr-cifar10 (ResNet-18 CIFAR variant, 90.4 % kNN k=10 after 1000 epochs on an A100): batch 1024,
plain SGD lr 0.03 x batch/256 (momentum 0.9, cosine, no warm-up), wd 5e-4, projector 512-1024-128, RRC
scale 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, no blur, T=0.5. Kept from fastcl: BN in the
projector and no weight decay on biases and norms (the reference has no projector BN and decays every
parameter), and 200 epochs (the reference trains 1000: pass --epochs). Not yet run on a GPU.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=100, batch_size=4096, lr=0.3, warmup_epochs=10, optimizer="lars",
                     wd=1e-6, clip_grad=0.0, knn_every=0, temperature=0.1, jitter_strength=1.0),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=1.0, warmup_epochs=10, optimizer="lars",
                  wd=1e-6, clip_grad=0.0, knn_every=10, temperature=0.5, jitter_strength=0.5),
    "cifar_fast": dict(arch="resnet18_cifar", epochs=200, batch_size=1024, lr=0.03, warmup_epochs=0,
                       optimizer="sgd", wd=5e-4, clip_grad=0.0, knn_every=10, temperature=0.5, jitter_strength=0.5,
                       hidden_dim=1024, crop_min=0.2),
}
for _p in PRESETS.values():  # the paper's projector width (= the feature dim) and crops unless a preset says
    _p.setdefault("hidden_dim", 0)
    _p.setdefault("crop_min", 0.08)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimCLR", parents=[cli.base_parser()])
    g = p.add_argument_group("SimCLR")
    g.add_argument("--dim", type=cli.int_at_least(1), default=128, help="projection output dim (default: 128)")
    g.add_argument("--hidden-dim", type=int, default=None, help="projection hidden dim, 0 = the feature dim")
    g.add_argument("--crop-min", type=float, default=None, help="smallest area of a random resized crop")
    g.add_argument("--temperature", type=float, default=None,
                   help="NT-Xent temperature (default: 0.1 ImageNet / 0.5 CIFAR; small batches want 0.5)")
    g.add_argument("--jitter-strength", type=cli.float_in(0.0, float("inf")), default=None,
                   help="colour-jitter strength s (default: 1.0 ImageNet / 0.5 CIFAR)")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def build_method(args):
    from fastcl.methods.simclr import SimCLR
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    return SimCLR(backbone, feat_dim, dim=args.dim, hidden_dim=args.hidden_dim or None, proj_layers=2,
                  T=args.temperature)


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    cifar = args.data == "cifar10"
    size = args.crop_size or (32 if cifar else 224)
    spec = augment.simclr(size, mean, std, strength=args.jitter_strength, blur_p=0.0 if cifar else 0.5,
                          scale=(args.crop_min, 1.0))
    return cli.run(args, "simclr_r50", build_method, spec)


if __name__ == "__main__":
    cli.main_guard(main)
