"""fastcl.viz: each picture's numbers checked against an independent reference, and bad input is one error line.

- attention: the CLS rows sum to 1 per head and equal a float64 softmax(q kᵀ / sqrt(d)) recomputed from the last
  block's input and weights (3 and 12 heads); the masks equal a transcription of DINO's visualize_attention.py;
- neighbors: every query's nearest neighbour in its own bank is itself, and the ranking equals a float64 brute force;
- curves: every logged step of every metric is a point of its line, against step and against minutes;
- bench: every bar is baseline_ms / fused_ms read from the JSON.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.viz import attention, bench, curves, neighbors

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "benchmarks" / "results" / "2026-12-04-h200"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _viz(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastcl.viz", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, cwd=cwd or ROOT, timeout=300)


def _one_error_line(r):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


class _Exit:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def guarded(capsys):
    """``python -m fastcl.viz ARGV`` in this process (its main through ``fastcl.cli.main_guard``, as the module
    entry runs it; a subprocess costs a torch import per call): returncode, stdout, stderr."""
    from fastcl.cli import main_guard
    from fastcl.viz.__main__ import main

    def call(*argv):
        capsys.readouterr()
        code = 0
        try:
            main_guard(lambda: main([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return _Exit(code, out.out, out.err)
    return call


def _tiny_vit(num_heads=3, seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8,
                             num_heads=num_heads).eval()


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    """An exported fastcl backbone file of a 12-head ViT-Ti with 8 px patches at 32 px (like MoCo v3's 12-head
    ViT-S: the head count is recorded, not in the weights)."""
    d = tmp_path_factory.mktemp("vit")
    vit = _tiny_vit(num_heads=12)
    path = d / "backbone.pth"
    torch.save({"backbone": vit.state_dict(), "arch": "vit_tiny_patch16_224", "model_kwargs": {"num_heads": 12}}, path)
    return path, vit


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    import torchvision

    d = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    path = d / "backbone.pth"
    torch.save({"backbone": sd, "arch": "resnet18_cifar", "model_kwargs": {}}, path)
    return path


def _image(path, size=48, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ attention
def _reference_cls_attention(vit, x):
    """float64: the last block's input, its norm1 and qkv weights, softmax(q kᵀ / sqrt(d)) of the CLS query."""
    seen = {}
    h = vit.blocks[-1].register_forward_pre_hook(lambda m, inp: seen.__setitem__("x", inp[0]))
    with torch.no_grad():
        vit(x)
    h.remove()
    blk = vit.blocks[-1]
    z = seen["x"].double()
    z = F.layer_norm(z, z.shape[-1:], blk.norm1.weight.double(), blk.norm1.bias.double(), blk.norm1.eps)
    qkv = z @ blk.attn.qkv.weight.double().T + blk.attn.qkv.bias.double()  # (B, N, 3C)
    C = z.shape[-1]
    H = blk.attn.num_heads
    d = C // H
    q = qkv[..., :C].unflatten(-1, (H, d)).transpose(1, 2)  # (B, H, N, d)
    k = qkv[..., C:2 * C].unflatten(-1, (H, d)).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return a[:, :, 0]  # (B, H, N)


