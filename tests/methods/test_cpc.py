"""CPC v2 (fastcl.methods.cpc + recipes/cpcv2_r50.py): the patch grid, the row-causal context network, the
loss against a float64 transcription of the InfoNCE over patches, layer norm in the encoder, and a short
run on real CIFAR-10."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.methods.base import Step
from fastcl.methods.cpc import CPC, ContextNetwork, bn_to_layernorm, patchify
from fastcl.models import build_backbone
from recipe_loader import load_recipe

recipe = load_recipe("cpcv2_r50")


class PoolNet(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(12, d)

    def forward(self, x):
        return torch.tanh(self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)))


def tiny_cpc(**kw):
    torch.manual_seed(0)
    kw = dict(patch=4, stride=2, hidden=8, n_blocks=2, steps=3) | kw
    return CPC(PoolNet(), 6, **kw)


def test_patchify_is_the_overlapping_grid():
    x = torch.randn(2, 3, 16, 16)
    p, G = patchify(x, 4, 2)
    assert G == 7 and p.shape == (2 * 49, 3, 4, 4)  # 7x7 patches with half overlap, as 64px/32 on 256px
    for b, i, j in [(0, 0, 0), (1, 6, 6), (1, 2, 5)]:
        torch.testing.assert_close(p[b * 49 + i * 7 + j], x[b, :, 2 * i:2 * i + 4, 2 * j:2 * j + 4])
    assert patchify(torch.randn(1, 3, 256, 256), 64, 32)[1] == 7  # the paper's grid
    with pytest.raises(ValueError, match="not tiled"):
        patchify(torch.randn(1, 3, 17, 17), 4, 2)


def test_context_is_causal_over_rows():
    torch.manual_seed(0)
    net = ContextNetwork(5, 8, n_blocks=3)
    z = torch.randn(2, 5, 7, 7)
    c = net(z)
    for i in range(6):
        z2 = z.clone()
        z2[:, :, i + 1:] = torch.randn_like(z2[:, :, i + 1:])  # change every row below i
        c2 = net(z2)
        torch.testing.assert_close(c2[:, :, :i + 1], c[:, :, :i + 1])  # rows <= i unchanged
        assert not torch.allclose(c2[:, :, i + 1:], c[:, :, i + 1:])


@pytest.mark.parametrize("directions", [1, 4])
def test_loss_matches_infonce_over_patches_float64(directions):
    cpc = tiny_cpc(directions=directions).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)  # 5x5 grid
    out = cpc([x], Step(0, 0, 1, 1, {}))
    with torch.no_grad():
        p, G = patchify(x, 4, 2)
        z = cpc.backbone.encoder(p).view(2, G, G, 6)  # z[b, i, j]
        terms = []
        for d in range(directions):
            zd = torch.rot90(z, d, (1, 2))  # direction d as top-to-bottom
            c = cpc.context[d](zd.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # c[b, i, j]
            keys = [zd[b, u, v] for b in range(2) for u in range(G) for v in range(G)]
            for k in range(1, 4):
                W = cpc.predictors[d][k - 1]
                total, n = 0.0, 0
                for b in range(2):
                    for i in range(G - k):
                        for j in range(G):
                            z_hat = W.weight[:, :, 0, 0] @ c[b, i, j] + W.bias  # ẑ_{i+k,j} = W_k c_ij
                            pos = math.exp(float(z_hat @ zd[b, i + k, j]))
                            denom = sum(math.exp(float(z_hat @ zl)) for zl in keys)
                            total += -math.log(pos / denom)
                            n += 1
                terms.append(total / n)
    # fp32 inside the loss core (as under AMP): fp32 tolerance
    assert float(out["loss"].detach()) == pytest.approx(np.mean(terms), rel=1e-5)


def test_everything_gets_gradients_and_layernorm_encoder():
    cpc = tiny_cpc(directions=4)
    cpc([torch.randn(2, 3, 12, 12)], Step(0, 0, 1, 1, {}))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cpc.parameters())
    net = bn_to_layernorm(build_backbone("resnet18")[0])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in net.modules()) == 20
    assert cpc.backbone(torch.randn(3, 3, 12, 12)).shape == (3, 6)  # mean patch feature


@pytest.mark.parametrize("kw,name", [(dict(steps=0), "steps"), (dict(directions=2), "directions"),
                                     (dict(n_blocks=-1), "n_blocks"), (dict(stride=5), "stride")])
def test_bad_hyperparameters_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        tiny_cpc(**kw)


def test_presets():
    p = recipe.get_args_parser()
    a = recipe.cli.parse_args(p, recipe.PRESETS, ["--data", "/imagenet"])
    assert (a.arch, a.crop_size, a.patch, a.stride, a.directions, a.steps, a.optimizer, a.batch_size) == \
        ("resnet50", 256, 64, 32, 4, 5, "adamw", 512)
    a = recipe.cli.parse_args(p, recipe.PRESETS, [])
    assert (a.preset, a.arch, a.crop_size, a.patch, a.stride) == ("cifar", "resnet18_cifar", 32, 8, 4)
    assert (a.crop_size - a.patch) // a.stride + 1 == 7  # the same 7x7 grid on CIFAR


def test_recipe_runs_on_cifar10_and_loss_falls(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core CI box: one thread is faster than two contended ones
    try:
        torch.manual_seed(0)
        # 16px crops -> 7x7 grid of 4px patches; ResNet-18 (ImageNet stem: cheap on 4px patches); a few
        # repeated steps on one fixed batch of 8 real images (fresh augmentations every step)
        res = recipe.main(["--max-steps", "12", "--batch-size", "8", "--train-samples", "8", "--no-knn",
                           "--out", str(tmp_path), "--workers", "0", "--data-backend", "torch",
                           "--arch", "resnet18", "--crop-size", "16", "--patch", "4", "--stride", "2",
                           "--context-dim", "32", "--context-blocks", "1", "--steps", "2", "--directions", "1",
                           "--lr", "0.01", "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res["step"] == 12 and (tmp_path / "backbone.pth").exists()
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    early, late = np.mean(losses[:4]), np.mean(losses[-4:])
    assert late < early - 0.3, (early, late, losses)
