"""SimSiam, ResNet-50 (Chen & He 2021, https://arxiv.org/abs/2011.10566).

    torchrun recipes/simsiam_r50.py                             # CIFAR-10, ResNet-18 CIFAR variant
    torchrun recipes/simsiam_r50.py --max-steps 50 --knn-samples 2000  # a quick try on a CPU
    torchrun --nproc_per_node=8 recipes/simsiam_r50.py --data /path/to/imagenet   # the paper: 100 ep, 8 GPUs

ImageNet preset = the paper: ResNet-50 (zero-initialized last BN of each residual block), 3-layer
projector 2048 with BN on every layer (output BN without affine), predictor 2048-512-2048, SGD lr
0.05 x batch/256 (= 0.1 at batch 512), momentum 0.9, wd 1e-4 on all parameters, cosine, predictor at a
fixed lr, batch 512, 100 epochs, MoCo v2 augmentation, synchronized BN across processes.

CIFAR preset (the paper's appendix D): ResNet-18 (3x3 stem), 2-layer projector, lr 0.03 x batch/256,
wd 5e-4, batch 512, 200 epochs (the paper: 800), 32x32 views without blur.
"""
import argparse
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=100, batch_size=512, lr=0.05, warmup_epochs=0, optimizer="sgd",
                     wd=1e-4, clip_grad=0.0, knn_every=0, proj_layers=3, crop_size=224, blur=True),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.03, warmup_epochs=0, optimizer="sgd",
                  wd=5e-4, clip_grad=0.0, knn_every=10, proj_layers=2, crop_size=32, blur=False),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimSiam", parents=[cli.base_parser()])
    g = p.add_argument_group("SimSiam")
    g.add_argument("--dim", type=cli.int_at_least(1), default=2048, help="projection size d (default: 2048)")
    g.add_argument("--proj-hidden", type=cli.int_at_least(1), default=2048,
                   help="projector hidden width (default: 2048)")
    g.add_argument("--pred-hidden", type=cli.int_at_least(1), default=512,
                   help="predictor bottleneck (default: 512; the paper finds the bottleneck helps)")
    g.add_argument("--proj-layers", type=int, default=None, help="projector fc layers (default: 3 / 2 on CIFAR-10)")
    g.add_argument("--no-fix-pred-lr", action="store_true",
                   help="decay the predictor's lr with the rest (default: fixed, as in the paper)")
    g.add_argument("--crop-size", type=cli.int_at_least(1), default=None,
                   help="view size (default: 224 / 32 on CIFAR-10)")
    g.add_argument("--blur", type=int, default=None, choices=[0, 1],
                   help="Gaussian blur p=0.5 in the views (default: 1 / 0 on 32x32 CIFAR-10)")
    g.add_argument("--no-sync-bn", action="store_true",
                   help="keep per-process BN statistics under multi-GPU DDP (default: synchronized BN)")
    return p


def build_method(args):
    import torch
    from fastcl.methods.simsiam import SimSiam
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch, zero_init_residual=True)
    method = SimSiam(backbone, feat_dim, dim=args.dim, proj_hidden=args.proj_hidden, pred_hidden=args.pred_hidden,
                     proj_layers=args.proj_layers, fix_pred_lr=not args.no_fix_pred_lr)
    if torch.distributed.is_initialized() and torch.cuda.is_available() and not args.no_sync_bn:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return method


def main(argv=None):
    args = cli.parse_args(get_args_parser(), PRESETS, argv)
    mean, std = cli.dataset_stats(args)
    spec = augment.mocov2_aug_plus(args.crop_size, mean, std, blur_p=0.5 if args.blur else 0.0)
    return cli.run(args, "simsiam_r50", build_method, spec)


if __name__ == "__main__":
    cli.main_guard(main)
