"""DINO (fastcl.methods.dino + recipes/dino_vits8.py): the loss against a float64 transcription of the
paper's eq. 3, the teacher moving only by EMA, the frozen last layer in epoch 0, the center update, the
schedules, per-parameter clipping, multi-crop grouping, and a short run on real CIFAR-10 (loss falls, no
collapse)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.methods.base import Step
from fastcl.methods.dino import DINO, DINOHead, multicrop_forward
from fastcl.models import build_backbone
from recipe_loader import load_recipe

recipe = load_recipe("dino_vits8")


class PoolNet(nn.Module):
    """A tiny backbone that takes any crop size and mixes no samples: pool to 2x2, linear, GELU."""

    def __init__(self, d=16):
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(12, d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return nn.functional.gelu(self.fc(self.pool(x).flatten(1)))


def tiny_dino(K=64, norm_last_layer=True, **kw):
    torch.manual_seed(0)
    return DINO(PoolNet(), 16, out_dim=K, hidden_dim=32, bottleneck_dim=8, norm_last_layer=norm_last_layer, **kw)


def crops(b=4, n_local=3, dtype=torch.float32):
    return [torch.randn(b, 3, 8, 8, dtype=dtype) for _ in range(2)] + \
           [torch.randn(b, 3, 4, 4, dtype=dtype) for _ in range(n_local)]


def step(epoch=1, m=0.996, tt=0.04):
    return Step(0, epoch, 1, 10, {"momentum": m, "teacher_temp": tt})


def head_by_hand(head, x):
    """g(x) = W·normalize(MLP(x)), W_k = g_k v_k / ||v_k|| (weight norm), written out from the parameters."""
    lin = [m for m in head.mlp if isinstance(m, nn.Linear)]
    h = x
    for i, layer in enumerate(lin):
        h = h @ layer.weight.T + layer.bias
        if i < len(lin) - 1:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    h = h / h.norm(dim=1, keepdim=True)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    return h @ (g * v / v.norm(dim=1, keepdim=True)).T


# ---------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("n_local,b,K", [(3, 4, 64), (0, 5, 33)])  # second: no local crops, odd sizes
def test_loss_matches_paper_eq3_float64(n_local, b, K):
    dino = tiny_dino(K=K).double()
    with torch.no_grad():
        dino.center.copy_(torch.randn(1, K, dtype=torch.float64))
    views = crops(b, n_local, torch.float64)
    out = dino(views, step(tt=0.05))
    # literal transcription of eq. 3 and DINOLoss.forward: P_t(x) = softmax((g_t(x) - c) / τt) for the 2
    # global crops, P_s(x') = softmax(g_s(x') / τs) for every crop, H(a, b) = -Σ_k a_k log b_k, averaged
    # over the batch and over the pairs (x, x') with x' ≠ x
    with torch.no_grad():
        g_s = [head_by_hand(dino.student_head, dino.student_backbone(v)) for v in views]
        g_t = [head_by_hand(dino.teacher_head, dino.teacher_backbone(v)) for v in views[:2]]
    c = dino.center.clone()
    total, pairs = 0.0, 0
    for iq in range(2):
        for v in range(len(views)):
            if v == iq:
                continue
            for i in range(b):
                t = torch.exp((g_t[iq][i] - c[0]) / 0.05)
                p_t = t / t.sum()
                s = torch.exp(g_s[v][i] / 0.1)
                p_s = s / s.sum()
                total += float(-(p_t * torch.log(p_s)).sum()) / b
            pairs += 1
    # the kernel computes in fp32 (DINO's loss does too under AMP): fp32 tolerance
    assert float(out["loss"].detach()) == pytest.approx(total / pairs, rel=1e-5)
    # center: c <- 0.9 c + 0.1 mean over the batch of the teacher outputs (one rank)
    dino.after_optimizer_step(step())
    expected = 0.9 * c + 0.1 * torch.cat(g_t).mean(0, keepdim=True)
    torch.testing.assert_close(dino.center, expected, rtol=1e-5, atol=1e-6)


def test_teacher_entropy_is_the_centered_sharpened_teachers_float64():
    """The label-free collapse signal (issue 12 item 1): the batch mean of H(P_t) = -sum_k P_t log P_t over the
    global crops' centered, sharpened teacher softmax (0 = one-hot collapse, log K = uniform collapse), returned
    as a detached 0-dim tensor (read at log steps only: no host sync in the step)."""
    K = 48
    dino = tiny_dino(K=K).double()
    with torch.no_grad():
        dino.center.copy_(torch.randn(1, K, dtype=torch.float64))
    views = crops(5, 2, torch.float64)
    out = dino(views, step(tt=0.05))
    with torch.no_grad():
        g_t = torch.cat([head_by_hand(dino.teacher_head, dino.teacher_backbone(v)) for v in views[:2]])
    ref = 0.0
    for row in g_t:
        t = torch.exp((row - dino.center[0]) / 0.05)
        p = t / t.sum()
        ref += float(-(p * torch.log(p)).sum()) / len(g_t)
    h = out["teacher_entropy"]
    assert h.dim() == 0 and not h.requires_grad and 0 < ref < math.log(K)
    assert float(h) == pytest.approx(ref, rel=1e-5)


def test_head_shape_and_weight_norm():
    head = DINOHead(16, out_dim=40, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(head(x), head_by_hand(head, x))
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (40, 1) and torch.all(g == 1) and not g.requires_grad  # norm fixed to 1
    assert DINOHead(16, 40, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3 and sum(isinstance(m, nn.GELU) for m in head.mlp) == 2


# ---------------------------------------------------------------------------------------------- what moves
def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    dino = tiny_dino()
    teacher = [*dino.teacher_backbone.parameters(), *dino.teacher_head.parameters()]
    student = [*dino.student_backbone.parameters(), *dino.student_head.parameters()]
    assert all(not p.requires_grad for p in teacher)
    for t, s in zip(teacher, student):
        torch.testing.assert_close(t, s)  # the teacher starts as the student
    dino(crops(), step())["loss"].backward()
    assert all(p.grad is None for p in teacher)
    t_before = [p.detach().clone() for p in teacher]
    with torch.no_grad():
        for p in student:
            if p.grad is not None:
                p -= 0.5 * p.grad  # an optimizer step on the student only
    moved = [not torch.equal(t, s) for t, s in zip(t_before, student)]
    assert sum(moved) >= len(student) - 1  # everything but the fixed weight norm g
    dino.after_optimizer_step(step(m=0.9))
    for t, t0, s in zip(teacher, t_before, student):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)  # exactly the scheduled EMA


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_frozen_in_epoch_0_only(norm_last_layer):
    dino = tiny_dino(norm_last_layer=norm_last_layer, clip_grad=3.0)
    opt = torch.optim.AdamW(dino.param_groups(0.04), lr=1e-2)  # wd must not move it either
    last = [p for p in dino.student_head.last_layer.parameters() if p.requires_grad]
    rest = [p for n, p in dino.named_parameters() if p.requires_grad and "last_layer" not in n]
    assert len(last) == (1 if norm_last_layer else 2)
    for epoch, last_moves in ((0, False), (0, False), (1, True)):
        l0, r0 = [p.detach().clone() for p in last], [p.detach().clone() for p in rest]
        opt.zero_grad(set_to_none=True)
        dino(crops(), step(epoch=epoch))["loss"].backward()
        dino.before_optimizer_step(step(epoch=epoch))
        opt.step()
        dino.after_optimizer_step(step(epoch=epoch))
        assert all(not torch.equal(a, p) for a, p in zip(r0, rest))  # the rest trains from step 0
        assert all(torch.equal(a, p) for a, p in zip(l0, last)) != last_moves


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_zero_groups_isolate_exactly_the_last_layer(norm_last_layer):
    """Under ZeRO the frozen last layer must be whole optimizer groups of its own (a skip leaves whole flat shards
    out): skippable_parameters() names exactly the params the freeze drops, and isolate_skippable splits them off
    with each group's settings (decay and no-decay alike); with no freeze nothing is split."""
    from fastcl.engine.zero import isolate_skippable

    dino = tiny_dino(norm_last_layer=norm_last_layer)
    dino(crops(), step(epoch=0))["loss"].backward()
    dino.before_optimizer_step(step(epoch=0))
    dropped = {id(p) for p in dino.parameters() if p.requires_grad and p.grad is None}
    assert dropped and dropped == {id(p) for p in dino.skippable_parameters()}
    groups = dino.param_groups(0.04)
    split = isolate_skippable(groups, dino.skippable_parameters())
    assert sorted(id(p) for g in split for p in g["params"]) == sorted(id(p) for g in groups for p in g["params"])
    for g in split:
        ids = {id(p) for p in g["params"]}
        assert ids <= dropped if g.get("skippable") else not ids & dropped
        assert g["weight_decay"] == next(h for h in groups if ids <= {id(p) for p in h["params"]})["weight_decay"]
    assert sum(bool(g.get("skippable")) for g in split) == 1  # (weight norm's g is K x 1: decayed, as DINO's)
    none = tiny_dino(norm_last_layer=norm_last_layer, freeze_last_layer=0)
    assert none.skippable_parameters() == []
    assert len(isolate_skippable(none.param_groups(0.04), [])) == len(none.param_groups(0.04))


