"""SimCLR v2, ResNet-50 (Chen et al. 2020, https://arxiv.org/abs/2006.10029).

    python recipes/simclrv2_r50.py                               # CIFAR-10, ResNet-18 CIFAR variant
    python recipes/simclrv2_r50.py --queue-size 4096             # + the MoCo-style memory (momentum encoder)
    torchrun --nproc_per_node=8 --nnodes=4 ... recipes/simclrv2_r50.py --data /path/to/imagenet   # batch 4096

ImageNet preset = the paper's pretraining (Sec. 4, with ResNet-50 instead of ResNet-152 3x SK):
3-layer projection head 2048-2048-2048-128 with BN, NT-Xent T=0.1 with negatives gathered over all
ranks, global BN, SimCLR augmentation, LARS lr 0.1 x sqrt(batch) (= 6.4 at 4096; given here as the
linear-scaling base 0.4 per 256, the same value at batch 4096), wd 1e-4, 10 warm-up epochs then cosine,
batch 4096, 800 epochs. ``--queue-size 65536`` adds the memory: a momentum encoder (m=0.999) whose
outputs are queued as extra negatives (~+1% linear eval in the paper). Fine-tune from the first
projection layer: ``SimCLR.finetune_head()`` (backbone + Linear-BN-ReLU), saved as finetune_head.pth.
"""
import argparse
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=800, batch_size=4096, lr=0.4, warmup_epochs=10, optimizer="lars",
                     wd=1e-4, clip_grad=0.0, knn_every=0, temperature=0.1, jitter_strength=1.0, queue_size=0),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=1.0, warmup_epochs=10, optimizer="lars",
                  wd=1e-6, clip_grad=0.0, knn_every=10, temperature=0.5, jitter_strength=0.5, queue_size=0),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimCLR v2", parents=[cli.base_parser()])
    g = p.add_argument_group("SimCLR v2")
    g.add_argument("--dim", type=cli.int_at_least(1), default=128, help="projection output dim (default: 128)")
    g.add_argument("--hidden-dim", type=int, default=0, help="projection hidden dim (default: 0 = feature dim)")
    g.add_argument("--proj-layers", type=int, default=3, help="projection head depth (default: 3)")
    g.add_argument("--temperature", type=float, default=None, help="NT-Xent temperature (default: 0.1 / CIFAR 0.5)")
    g.add_argument("--jitter-strength", type=cli.float_in(0.0, float("inf")), default=None,
                   help="colour-jitter strength (default: 1.0 / 0.5)")
    g.add_argument("--queue-size", type=int, default=None,
                   help="memory: negatives from a momentum encoder (default: 0 = off; the paper's memory: 65536)")
    g.add_argument("--moco-m", type=float, default=0.999,
                   help="momentum of the memory encoder (default: 0.999)")
    g.add_argument("--crop-size", type=int, default=0, help="view size (default: 0 = 32 on CIFAR-10, 224)")
    return p


def build_method(args):
    from fastcl.methods.simclr import SimCLR
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    return SimCLR(backbone, feat_dim, dim=args.dim, hidden_dim=args.hidden_dim or None,
                  proj_layers=args.proj_layers, T=args.temperature, queue_size=args.queue_size, m=args.moco_m)


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    cifar = args.data == "cifar10"
    size = args.crop_size or (32 if cifar else 224)
    spec = augment.simclr(size, mean, std, strength=args.jitter_strength, blur_p=0.0 if cifar else 0.5)
    built = {}

    def build(a):
        built["method"] = build_method(a)
        return built["method"]

    result = cli.run(args, "simclrv2_r50", build, spec)
    if int(os.environ.get("RANK", "0")) == 0:  # the fine-tuning network: backbone + first projection layer
        import torch

        out = args.out or os.path.join("runs", "simclrv2_r50")
        torch.save({"finetune_head": built["method"].finetune_head().state_dict(), "arch": args.arch},
                   os.path.join(out, "finetune_head.pth"))
    return result


if __name__ == "__main__":
    cli.main_guard(main)
