"""SimSiam: loss vs the paper's Algorithm 1 (float64), the stop-gradient, the predictor's fixed lr and
decay on every parameter, the heads' shapes, hyperparameter checks, and a short run of the recipe on
real CIFAR-10 (loss falls, no collapse)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcl.engine import TrainConfig, Trainer
from fastcl.engine.distributed import DistInfo
from fastcl.methods.base import Step
from fastcl.methods.simsiam import SimSiam
from recipe_loader import load_recipe

recipe = load_recipe("simsiam_r50")
STEP = Step(0, 0, 1, 1, {"lr": 0.1})


def log_records(out_dir):
    return [r for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if "loss" in r]


def tiny_simsiam(**kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU())
    return SimSiam(net, 16, **{"dim": 12, "proj_hidden": 24, "pred_hidden": 6, **kw})


def literal_loss(p1, p2, z1, z2):
    """Algorithm 1: D(p, z) = -(p/||p||_2 . z/||z||_2); L = D(p1, z2)/2 + D(p2, z1)/2, batch mean."""
    def D(p, z):
        pn = [float(a) / math.sqrt(sum(float(b) ** 2 for b in p)) for a in p]
        zn = [float(a) / math.sqrt(sum(float(b) ** 2 for b in z)) for a in z]
        return -sum(a * b for a, b in zip(pn, zn))
    n = len(p1)
    return sum(D(p1[i], z2[i]) / 2 + D(p2[i], z1[i]) / 2 for i in range(n)) / n


def test_loss_matches_paper_formula_float64():
    m = tiny_simsiam().double()
    x1, x2 = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    loss = m([x1, x2], STEP)["loss"]
    with torch.no_grad():
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
    assert float(loss.detach()) == pytest.approx(literal_loss(p1, p2, z1, z2), rel=1e-10)


def test_stop_gradient_on_the_target_branch():
    m = tiny_simsiam().double()
    x1, x2 = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    m([x1, x2], STEP)["loss"].backward()
    got = [p.grad.clone() for p in m.parameters()]

    def grads(stop):
        m.zero_grad()
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        cos = nn.functional.cosine_similarity
        (-0.5 * cos(p1, t2).mean() - 0.5 * cos(p2, t1).mean()).backward()
        return [p.grad.clone() for p in m.parameters()]

    for g, r in zip(got, grads(stop=True)):
        torch.testing.assert_close(g, r)
    assert any(not torch.allclose(g, r) for g, r in zip(got, grads(stop=False)))  # it matters


def test_heads_are_the_papers():
    m = SimSiam(nn.Identity(), 2048)
    lin = [mod for mod in m.projector.modules() if isinstance(mod, nn.Linear)]
    bns = [mod for mod in m.projector.modules() if isinstance(mod, nn.BatchNorm1d)]
    assert [(l.in_features, l.out_features) for l in lin] == [(2048, 2048)] * 3
    assert len(bns) == 3 and not bns[-1].affine and bns[0].affine  # BN on every fc, output BN without affine
    assert all(l.bias is None for l in lin)  # fc followed by BN: no bias
    lin = [mod for mod in m.predictor.modules() if isinstance(mod, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(2048, 512), (512, 2048)]
    assert lin[-1].bias is not None and len([b for b in m.predictor.modules() if isinstance(b, nn.BatchNorm1d)]) == 1
    assert len([mod for mod in tiny_simsiam(proj_layers=2).projector.modules() if isinstance(mod, nn.Linear)]) == 2


class OneBatchLoader:
    def __len__(self):
        return 5

    def set_epoch(self, epoch, start=0):
        pass


def test_predictor_fixed_lr_and_decay_on_all_parameters(tmp_path):
    m = tiny_simsiam()
    groups = m.param_groups(1e-4)
    n_params = len(list(m.parameters()))
    assert sum(len(g["params"]) for g in groups) == n_params
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # BN and biases are decayed too, as in the paper
    pred = [g for g in groups if g.get("fixed_lr")]
    assert len(pred) == 1 and {id(p) for p in pred[0]["params"]} == {id(p) for p in m.predictor.parameters()}
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=4, lr=0.2, weight_decay=1e-4, resume="none")
    trainer = Trainer(m, OneBatchLoader(), cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    for s in (0, 7, 19):  # the encoder follows the cosine, the predictor stays at the base lr
        trainer._apply_schedules(s)
        lrs = [(g.get("fixed_lr", False), g["lr"]) for g in trainer.optimizer.param_groups]
        cos = 0.1 * (1 + math.cos(math.pi * s / 20))
        assert lrs == [(False, pytest.approx(cos)), (True, 0.2)]
    trainer.logger.close()
    assert all(g["fixed_lr"] is False for g in tiny_simsiam(fix_pred_lr=False).param_groups(1e-4) if "fixed_lr" in g)


@pytest.mark.parametrize("kw, bad", [(dict(dim=0), "dim"), (dict(pred_hidden=-2), "pred_hidden"),
                                     (dict(proj_layers=0), "proj_layers")])
def test_bad_hyperparameters_raise(kw, bad):
    with pytest.raises(ValueError, match=bad):
        tiny_simsiam(**kw)


def test_imagenet_preset_is_the_papers():
    args = recipe.cli.parse_args(recipe.get_args_parser(), recipe.PRESETS, ["--data", "/x", "--out", "/tmp/x"])
    assert (args.arch, args.epochs, args.batch_size, args.lr, args.optimizer, args.wd, args.momentum,
            args.proj_layers, args.dim, args.pred_hidden, args.no_fix_pred_lr, args.crop_size) == \
        ("resnet50", 100, 512, 0.05, "sgd", 1e-4, 0.9, 3, 2048, 512, False, 224)


def test_recipe_runs_on_cifar10_loss_falls_no_collapse(tmp_path):
    torch.manual_seed(0)
    n, dim = 8, 256
    res = recipe.main(["--max-steps", str(n), "--batch-size", "8", "--no-knn", "--out", str(tmp_path),
                       "--workers", "0", "--data-backend", "torch", "--crop-size", "16", "--proj-hidden", "256",
                       "--pred-hidden", "64", "--dim", str(dim), "--lr", "4.0", "--log-every", "1",
                       "--epochs", "1"])
    assert res["step"] == n and (tmp_path / "backbone.pth").exists()
    recs = log_records(tmp_path)
    losses = [r["loss"] for r in recs]
    assert len(losses) == n and all(math.isfinite(v) and -1 <= v <= 1 for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    # collapse indicator: per-dimension std of the L2-normalized projections stays near 1/sqrt(d)
    # (a collapsed network gives 0); tiny batches / short runs sit a little below 1/sqrt(d)
    z_std = [r["z_std"] for r in recs]
    assert min(z_std[-3:]) > 0.3 / math.sqrt(dim), z_std