def test_per_parameter_gradient_clip():
    dino = tiny_dino(clip_grad=3.0)
    params = [p for p in dino.parameters() if p.requires_grad]
    grads = [torch.full_like(p, 0.001) for p in params]
    grads[0] = torch.full_like(params[0], 10.0)  # norm >> 3: clipped to 3; the others untouched
    for p, g in zip(params, grads):
        p.grad = g.clone()
    dino.before_optimizer_step(step(epoch=1))
    assert float(params[0].grad.norm()) == pytest.approx(3.0, rel=1e-4)
    for p, g in zip(params[1:], grads[1:]):
        torch.testing.assert_close(p.grad, g)


def test_schedules_are_dinos():
    dino = tiny_dino()
    s = dino.schedules(100, 7)
    assert all(len(v) == 700 for v in s.values())
    tt = s["teacher_temp"]
    assert tt[0] == pytest.approx(0.04) and tt[6] == pytest.approx(0.04)  # per epoch, as DINOLoss
    np.testing.assert_allclose(tt[::7][:30], np.linspace(0.04, 0.07, 30))  # linear over 30 epochs
    assert np.all(tt[29 * 7:] == pytest.approx(0.07))  # then constant
    m = s["momentum"]
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(1.0, abs=1e-6) and np.all(np.diff(m) >= 0)
    assert len(dino.schedules(10, 3)["teacher_temp"]) == 30  # shorter than the warm-up: truncated


