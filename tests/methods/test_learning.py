"""Representations learn: a short MoCo v2 run on real CIFAR-10 images lifts the kNN top-1 of its backbone clearly
above the same backbone at random initialisation. (The other method tests check losses and formulas; this checks
the point of it all.)

Setup, sized for 2 CPU cores (~40 s): a 4-conv backbone (256-d features), MoCo v2 with the CIFAR preset's m 0.99
and T 0.1, K 1024, split BN 4, SGD lr 0.03 (0.06 x 128/256) cosine, wd 5e-4, 10 epochs over 2,048 training images
at batch 128, augmented by the device-resident back end (here on CPU tensors); kNN (k 20, T 0.1) with those 2,048
images as the bank, on 2,000 test images, both networks with their BN statistics estimated on the bank (a
random network keeps its initial mean 0 / variance 1 otherwise, and training at lr 0 would already "win").
Measured on this machine: random 0.308 / 0.3015 -> trained 0.3415 / 0.341 (seeds 0 / 1), a margin of 0.034-0.040
on the same 2,000 test images (seed 0: 0.3395 since MoCo's split-BN shuffle draws its permutation differently); training at lr 0 gives a margin of exactly 0. The bar is 0.02.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.data import augment
from fastcl.data.gpu import DeviceEvalLoader, DeviceLoader
from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo
from fastcl.eval.knn import knn_eval
from fastcl.methods.moco import MoCo

MEAN, STD = augment.CIFAR10_MEAN, augment.CIFAR10_STD


@torch.no_grad()
def _calibrated(backbone: nn.Module, loader) -> nn.Module:
    """``backbone`` with its BN running statistics estimated on ``loader``'s images (a cumulative average), so a
    random network is not handicapped by its initial statistics (mean 0, variance 1) against a trained one whose
    statistics followed the data: without this, training at lr 0 already "beats" random init."""
    import copy

    net = copy.deepcopy(backbone)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    for images, _, _ in loader:
        net(images)
    return net.eval()


def _backbone():
    layers, c_in = [], 3
    for c_out, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.slow
def test_mocov2_learns_on_cifar10(tmp_path):
    from fastcl.data.cifar10 import load_cifar10

    x, y = load_cifar10(split="train")
    xt, yt = load_cifar10(split="test")
    rng = np.random.default_rng(0)
    train, test = rng.permutation(len(x))[:2048], rng.permutation(len(xt))[:2000]
    bank = DeviceEvalLoader(x[train], y[train], MEAN, STD, batch_size=512)
    queries = DeviceEvalLoader(xt[test], yt[test], MEAN, STD, batch_size=512)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        moco = MoCo(_backbone(), 256, dim=64, K=1024, m=0.99, T=0.1, bn_splits=4)
        random_init = knn_eval(_calibrated(moco.backbone, bank), bank, queries, cpu, k=20, T=0.1)["top1"]
        loader = DeviceLoader(x[train], y[train], augment.mocov2_aug_plus(32, MEAN, STD, blur_p=0.0), 128, seed=0)
        cfg = TrainConfig(out_dir=str(tmp_path), epochs=10, batch_size=128, lr=0.03, weight_decay=5e-4,
                          log_every=10**6, resume="none", amp="none")
        Trainer(moco, loader, cfg, DistInfo(0, 1, 0, cpu)).fit()
        trained = knn_eval(_calibrated(moco.backbone, bank), bank, queries, cpu, k=20, T=0.1)["top1"]
    finally:
        torch.set_num_threads(threads)
    assert 0.2 <= random_init <= 0.33, random_init  # random conv features: above chance (0.1), far from learned
    assert trained >= random_init + 0.02, (random_init, trained)
