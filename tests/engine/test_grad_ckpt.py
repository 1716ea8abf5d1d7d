"""``--grad-ckpt``: activation checkpointing per ViT block and per ResNet / RegNet stage gives the same losses,
gradients, BN running statistics and trained weights as the plain run -- bit-identical on the CPU (the recompute
replays the same ops with the same RNG state: drop-path masks included), within inductor's reassociation
tolerance under ``--compile`` -- and a measurably lower peak of tensor memory (the profiler's allocator records,
``fastcl.engine.memory``). DDP / ZeRO-2 with checkpointing: ``test_grad_ckpt_dist.py``."""
import copy

import pytest
import torch
import torch.nn as nn

from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo
from fastcl.engine.memory import peak_cpu_memory, saved_activation_bytes
from fastcl.methods.dino import DINO
from fastcl.methods.mocov3 import MoCoV3, vit_init_
from fastcl.models import build_backbone
from fastcl.models.checkpointing import enable_grad_checkpointing, is_checkpointed

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def tiny_vit(drop_path=0.0, depth=3, dim=32, **kw):
    net, d = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=dim, depth=depth,
                            num_heads=2, drop_path_rate=drop_path, **kw)
    return net, d


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _step(net, x, seed, amp=None):
    torch.manual_seed(seed)
    ctx = torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = net(x).float().square().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_vit_blocks_checkpointed_give_identical_loss_and_gradients_with_drop_path(amp):
    torch.manual_seed(0)
    plain, _ = tiny_vit(drop_path=0.3, proj_drop_rate=0.1)
    ckpt = copy.deepcopy(plain)
    assert enable_grad_checkpointing(ckpt) == ["blocks.0", "blocks.1", "blocks.2"]
    x = torch.randn(6, 3, 16, 16)
    for seed in (1, 2):
        for m in (plain, ckpt):
            m.zero_grad()
        a, b = _step(plain, x, seed, amp), _step(ckpt, x, seed, amp)
        assert torch.equal(a, b)  # tolerance: none (bit-identical on the CPU)
        ga, gb = _grads(plain), _grads(ckpt)
        assert ga.keys() == gb.keys() and len(ga) > 10
        for k in ga:
            assert torch.equal(ga[k], gb[k]), k
    # sensitive: drop-path is active (another seed, other masks, another loss), so a recompute drawing new masks
    # would give other gradients; and the global random stream after the step is the plain run's
    assert not torch.equal(_step(plain, x, 3, amp), a)
    _step(plain, x, 5, amp)
    r_plain = torch.rand(4)
    _step(ckpt, x, 5, amp)
    assert torch.equal(torch.rand(4), r_plain)


@pytest.mark.parametrize("arch", ["resnet18_cifar", "regnet_y_400mf"])
def test_resnet_and_regnet_stages_checkpointed_keep_gradients_and_bn_statistics(arch):
    torch.manual_seed(0)
    plain, _ = build_backbone(arch)
    ckpt = copy.deepcopy(plain)
    names = enable_grad_checkpointing(ckpt)
    assert names == ([f"layer{i}" for i in range(1, 5)] if arch.startswith("resnet")
                     else [f"trunk_output.block{i}" for i in range(1, 5)])
    x = torch.randn(4, 3, 32, 32)
    for seed in (1, 2):  # two steps: running statistics updated once per forward, not again in the recompute
        for m in (plain, ckpt):
            m.zero_grad()
        assert torch.equal(_step(plain, x, seed), _step(ckpt, x, seed))
        ga, gb = _grads(plain), _grads(ckpt)
        for k in ga:
            assert torch.equal(ga[k], gb[k]), k
    sa, sb = plain.state_dict(), ckpt.state_dict()
    assert sa.keys() == sb.keys()  # same names: checkpoints and exports are unchanged
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    tracked = [int(v) for k, v in sb.items() if k.endswith("num_batches_tracked")]
    assert len(tracked) > 10 and set(tracked) == {2}  # one update per forward, none in the recompute