@pytest.mark.parametrize("heads", [3, 12])
def test_cls_attention_is_the_float64_softmax_and_sums_to_one(heads):
    vit = _tiny_vit(heads, seed=heads)
    x = torch.randn(2, 3, 32, 32)
    got = attention.cls_attention(vit, x)
    ref = _reference_cls_attention(vit, x)
    assert got.shape == (2, heads, 1 + 16)
    torch.testing.assert_close(got.double().sum(-1), torch.ones(2, heads, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-4)
    maps = attention.patch_maps(vit, got)
    assert maps.shape == (2, heads, 4, 4)
    torch.testing.assert_close(maps.flatten(-2), got[..., 1:])  # patch columns, row-major on the grid


def _dino_masks(attentions, threshold):
    """visualize_attention.py (DINO), transcribed: attentions (nh, w*h) -> th_attn (nh, w*h)."""
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(attentions.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


@pytest.mark.parametrize("threshold", [0.6, 0.3, 0.9])
def test_masks_are_dinos_and_hold_the_threshold_mass(threshold):
    torch.manual_seed(1)
    maps = torch.rand(6, 5, 7) ** 4
    masks = attention.threshold_masks(maps, threshold)
    assert torch.equal(masks.flatten(1), _dino_masks(maps.flatten(1).clone(), threshold))
    p = maps.flatten(1) / maps.flatten(1).sum(1, keepdim=True)
    kept = (p * masks.flatten(1)).sum(1)
    smallest_kept = torch.where(masks.flatten(1), p, torch.inf).amin(1)
    assert bool((kept >= threshold - 1e-6).all()) and bool((kept - smallest_kept < threshold).all())  # minimal set


def test_attention_command_writes_the_picture_of_the_checkpoint(vit_ckpt, tmp_path):
    path, vit = vit_ckpt
    img = _image(tmp_path / "img.png", size=40)
    res = attention.run(path, img, out=tmp_path / "pics")
    assert res["png"] == tmp_path / "pics" / "attention_img.png" and res["png"].stat().st_size > 10_000
    # the numbers drawn: the model's attention on the image as loaded (fitted to 32 px; an export records no
    # training data, and a 32 px model is taken as CIFAR-trained: CIFAR-10's statistics)
    from fastcl.data.augment import CIFAR10_MEAN, CIFAR10_STD

    x = attention._normalize(attention.load_image(img, 32), CIFAR10_MEAN, CIFAR10_STD)
    ref = _reference_cls_attention(vit, x)[0]
    assert res["attn"].shape == (12, 17)
    torch.testing.assert_close(res["attn"].double(), ref, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(res["maps"].sum((-1, -2)).double() + ref[:, 0], torch.ones(12, dtype=torch.float64),
                               atol=1e-5, rtol=0)  # patches + CLS = the whole row
    assert torch.equal(res["masks"], attention.threshold_masks(res["maps"], 0.6))
    r = _viz("attention", "--checkpoint", path, "--image", img, "--out", tmp_path / "cli")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'cli' / 'attention_img.png'}" in r.stdout


def test_attention_bad_input_is_one_error_line(vit_ckpt, resnet_ckpt, tmp_path, guarded):
    path, _ = vit_ckpt
    img = _image(tmp_path / "img.png")
    line = _one_error_line(_viz("attention", "--checkpoint", resnet_ckpt, "--image", img))  # the real entry point
    assert "resnet18_cifar, not a ViT" in line
    assert "no such file" in _one_error_line(guarded("attention", "--checkpoint", tmp_path / "nope.pth", "--image", img))
    assert "no such file" in _one_error_line(guarded("attention", "--checkpoint", path, "--image", tmp_path / "no.jpg"))
    (tmp_path / "text.png").write_text("not an image")
    assert "cannot identify image" in _one_error_line(guarded("attention", "--checkpoint", path, "--image",
                                                              tmp_path / "text.png"))
    (tmp_path / "junk.pth").write_bytes(b"\0" * 64)
    assert "torch.load" in _one_error_line(guarded("attention", "--checkpoint", tmp_path / "junk.pth", "--image", img))
    assert "--threshold must be in (0, 1)" in _one_error_line(guarded("attention", "--checkpoint", path, "--image", img,
                                                                      "--threshold", "1.5"))
    assert not list(tmp_path.rglob("*attention*.png"))


# ------------------------------------------------------------------------------------------------ neighbors
def test_nearest_neighbors_rank_like_a_float64_brute_force():
    torch.manual_seed(0)
    feats = torch.randn(300, 32) * torch.rand(300, 1) * 5  # unnormalized rows: cosine must not see the norms
    q = torch.tensor([0, 17, 150, 299])
    idx, sims = neighbors.nearest_neighbors(feats, q, k=10)
    assert torch.equal(idx[:, 0], q)  # each query's nearest neighbour in its own bank is itself
    torch.testing.assert_close(sims[:, 0], torch.ones(4), atol=1e-6, rtol=0)
    f = feats.double() / feats.double().norm(dim=1, keepdim=True)
    ref = (f[q] @ f.T).argsort(dim=1, descending=True)[:, :11]
    assert torch.equal(idx, ref)


def _folder(root, classes=("cat", "dog"), per_class=6, flat=False):
    for c in classes:
        d = root if flat else root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(d / f"{c}_{i}.png", size=40, seed=hash((c, i)) % 1000)
    return root


@pytest.mark.parametrize("layout", ["imagenet", "classes", "unlabeled"])
def test_neighbors_of_a_folder_start_with_the_query(resnet_ckpt, tmp_path, layout):
    root = tmp_path / "data"
    if layout == "imagenet":
        _folder(root / "train")
        _folder(root / "val")
    else:
        _folder(root, flat=layout == "unlabeled")
    res = neighbors.run(resnet_ckpt, str(root), k=3, queries=5, samples=0, out=tmp_path / "pics")
    assert res["png"] == tmp_path / "pics" / "neighbors_data.png" and res["png"].exists()
    assert res["feats"].shape == (12, 512)
    assert torch.equal(res["neighbors"][:, 0], res["queries"]) and res["neighbors"].shape == (5, 4)
    expected = [-1] * 12 if layout == "unlabeled" else [0] * 6 + [1] * 6
    assert res["labels"].tolist() == expected


def test_neighbors_on_cifar10_from_the_command_line(resnet_ckpt, tmp_path):
    r = _viz("neighbors", "--checkpoint", resnet_ckpt, "--data", "cifar10", "--samples", "200", "--k", "4",
             "--queries", "3", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'neighbors_cifar10.png'}" in r.stdout and "sharing the query's label" in r.stdout
    res = neighbors.run(resnet_ckpt, "cifar10", k=4, queries=3, samples=200, out=tmp_path)
    assert torch.equal(res["neighbors"][:, 0], res["queries"])
    from fastcl.data.cifar10 import load_cifar10

    _, labels = load_cifar10(split="train")
    bank = torch.randperm(50000, generator=torch.Generator().manual_seed(0))[:200].sort().values
    assert res["labels"].tolist() == labels[bank.numpy()].tolist()  # the seeded subset, with its labels


def test_neighbors_bad_input_is_one_error_line(resnet_ckpt, tmp_path, guarded):
    assert "no such folder" in _one_error_line(guarded("neighbors", "--checkpoint", resnet_ckpt, "--data", tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    assert "no image files" in _one_error_line(guarded("neighbors", "--checkpoint", resnet_ckpt, "--data",
                                                       tmp_path / "empty"))
    assert "--k must be >= 1" in _one_error_line(guarded("neighbors", "--checkpoint", resnet_ckpt, "--k", "0"))
    assert "no such file" in _one_error_line(guarded("neighbors", "--checkpoint", tmp_path / "none.pth"))
    _folder(tmp_path / "small", per_class=1)
    assert "--queries 3 is more than the 2 images" in _one_error_line(
        guarded("neighbors", "--checkpoint", resnet_ckpt, "--data", tmp_path / "small", "--queries", "3"))


# ------------------------------------------------------------------------------------------------ curves
def _write_log(run, n_steps=12, every=2, knn_every=4, rankme=True, t0=1_700_000_000.0):
    run.mkdir(parents=True, exist_ok=True)
    recs = []
    for s in range(every, n_steps + 1, every):
        recs.append({"step": s, "epoch": s // 4, "lr": 0.1 * s / n_steps, "loss": 8 - 0.3 * s,
                     "img_per_s": 100.0 + s, "time": t0 + 3.0 * s})
        if s % knn_every == 0:
            recs.append({"step": s, "epoch": s // 4, "knn_top1": 0.1 + 0.02 * s, "knn_top5": 0.5, "time": t0 + 3.0 * s + 1})
            if rankme:
                recs.append({"step": s, "epoch": s // 4, "rankme": 10.0 + s, "rankme_max": 64, "emb_std": 0.1 / s,
                             "emb_std_ref": 0.125, "time": t0 + 3.0 * s + 2})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_curves_carry_every_logged_step(tmp_path):
    recs_a = _write_log(tmp_path / "a")
    recs_b = _write_log(tmp_path / "b", n_steps=20, every=5, knn_every=10, rankme=False)
    res = curves.run([tmp_path / "a", tmp_path / "b"])
    assert res["png"] == tmp_path / "curves.png" and res["png"].exists()  # the runs' common parent
    fig = curves.curves_figure(res["runs"])
    rows = {ax.get_ylabel(): i for i, ax in enumerate(fig.axes[0::2])}
    assert list(rows) == ["loss", "learning rate", "kNN top-1", "RankMe", "embedding std", "img/s"]
    for name, recs in (("a", recs_a), ("b", recs_b)):
        t0 = recs[0]["time"]
        for metric, label in curves.METRICS:
            want = [(r["step"], r[metric], (r["time"] - t0) / 60) for r in recs if metric in r]
            ax_step, ax_time = fig.axes[2 * rows[label]], fig.axes[2 * rows[label] + 1]
            lines = [ln for ln in ax_step.lines if ln.get_label() == name]
            if not want:
                assert not lines and metric not in res["runs"][name]
                continue
            (line,) = lines
            assert list(line.get_xdata()) == [w[0] for w in want]
            assert list(line.get_ydata()) == [w[1] for w in want]
            (tline,) = [ln for ln in ax_time.lines if ln.get_label() == name]
            np.testing.assert_allclose(tline.get_xdata(), [w[2] for w in want])
            assert list(tline.get_ydata()) == [w[1] for w in want]


def test_curves_of_the_h200_cifar_run(tmp_path):
    """The committed log of the 26-epoch MoCo v2 run: 127 training records, 7 kNN evaluations, all drawn."""
    run = tmp_path / "cifar"
    run.mkdir()
    (run / "log.jsonl").write_bytes((H200 / "cifar_mocov2_log.jsonl").read_bytes())
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    res = curves.run([run], out=tmp_path / "pics")
    c = res["runs"]["cifar"]
    assert c["loss"]["step"] == [r["step"] for r in recs if "loss" in r]
    assert c["knn_top1"]["value"] == [r["knn_top1"] for r in recs if "knn_top1" in r]
    assert c["knn_top1"]["value"][-1] == 0.5799 and len(c["knn_top1"]["step"]) == 7
    assert res["png"] == tmp_path / "pics" / "curves.png"


def test_curves_bad_input_is_one_error_line(tmp_path, guarded):
    (tmp_path / "empty").mkdir()
    assert "no log.jsonl" in _one_error_line(_viz("curves", tmp_path / "empty"))  # the real entry point
    assert "no such folder" in _one_error_line(guarded("curves", tmp_path / "missing"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "log.jsonl").write_text("")
    assert "no records" in _one_error_line(guarded("curves", tmp_path / "blank"))
    _write_log(tmp_path / "bad")
    lines = (tmp_path / "bad" / "log.jsonl").read_text().splitlines()
    (tmp_path / "bad" / "log.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    assert "line 3: not JSON" in _one_error_line(guarded("curves", tmp_path / "bad"))
    _write_log(tmp_path / "torn")
    with open(tmp_path / "torn" / "log.jsonl", "a") as f:
        f.write('{"step": 14, "lo')  # a run killed mid-write: the torn last line is skipped
    r = guarded("curves", tmp_path / "torn")
    assert r.returncode == 0 and "cut short" in r.stderr and (tmp_path / "torn" / "curves.png").exists()
    (tmp_path / "afile").write_text("x")  # --out under a file (was: "[Errno 20] Not a directory", no flag named)
    _write_log(tmp_path / "good")
    assert "--out " + str(tmp_path / "afile" / "x") + ": cannot write there" in _one_error_line(
        guarded("curves", tmp_path / "good", "--out", tmp_path / "afile" / "x"))


def test_without_matplotlib_a_picture_command_is_one_error_line(tmp_path, guarded, monkeypatch):
    """matplotlib is an optional extra ('.[viz]'): without it the command names the package to install (was: a
    ModuleNotFoundError traceback, which is what CI printed when it was missing from the dev extra)."""
    _write_log(tmp_path / "run")
    for m in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    line = _one_error_line(guarded("curves", tmp_path / "run"))
    assert "matplotlib" in line and "pip install" in line
    assert not (tmp_path / "run" / "curves.png").exists()


# ------------------------------------------------------------------------------------------------ bench
def test_bench_ratios_are_baseline_over_fused_from_the_json(tmp_path):
    data = json.loads((H200 / "bench_kernels.json").read_text())
    rows = bench.bench_rows(bench.read_results([H200 / "bench_kernels.json"]))
    by = {(r["name"], r["variant"]): r for r in rows}
    for b in data["benchmarks"]:
        e, name = b["extra_info"], b["name"].removeprefix("test_")
        if "triton_ms" in e:
            r = by[(name, "triton")]
            assert r["baseline"] == "torch" and r["ratio"] == e["torch_ms"] / e["triton_ms"]
        else:  # EMA: the fused kernel against torch._foreach_lerp_ (the per-parameter loop is not drawn)
            r = by[(name, "kernel")]
            assert r["baseline"] == "foreach" and r["ratio"] == e["foreach_ms"] / e["kernel_ms"]
            assert (name, "loop") not in by
        if "floor_ms" in e:
            fused = e.get("triton_ms", e.get("kernel_ms"))
            assert r["variant_floor_x"] == fused / e["floor_ms"]
        else:
            assert r["variant_floor_x"] is None
    assert len(rows) == len(data["benchmarks"])
    # what is drawn: bar i (top to bottom) has width rows[i]["ratio"]; the floor panel's fused bars the multiples
    fig = bench.bench_figure(rows)
    bars = sorted(fig.axes[0].patches, key=lambda p: -p.get_y())
    assert [p.get_width() for p in bars] == [r["ratio"] for r in rows]
    floors = [r for r in rows if r["floor_ms"]]
    fused_bars = sorted([p for p in fig.axes[1].patches if p.get_facecolor()[:3] != (0.827, 0.827, 0.827)
                         and abs(p.get_height() - 0.36) < 1e-9], key=lambda p: -p.get_y())
    assert sorted(p.get_width() for p in fused_bars) == sorted(
        [r["variant_floor_x"] for r in floors] + [r["baseline_floor_x"] for r in floors])
    # a folder: every pytest-benchmark JSON in it, other JSON skipped (cifar_run.json); the train step vs its hand loop
    r = _viz("bench", H200, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'bench_ratios.png'}" in r.stdout
    step = json.loads((H200 / "bench_train_step.json").read_text())["benchmarks"][0]["extra_info"]
    assert f"fused {step['hand_ms'] / step['fused_ms']:.2f}x vs hand" in r.stdout


def test_bench_bad_input_is_one_error_line(tmp_path, guarded):
    assert "no such file" in _one_error_line(guarded("bench", tmp_path / "none.json"))
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert "no 'benchmarks' list" in _one_error_line(guarded("bench", tmp_path / "x.json"))
    (tmp_path / "d").mkdir()
    assert "no pytest-benchmark JSON" in _one_error_line(guarded("bench", tmp_path / "d"))


# ------------------------------------------------------------------------------------------------ CLI
def test_help_answers_without_torch_or_matplotlib():
    probe = ("import runpy, sys\nsys.argv = ['fastcl.viz', '--help']\ntry:\n    runpy.run_module('fastcl.viz', "
             "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('heavy', sorted(m for m in ('torch', "
             "'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "heavy []" in r.stdout and "attention" in r.stdout and "neighbors" in r.stdout
