"""SEER-style SwAV on RegNetY (recipes/swav_regnety.py): RegNetY backbones are torchvision's modules (exported
weights load into torchvision, SEER's 256GF into torchvision's RegNet class), the ImageNet preset carries VISSL's
SEER settings, and the recipe trains on CIFAR-10 on the CPU -- under torchrun with ZeRO-2, LARS and --grad-ckpt too."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from fastcl import cli
from fastcl.eval.export import load_into_reference
from fastcl.models import build_backbone
from fastcl.models.backbones import SEER_REGNET_Y_256GF
from recipe_loader import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_regnet_backbone_weights_load_into_torchvision():
    torch.manual_seed(0)
    net, dim = build_backbone("regnet_y_400mf")
    assert dim == 440
    ref = torchvision.models.regnet_y_400mf()
    missing, unexpected = ref.load_state_dict(net.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(2, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    torch.testing.assert_close(ref.eval()(x), net.eval()(x))
    loaded = load_into_reference(net.state_dict(), "regnet_y_400mf")  # what export / load_backbone do
    torch.testing.assert_close(loaded.eval()(x), net(x))
    params = torchvision.models.regnet.BlockParams.from_init_params(**SEER_REGNET_Y_256GF)
    with torch.device("meta"):  # SEER's RegNetY-256GF: torchvision's RegNet class with VISSL's parameters
        seer, d = build_backbone("regnet_y_256gf")
        tv = torchvision.models.RegNet(params)
    assert d == 10444 and set(tv.state_dict()) - set(seer.state_dict()) == {"fc.weight", "fc.bias"}
    assert sum(p.numel() for p in seer.parameters()) / 1e9 == pytest.approx(1.27, abs=0.05)  # SEER: "1.3B"


def test_imagenet_preset_is_seers():
    r = load_recipe("swav_regnety")
    a = cli.parse_args(r.get_args_parser(), r.PRESETS, ["--data", "/imagenet"])
    assert (a.arch, a.n_prototypes, a.hidden, a.dim, a.proj_layers, a.proj_bn) == (
        "regnet_y_256gf", 16000, 8192, 256, 3, False)
    assert (a.epsilon, a.sinkhorn_iters, a.temperature, a.crop_size, a.local_crop_size, a.n_local) == (
        0.03, 10, 0.1, 224, 96, 4)
    assert (a.optimizer, a.lr, a.wd, a.batch_size) == ("lars", 0.3, 1e-5, 8192)
    assert a.warmup_epochs / a.epochs == pytest.approx(0.043648) and a.min_lr == pytest.approx(0.3 * 32 / 1000)
    with torch.device("meta"):
        m = r.build_method(a)
    linears = [l for l in m.projector.modules() if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10444, 8192), (8192, 8192), (8192, 256)]
    assert not any(isinstance(l, torch.nn.BatchNorm1d) for l in m.projector.modules())
    assert m.prototypes.weight.shape == (16000, 256)
    groups = m.param_groups(1e-5)  # LARC with weight decay on every parameter, one group
    assert len(groups) == 1 and not groups[0].get("lars_exclude")


SMOKE = ["--train-samples", "16", "--batch-size", "8", "--max-steps", "2", "--no-knn", "--workers", "0",
         "--data-backend", "torch", "--log-every", "1"]


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.slow
def test_recipe_trains_on_cifar10(tmp_path):
    res = load_recipe("swav_regnety").main([*SMOKE, "--out", str(tmp_path)])
    assert res["step"] == 2 and all(math.isfinite(v) for v in _losses(tmp_path))
    sd = torch.load(tmp_path / "backbone.pth", weights_only=False)["backbone"]
    assert any(k.startswith("trunk_output.block4") for k in sd)


@pytest.mark.slow
def test_recipe_runs_under_torchrun_with_zero2_lars_and_grad_ckpt(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "recipes" / "swav_regnety.py"), *SMOKE, "--zero-stage", "2", "--grad-ckpt",
           "--freeze-prototypes-epochs", "1", "--out", str(tmp_path)]  # (the 2 steps skip the prototypes' update)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert len(_losses(tmp_path)) == 2 and all(math.isfinite(v) for v in _losses(tmp_path))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["zero"]["stage"] == 2 and ckpt["config"]["optimizer"] == "lars" and ckpt["config"]["grad_ckpt"]
