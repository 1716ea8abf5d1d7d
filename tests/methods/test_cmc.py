"""CMC (fastcl.methods.cmc + recipes/cmc_r50.py): the Lab views, the loss against a float64 transcription
of the paper's eq. 2 (both directions), the memory-bank update, the half-width encoders, the lr steps, and
a short run on real CIFAR-10."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.methods.base import Step
from fastcl.methods.cmc import CMC, LAB_MEAN, LAB_STD, half_width_resnet, rgb_to_lab
from recipe_loader import load_recipe

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


recipe = load_recipe("cmc_r50")


class PoolNet(nn.Module):
    def __init__(self, c_in, d=12):
        super().__init__()
        self.fc = nn.Linear(c_in * 4, d)

    def forward(self, x):
        return torch.relu(self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)))


def tiny_cmc(n=40, K=16, **kw):
    torch.manual_seed(0)
    return CMC(PoolNet(1), PoolNet(2), 12, n, MEAN, STD, dim=8, K=K, **kw)


def step(indices):
    return Step(0, 0, 1, 1, {}, indices=indices)


def test_rgb_to_lab_known_colors():
    rgb = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]]).view(4, 3, 1, 1)
    lab = rgb_to_lab(rgb).view(4, 3)
    # skimage.color.rgb2lab (D65): white, red, black, green
    expected = torch.tensor([[100.0, 0, 0], [53.241, 80.092, 67.203], [0, 0, 0], [87.735, -86.183, 83.179]])
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)


def test_views_are_l_and_ab():
    cmc = tiny_cmc()
    gray = torch.rand(3, 1, 5, 5).expand(3, 3, 5, 5)  # gray image, normalized like the data pipeline
    x = (gray - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    v1, v2 = cmc.backbone.views(x)
    assert v1.shape == (3, 1, 5, 5) and v2.shape == (3, 2, 5, 5)
    lab = rgb_to_lab(gray)
    torch.testing.assert_close(v1, (lab[:, :1] - LAB_MEAN[0]) / LAB_STD[0], atol=1e-4, rtol=1e-4)
    ab0 = -torch.tensor(LAB_MEAN[1:]) / torch.tensor(LAB_STD[1:])  # a = b = 0 for gray
    torch.testing.assert_close(v2, ab0.view(1, 2, 1, 1).expand_as(v2), atol=1e-3, rtol=0)
    assert cmc.backbone(x).shape == (3, 24)  # [f1(L), f2(ab)] concatenated


def test_loss_matches_paper_eq2_float64_and_bank_update():
    cmc = tiny_cmc().double()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    idx = torch.tensor([3, 0, 7, 39, 12, 5])
    m_l, m_ab = cmc.memory_l.clone(), cmc.memory_ab.clone()
    torch.manual_seed(1)
    out = cmc([x], step(idx))
    torch.manual_seed(1)
    neg = torch.randint(0, 40, (16,))  # the forward's only random draw: the K shared negative slots
    with torch.no_grad():
        h_l, h_ab = cmc.backbone.encode(x)
        z1, z2 = cmc.embed_l(h_l), cmc.embed_ab(h_ab)
    z1, z2 = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)

    def one_way(z, bank):  # -log h(anchor, positive) / (h(positive) + Σ_neg h), h = exp(u·v / T)
        total = 0.0
        for i in range(6):
            pos = math.exp(float(z[i] @ bank[idx[i]]) / 0.07)
            negs = sum(math.exp(float(z[i] @ bank[j]) / 0.07) for j in neg)
            total += -math.log(pos / (pos + negs))
        return total / 6

    expected = one_way(z1, m_ab) + one_way(z2, m_l)  # L(V1, V2) + L(V2, V1)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-6)
    cmc.after_optimizer_step(step(idx))
    for bank, old, z in ((cmc.memory_l, m_l, z1), (cmc.memory_ab, m_ab, z2)):
        new = 0.5 * old[idx] + 0.5 * z
        torch.testing.assert_close(bank[idx], new / new.norm(dim=1, keepdim=True))
        keep = torch.ones(40, dtype=torch.bool)
        keep[idx] = False
        torch.testing.assert_close(bank[keep], old[keep])  # other slots untouched
    assert torch.allclose(cmc.memory_l.norm(dim=1), torch.ones(40, dtype=torch.float64))


def test_gradients_reach_both_encoders_only_through_the_anchors():
    cmc = tiny_cmc()
    out = cmc([torch.randn(4, 3, 8, 8)], step(torch.arange(4)))
    out["loss"].backward()
    for enc in (cmc.backbone.enc_l, cmc.backbone.enc_ab, cmc.embed_l, cmc.embed_ab):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert not cmc.memory_l.requires_grad and not cmc.memory_ab.requires_grad


def test_half_width_resnets():
    net, d = half_width_resnet(50, 1)
    assert d == 1024 and net.conv1.out_channels == 32 and net.conv1.in_channels == 1
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(5.9e6, rel=0.03)  # ~1/4 of ResNet-50
    net, d = half_width_resnet(18, 2, cifar_stem=True)
    assert d == 256 and net(torch.randn(2, 2, 16, 16)).shape == (2, 256)
    with pytest.raises(ValueError, match="depth"):
        half_width_resnet(42, 1)


@pytest.mark.parametrize("kw,name", [(dict(T=0.0), "T"), (dict(K=0), "K"), (dict(bank_momentum=1.0), "bank_momentum"),
                                     (dict(n=0), "num_samples")])
def test_bad_hyperparameters_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        tiny_cmc(**kw)


def test_needs_indices():
    with pytest.raises(ValueError, match="indices"):
        tiny_cmc()([torch.randn(2, 3, 8, 8)], Step(0, 0, 1, 1, {}))


def test_presets_and_lr_steps():
    p = recipe.get_args_parser()
    a = recipe.cli.parse_args(p, recipe.PRESETS, ["--data", "/imagenet"])
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.wd, a.nce_k, a.nce_t, a.nce_m, a.feat_dim, a.crop_size,
            a.crop_scale) == ("resnet50", 400, 128, 0.06, 1e-4, 4096, 0.07, 0.5, 128, 224, (0.08, 1.0))
    assert recipe.cli.train_config(a, "cmc").lr == pytest.approx(0.03)  # train_CMC.py: 0.03 at batch 128, unscaled
    s = recipe.step_lr(0.03, 400, 10, a.lr_decay_fracs)
    assert s[0] == s[2499] == pytest.approx(0.03) and s[2500] == pytest.approx(0.003)  # epoch 250
    assert s[3000] == pytest.approx(3e-4) and s[3500] == pytest.approx(3e-5) and s[-1] == pytest.approx(3e-5)
    a = recipe.cli.parse_args(p, recipe.PRESETS, [])
    assert (a.preset, a.arch, a.crop_size, a.batch_size, a.epochs) == ("cifar", "resnet18", 32, 512, 200)


def test_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    try:
        torch.manual_seed(0)
        # a few repeated steps: one fixed batch of 16 real images (fresh crops every step), so their bank
        # slots, the positives, fill with real embeddings
        res = recipe.main(["--max-steps", "12", "--batch-size", "16", "--train-samples", "16", "--no-knn",
                           "--out", str(tmp_path), "--workers", "0", "--data-backend", "torch",
                           "--crop-size", "16", "--nce-k", "256", "--lr", "0.5", "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res["step"] == 12 and (tmp_path / "backbone.pth").exists()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    early, late = np.mean(losses[:4]), np.mean(losses[-4:])
    assert late < early - 0.3, (early, late, losses)
    # CMC's Lab encoder pair is no torchvision ResNet: export and the linear probe refuse it with the reason
    from fastcl.eval.export import export_backbone
    from fastcl.eval.linear import load_backbone

    for path in (tmp_path / "checkpoint.pth", tmp_path / "backbone.pth"):
        for load in (export_backbone, load_backbone):
            with pytest.raises(ValueError, match="LabEncoders.*no torchvision/timm counterpart"):
                load(path)