def test_multicrop_one_forward_per_resolution():
    net = PoolNet()
    views = crops(b=3, n_local=4)
    out = multicrop_forward(net, views)
    assert net.calls == 2 and out.shape == (18, 16)
    torch.testing.assert_close(out, torch.cat([net(v) for v in views]))


@pytest.mark.parametrize("kw", [dict(student_temp=0.0), dict(teacher_temp=-1.0), dict(momentum_teacher=1.5),
                                dict(center_momentum=1.0), dict(clip_grad=-1.0), dict(freeze_last_layer=-1)])
def test_bad_hyperparameters_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        tiny_dino(**kw)


# ---------------------------------------------------------------------------------------------- the recipe
def test_presets_and_the_headline_model():
    p = recipe.get_args_parser()
    a = recipe.cli.parse_args(p, recipe.PRESETS, ["--data", "/imagenet"])
    assert (a.arch, a.patch_size, a.epochs, a.batch_size, a.lr, a.min_lr, a.wd, a.wd_end, a.clip_grad_param,
            a.out_dim, a.norm_last_layer, a.local_crops_number, a.global_crops_scale, a.local_crops_scale) == \
        ("vit_small_patch8_224", 8, 800, 1024, 0.0005, 1e-6, 0.04, 0.4, 3.0, 65536, False, 10, (0.4, 1.0),
         (0.05, 0.4))
    spec = recipe.build_spec(a)
    assert [v.size for v in spec.expanded()] == [224, 224] + [96] * 10
    a = recipe.cli.parse_args(p, recipe.PRESETS, [])  # no arguments: CIFAR-10
    assert (a.preset, a.global_crop_size, a.local_crop_size, a.out_dim, a.batch_size, a.epochs) == \
        ("cifar", 32, 16, 4096, 512, 200)
    spec = recipe.build_spec(a)
    assert [v.size for v in spec.expanded()] == [32, 32] + [16] * 10 and all(v.blur_p == 0 for v in spec.views)
    # the headline backbone: ViT-S with 4px patches (8x8 tokens at 32px, 4x4 at 16px), drop-path 0.1
    net, d = build_backbone(a.arch, img_size=32, patch_size=a.patch_size, drop_path_rate=a.drop_path)
    assert d == 384 and sum(p.numel() for p in net.parameters()) == pytest.approx(21.7e6, rel=0.02)
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with torch.no_grad():
        feats = multicrop_forward(net, [torch.randn(1, 3, 32, 32)] * 2 + [torch.randn(1, 3, 16, 16)] * 10)
    assert feats.shape == (12, 384) and torch.isfinite(feats).all()
    a = recipe.cli.parse_args(p, recipe.PRESETS, ["--arch", "vit_tiny_patch16_224", "--out-dim", "64"])
    dino = recipe.build_method(a)
    assert dino.student_backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(dino.teacher_backbone.blocks[-1].drop_path1, nn.Identity)  # no drop-path in the teacher
    assert dino.backbone is dino.teacher_backbone  # kNN and export use the teacher, as DINO does


