"""SwAV, ResNet-50 (Caron et al. 2020, https://arxiv.org/abs/2006.09882).

    torchrun recipes/swav_r50.py                                # CIFAR-10, ResNet-18 CIFAR variant
    torchrun recipes/swav_r50.py --max-steps 50 --knn-samples 2000     # a quick try on a CPU
    torchrun --nnodes=8 --nproc_per_node=8 recipes/swav_r50.py --data /path/to/imagenet   # the paper: batch 4096
    torchrun --nproc_per_node=4 recipes/swav_r50.py --data /path/to/imagenet --batch-size 256 --lr 0.6 \\
        --min-lr 0.0006 --warmup-epochs 0 --epochs 200 --queue-length 3840    # the repo's batch-256 run

ImageNet preset = the paper's 800-epoch run (scripts/swav_800ep_pretrain.sh): ResNet-50, projector
2048-2048-128, 3,000 prototypes, multi-crop 2x224 (scale 0.14-1) + 6x96 (scale 0.05-0.14), τ 0.1,
Sinkhorn ε 0.05 x 3 iterations, LARS lr 0.3 x batch/256 (= 4.8 at 4096) cosine to 0.0048, 10 warm-up
epochs, wd 1e-6 on all parameters, prototypes frozen for the first epoch, no queue at batch 4096,
synchronized BN across processes.

CIFAR preset: ResNet-18 (3x3 stem), 2x32 + 6x16 crops without blur, LARS lr 0.6 x batch/256 cosine to
lr/1000, no warm-up, a 3,840 queue from epoch 15 (the repo's small-batch settings), batch 512, 200 epochs.
"""
import argparse
import dataclasses
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from fastcl import cli  # noqa: E402
from fastcl.data import augment  # noqa: E402

PRESETS = {
    "imagenet": dict(arch="resnet50", epochs=800, batch_size=4096, lr=0.3, min_lr=0.0048, warmup_epochs=10,
                     optimizer="lars", wd=1e-6, clip_grad=0.0, knn_every=0, queue_length=0, crop_size=224,
                     local_crop_size=96, n_local=6, blur=True, hidden=2048, dim=128, proj_layers=2, proj_bn=True,
                     n_prototypes=3000, epsilon=0.05, sinkhorn_iters=3, freeze_prototypes_epochs=1.0),
    "cifar": dict(arch="resnet18_cifar", epochs=200, batch_size=512, lr=0.6, min_lr=0.0012, warmup_epochs=0,
                  optimizer="lars", wd=1e-6, clip_grad=0.0, knn_every=10, queue_length=3840, crop_size=32,
                  local_crop_size=16, n_local=6, blur=False, hidden=2048, dim=128, proj_layers=2, proj_bn=True,
                  n_prototypes=3000, epsilon=0.05, sinkhorn_iters=3, freeze_prototypes_epochs=1.0),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SwAV", parents=[cli.base_parser()])
    p.set_defaults(min_lr=None)  # from the preset: SwAV decays to lr/1000
    g = p.add_argument_group("SwAV")
    g.add_argument("--hidden", type=int, default=None, help="projector hidden width")
    g.add_argument("--dim", type=cli.int_at_least(1), default=None, help="projection size")
    g.add_argument("--proj-layers", type=int, default=None, help="Linear layers of the projector")
    g.add_argument("--proj-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="batch norm between the projector's layers")
    g.add_argument("--n-prototypes", type=int, default=None, help="K, number of prototypes")
    g.add_argument("--temperature", type=float, default=0.1, help="τ of the predictions (default: 0.1)")
    g.add_argument("--epsilon", type=float, default=None,
                   help="Sinkhorn regularization (raise it, e.g. 0.03 -> 0.05, if the loss is NaN)")
    g.add_argument("--sinkhorn-iters", type=int, default=None, help="Sinkhorn iterations")
    g.add_argument("--queue-length", type=int, default=None,
                   help="projections queued per assigned crop over all processes, rounded down to a multiple of "
                        "the batch (default: 0 at batch 4096 / 3840 on CIFAR-10; use 3840 for batches <= 256)")
    g.add_argument("--queue-start-epoch", type=int, default=15, help="epoch the queue starts (default: 15)")
    g.add_argument("--freeze-prototypes-epochs", type=float, default=None,
                   help="epochs with frozen prototypes: no update, no decay, no momentum")
    g.add_argument("--crop-size", type=cli.int_at_least(1), default=None,
                   help="global crop size (default: 224 / 32 on CIFAR-10)")
    g.add_argument("--local-crop-size", type=cli.int_at_least(1), default=None,
                   help="local crop size (default: 96 / 16 on CIFAR-10)")
    g.add_argument("--n-local", type=int, default=None, help="local crops")
    g.add_argument("--blur", type=int, default=None, choices=[0, 1],
                   help="Gaussian blur p=0.5 in the crops (default: 1 / 0 on 32x32 CIFAR-10)")
    g.add_argument("--no-sync-bn", action="store_true",
                   help="keep per-process BN statistics under multi-GPU DDP (default: synchronized BN)")
    return p


def build_method(args):
    import torch
    from fastcl.methods.swav import SwAV
    from fastcl.models import build_backbone

    backbone, feat_dim = build_backbone(args.arch)
    queue = args.queue_length - args.queue_length % args.batch_size  # whole batches (official)
    method = SwAV(backbone, feat_dim, hidden=args.hidden, dim=args.dim, n_prototypes=args.n_prototypes,
                  temperature=args.temperature, epsilon=args.epsilon, sinkhorn_iters=args.sinkhorn_iters,
                  queue_length=queue, queue_start_epoch=args.queue_start_epoch,
                  freeze_prototypes_epochs=args.freeze_prototypes_epochs, proj_layers=args.proj_layers,
                  proj_bn=args.proj_bn)
    if torch.distributed.is_initialized() and torch.cuda.is_available() and not args.no_sync_bn:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return method


def main(argv=None, presets=PRESETS, recipe="swav_r50"):
    args = cli.parse_args(get_args_parser(), presets, argv)
    mean, std = cli.dataset_stats(args)
    spec = augment.multicrop(args.crop_size, args.local_crop_size, n_local=args.n_local, global_scale=(0.14, 1.0),
                             local_scale=(0.05, 0.14), mean=mean, std=std, asymmetric=False)
    if not args.blur:
        spec = dataclasses.replace(spec, views=tuple(dataclasses.replace(v, blur_p=0.0) for v in spec.views))
    return cli.run(args, recipe, build_method, spec)


if __name__ == "__main__":
    cli.main_guard(main)