def test_frozen_teachers_and_no_grad_passes_are_not_checkpointed():
    torch.manual_seed(0)
    student, d = tiny_vit(drop_path=0.1)
    teacher, _ = tiny_vit()
    dino = DINO(student, d, teacher_backbone=teacher, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    names = enable_grad_checkpointing(dino)
    assert names == [f"student_backbone.blocks.{i}" for i in range(3)]
    assert not any(is_checkpointed(m) for m in teacher.modules())
    assert all(is_checkpointed(b) for b in student.blocks)
    with torch.no_grad():  # kNN / teacher: the plain forward (no checkpoint frames)
        student(torch.randn(2, 3, 16, 16))
    mocov3 = MoCoV3(vit_init_(tiny_vit()[0]), d, dim=8, mlp_dim=16, sync_bn=False)
    names = enable_grad_checkpointing(mocov3)
    assert names == [f"backbone.blocks.{i}" for i in range(3)]  # not backbone_k (momentum encoder)
    with pytest.raises(ValueError, match="--grad-ckpt: .* no trainable timm ViT"):
        enable_grad_checkpointing(nn.Sequential(nn.Linear(3, 3)))


def test_peak_memory_of_a_vit_step_is_lower_with_checkpointing():
    """Measured with the profiler's allocator records (peak of the bytes held by CPU tensors over one forward +
    backward), and cross-checked with the bytes autograd saves for the backward."""
    torch.manual_seed(0)
    plain, _ = tiny_vit(depth=6, dim=64)
    ckpt = copy.deepcopy(plain)
    enable_grad_checkpointing(ckpt)
    x = torch.randn(32, 3, 16, 16)

    def step(m):
        return lambda: m(x).square().mean().backward()

    for m in (plain, ckpt):
        step(m)()  # gradients allocated: the measured step holds what a training step holds
    peak_plain, end_plain = peak_cpu_memory(step(plain))
    peak_ckpt, end_ckpt = peak_cpu_memory(step(ckpt))
    assert end_plain == end_ckpt  # parameters + gradients + input, the same
    act_plain, act_ckpt = peak_plain - end_plain, peak_ckpt - end_ckpt
    assert act_ckpt < 0.5 * act_plain, (act_plain, act_ckpt)
    saved_plain = saved_activation_bytes(lambda: plain(x).square().mean())
    saved_ckpt = saved_activation_bytes(lambda: ckpt(x).square().mean())
    assert saved_ckpt < 0.25 * saved_plain, (saved_plain, saved_ckpt)
    # the profiler's peak sees what autograd holds (saved tensors, weights among them, plus the transient backward)
    assert 0.8 * saved_plain <= act_plain, (saved_plain, act_plain)


class Views:
    def __init__(self, sizes, n=3):
        g = torch.Generator().manual_seed(0)
        self.batches = [[torch.rand(4, 3, s, s, generator=g) for s in sizes] for _ in range(n)]
        self.start = 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        for views in self.batches[self.start:]:
            yield views, torch.zeros(4, dtype=torch.long), torch.arange(4)


def _dino():
    student, d = tiny_vit(drop_path=0.2)
    teacher, _ = tiny_vit()
    return DINO(student, d, teacher_backbone=teacher, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                warmup_teacher_temp_epochs=0, freeze_last_layer=0)


def _mocov3():
    return MoCoV3(vit_init_(tiny_vit(drop_path=0.1)[0]), 32, dim=8, mlp_dim=16, sync_bn=False, decay_all=True)


def _fit(build, sizes, tmp_path, name, **cfg_kw):
    torch.manual_seed(0)
    method = build()
    base = dict(out_dir=str(tmp_path / name), epochs=1, batch_size=4, optimizer="adamw", lr=1e-3, weight_decay=0.04,
                log_every=1, resume="none", amp="none")
    cfg = TrainConfig(**{**base, **cfg_kw})
    losses = []
    torch.manual_seed(1)
    t = Trainer(method, Views(sizes), cfg, CPU, log_fn=losses.append)
    t.fit()
    return [r["loss"] for r in losses], method.state_dict(), t


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_trainer_with_grad_ckpt_equals_plain_dino_with_ema_teacher(tmp_path, amp):
    sizes = (16, 16, 8, 8)
    loss_a, sd_a, _ = _fit(_dino, sizes, tmp_path, "plain", amp=amp)
    loss_b, sd_b, t = _fit(_dino, sizes, tmp_path, "ckpt", amp=amp, grad_ckpt=True)
    assert t.grad_ckpt_modules == [f"student_backbone.blocks.{i}" for i in range(3)]
    assert len(loss_a) == 3 and loss_a == loss_b
    for k in sd_a:  # student, teacher (EMA) and center: identical
        assert torch.equal(sd_a[k], sd_b[k]), k


@pytest.mark.slow
def test_compiled_grad_ckpt_equals_compiled_plain_in_one_graph(tmp_path, monkeypatch):
    """Under torch.compile the checkpoint is a higher-order op the partitioner recomputes: the same losses and
    weights as the compiled run without it (both differ from eager by inductor's fp32 reassociation, ~3e-4
    relative on the 3rd loss here), and no graph break."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's drop-path masks
    sgd = dict(optimizer="sgd", lr=0.05)
    runs = {}
    try:
        for name, ckpt in (("plain", False), ("ckpt", True)):
            torch._dynamo.reset()
            counters.clear()
            runs[name] = _fit(_mocov3, (16, 16), tmp_path, name, grad_ckpt=ckpt, compile="default", **sgd)
            assert dict(counters["graph_break"]) == {}, (name, dict(counters["graph_break"]))
    finally:
        torch._dynamo.reset()
    (loss_p, sd_p, _), (loss_c, sd_c, t) = runs["plain"], runs["ckpt"]
    assert t.grad_ckpt_modules == [f"backbone.blocks.{i}" for i in range(3)]
    assert len(loss_c) == 3 and loss_c == pytest.approx(loss_p, rel=1e-6, abs=1e-7)
    for k in sd_p:
        torch.testing.assert_close(sd_c[k], sd_p[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_grad_ckpt_flag_reaches_the_train_config():
    import argparse

    from fastcl.cli import base_parser, parse_args, train_config

    parser = argparse.ArgumentParser(parents=[base_parser()])
    preset = {"cifar": dict(arch="x", epochs=1, batch_size=8, lr=0.1, warmup_epochs=0, optimizer="adamw", wd=0.0,
                            clip_grad=0.0, knn_every=0)}
    assert train_config(parse_args(parser, preset, []), "r").grad_ckpt is False
    assert train_config(parse_args(parser, preset, ["--grad-ckpt"]), "r").grad_ckpt is True