def test_vits16_presets():
    r16 = load_recipe("dino_vits16")
    a = r16.dino.cli.parse_args(r16.dino.get_args_parser(), r16.PRESETS, ["--data", "/imagenet"])
    assert (a.arch, a.patch_size, a.epochs, a.batch_size, a.lr, a.min_lr, a.warmup_epochs, a.wd, a.wd_end,
            a.clip_grad_param, a.out_dim, a.norm_last_layer, a.global_crops_scale, a.local_crops_scale,
            a.local_crops_number, a.warmup_teacher_temp, a.teacher_temp, a.warmup_teacher_temp_epochs,
            a.momentum_teacher, a.student_temp, a.drop_path, a.freeze_last_layer) == \
        ("vit_small_patch16_224", 16, 100, 1024, 0.0005, 1e-6, 10, 0.04, 0.4, 3.0, 65536, True, (0.32, 1.0),
         (0.05, 0.32), 10, 0.04, 0.07, 30, 0.996, 0.1, 0.1, 1)
    a = r16.dino.cli.parse_args(r16.dino.get_args_parser(), r16.PRESETS, [])
    assert (a.preset, a.arch, a.patch_size, a.global_crop_size) == ("cifar", "vit_small_patch16_224", 8, 32)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    try:
        torch.manual_seed(0)
        # ViT-tiny with 8px patches on 16px global / 8px local crops, K=256. A few repeated steps: one
        # fixed batch of 16 real images (fresh augmentations every step), τt 0.04 fixed (DINO's default
        # vanilla setting) and center momentum 0 (an ablation setting in the paper) so the loss target is
        # not dominated by the center's warm-up transient in so few steps.
        res = recipe.main(["--max-steps", "20", "--batch-size", "16", "--train-samples", "16", "--no-knn",
                           "--out", str(out), "--workers", "0", "--data-backend", "torch",
                           "--arch", "vit_tiny_patch16_224", "--patch-size", "8", "--global-crop-size", "16",
                           "--local-crop-size", "8", "--local-crops-number", "2", "--out-dim", "256",
                           "--head-hidden", "128", "--bottleneck", "32", "--warmup-epochs", "0", "--lr", "0.005",
                           "--freeze-last-layer", "0", "--teacher-temp", "0.04",
                           "--warmup-teacher-temp-epochs", "0", "--center-momentum", "0", "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return res, out, [r for r in recs if "loss" in r]


def test_recipe_runs_on_cifar10_and_loss_falls(cifar_run):
    res, out, recs = cifar_run
    assert res["step"] == 20 and (out / "backbone.pth").exists()
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["backbone_prefix"] == "teacher_backbone."  # what export and eval read: the teacher, as in DINO
    losses = [r["loss"] for r in recs]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    # step 0 uses the zero initial center (an uncentered, sharp teacher); compare once the center is set
    early, late = np.mean(losses[1:6]), np.mean(losses[-5:])
    assert late < early - 0.3, (early, late, losses)


def test_no_collapse_after_a_short_run(cifar_run):
    _, _, recs = cifar_run
    d, K = 192, 256  # ViT-tiny features, head outputs
    std, entropy = recs[-1]["std"], recs[-1]["teacher_entropy"]
    # healthy: per-dim std of the L2-normalized teacher features near 1/sqrt(d) (collapse -> 0), teacher
    # entropy strictly between one-hot (0) and uniform (log K) collapse
    assert std > 0.5 / math.sqrt(d) and std > 0.6 * recs[0]["std"], (recs[0], recs[-1])
    assert 0.1 * math.log(K) < entropy < 0.95 * math.log(K), recs[-1]


def _clip_reference(params, clip):
    """facebookresearch/dino utils.clip_gradients, as written there."""
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def test_gradient_clip_equals_dinos_and_costs_a_fixed_number_of_ops():
    """Equal to DINO's per-parameter loop on random gradients (some above, some below the clip), and the number
    of ops does not grow with the number of parameters (was 2 per parameter plus 2)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for nlayers in (2, 4):
        torch.manual_seed(nlayers)
        dino = DINO(nn.Linear(6, 16), 16, out_dim=32, hidden_dim=16, bottleneck_dim=8, nlayers=nlayers, clip_grad=1.0)
        params = [p for p in dino.parameters() if p.requires_grad]
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p) * (3.0 if i % 2 else 0.05)
        ref = [p.grad.clone() for p in params]
        ref_params = [nn.Parameter(p.detach().clone()) for p in params]
        for rp, g in zip(ref_params, ref):
            rp.grad = g
        _clip_reference(ref_params, 1.0)
        Count.n = 0
        with Count():
            dino.before_optimizer_step(step(epoch=1))
        counts.append(Count.n)
        for p, rp in zip(params, ref_params):
            torch.testing.assert_close(p.grad, rp.grad, rtol=1e-6, atol=1e-7)
    assert counts[0] == counts[1] <= 8, counts
