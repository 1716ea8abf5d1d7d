"""MoCo v2: the loss is the paper's InfoNCE, the key encoder moves only by EMA, the queue is a ring buffer,
and the recipe trains on real CIFAR-10."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastcl.methods import Step
from fastcl.methods.moco import MoCo

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))


def _tiny_moco(K=40, m=0.9, T=0.2):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))  # no BN: key shuffling is invisible
    return MoCo(backbone, feat_dim=16, dim=8, K=K, m=m, T=T)


def _step(i, m=0.9):
    return Step(i, 0, 10, 10, {"momentum": m})


def test_loss_is_infonce_against_the_queue_in_float64():
    moco = _tiny_moco()
    im_q, im_k = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    loss = moco([im_q, im_k], _step(0))["loss"]
    d = {k: v.double() for k, v in moco.state_dict().items()}

    def encode(x, prefix_b, prefix_p):  # the paper's f_q / f_k, written out
        h = x.double().flatten(1) @ d[f"{prefix_b}.1.weight"].T + d[f"{prefix_b}.1.bias"]
        h = torch.relu(h @ d[f"{prefix_p}.net.0.weight"].T + d[f"{prefix_p}.net.0.bias"])
        z = h @ d[f"{prefix_p}.net.2.weight"].T + d[f"{prefix_p}.net.2.bias"]
        return z / z.norm(dim=1, keepdim=True)

    q, k = encode(im_q, "backbone", "projector"), encode(im_k, "backbone_k", "projector_k")
    l_pos = (q * k).sum(1, keepdim=True)  # Nx1
    l_neg = q @ d["queue.queue"].T  # NxK
    logits = torch.cat([l_pos, l_neg], 1) / 0.2
    ref = -torch.log_softmax(logits, 1)[:, 0].mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_key_encoder_moves_only_by_ema_and_queue_wraps_around():
    moco = _tiny_moco(K=40, m=0.9)
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    ptr, queue_before = int(moco.queue.ptr), moco.queue.queue.clone()
    for i in range(4):  # batch 12 does not divide K=40: the 4th enqueue wraps (36 -> 48 = 8)
        x = torch.randn(12, 3, 4, 4)
        k_before = {n: p.detach().clone() for n, p in moco.named_parameters() if n.startswith(("backbone_k", "projector_k"))}
        out = moco([x, x + 0.1 * torch.randn_like(x)], _step(i))
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for n, p in moco.named_parameters() if n in k_before)
        opt.step()
        keys = moco._keys_to_enqueue.clone()
        moco.after_optimizer_step(_step(i))
        for n, p in moco.named_parameters():
            if n in k_before:  # theta_k <- m theta_k + (1 - m) theta_q
                online = dict(moco.named_parameters())[n.replace("backbone_k", "backbone").replace("projector_k", "projector")]
                torch.testing.assert_close(p.detach(), 0.9 * k_before[n] + 0.1 * online.detach())
        rows = [(ptr + j) % 40 for j in range(12)]
        torch.testing.assert_close(moco.queue.queue[rows], torch.nn.functional.normalize(keys.float(), dim=1))
        ptr = (ptr + 12) % 40
        assert int(moco.queue.ptr) == ptr
    untouched = sorted(set(range(40)) - {(j) % 40 for j in range(48)})
    torch.testing.assert_close(moco.queue.queue[untouched], queue_before[untouched])  # nothing else written


def test_bad_hyperparameters_name_themselves():
    with pytest.raises(ValueError, match="temperature T"):
        _tiny_moco(T=0.0)
    with pytest.raises(ValueError, match="momentum m"):
        _tiny_moco(m=1.5)


def _real_cifar_views(n, size=16, seed=0):
    from fastcl.data import augment
    from fastcl.data.cifar10 import load_cifar10
    from fastcl.data.transforms import MultiViewTransform

    images, _ = load_cifar10(split="train")
    tf = MultiViewTransform(augment.mocov2_aug_plus(size, augment.CIFAR10_MEAN, augment.CIFAR10_STD, blur_p=0))
    torch.manual_seed(seed)
    views = [tf(torch.from_numpy(images[i]).permute(2, 0, 1)) for i in range(n)]
    return torch.stack([a for a, _ in views]), torch.stack([b for _, b in views])


def test_loss_falls_on_real_cifar10_batches():
    """Gradients, EMA and loss wired together: on a fixed real batch against a fixed queue of real keys the
    InfoNCE must fall quickly. (The queue is held fixed: refilling it with the same images' keys would make
    them false negatives.)"""
    from fastcl.models import build_backbone

    torch.manual_seed(0)
    net, d = build_backbone("resnet18_cifar")
    moco = MoCo(net, d, K=64, m=0.99, T=0.2, bn_splits=4)
    x1, x2 = _real_cifar_views(16 + 64)
    with torch.no_grad():  # negatives: keys of 64 other real images
        moco.queue.queue.copy_(moco._keys(x2[16:]))
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for i in range(12):
        loss = moco([x1[:16], x2[:16]], _step(i, m=0.99))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        moco.ema.update(0.99)
        losses.append(loss.item())
    early, late = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(map(math.isfinite, losses)) and late < early - 0.5, losses  # 4.0 -> 2.9 here


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_real_cifar10(tmp_path):
    import mocov2_r50

    argv = ["--max-steps", "6", "--batch-size", "16", "--queue-size", "40", "--crop-size", "16",
            "--no-knn", "--workers", "0", "--data-backend", "torch", "--out", str(tmp_path), "--log-every", "1",
            "--ckpt-every", "0"]
    mocov2_r50.main(argv)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "log.jsonl")]
    assert len(losses) == 6 and all(0 < v < 10 for v in losses)  # finite, and below log(K+1)+margin
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["position"]["step"] == 6
    assert int(ckpt["model"]["queue.ptr"]) == 6 * 16 % 40  # one enqueue of the batch's keys per step
    assert ckpt["args"]["arch"] == "resnet18_cifar"
    assert ckpt["backbone_prefix"] == "backbone."
    sd = torch.load(tmp_path / "backbone.pth")["backbone"]
    import torchvision

    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
