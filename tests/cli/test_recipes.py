"""Every recipe, as a user starts it: its presets resolve with no arguments and with --data, its augmentation
spec runs on both data back ends with the same output, and the README's main command runs under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcl import cli
from fastcl.engine.distributed import DistInfo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "methods"))
from recipe_loader import load_recipe  # noqa: E402

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _parser(recipe):
    return (recipe.get_args_parser if hasattr(recipe, "get_args_parser") else recipe.dino.get_args_parser)()


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("argv", [[], ["--data", "/imagenet"]], ids=["no-args", "imagenet"])
def test_presets_resolve_every_argument(name, argv):
    recipe = load_recipe(name)
    args = cli.parse_args(_parser(recipe), recipe.PRESETS, argv)  # exits naming any argument left without a value
    assert args.preset == ("imagenet" if argv else "cifar")
    assert args.batch_size > 0 and args.epochs > 0 and args.lr > 0


def _spec_of(recipe, argv, monkeypatch):
    """The spec the recipe's main hands to cli.run (run itself is not called)."""
    seen = {}

    def fake_run(args, name, build_method, spec, knn_size=None):
        seen.update(args=args, spec=spec)
        return {}

    monkeypatch.setattr(cli, "run", fake_run)
    recipe.main(argv)
    return seen["args"], seen["spec"]


@pytest.fixture(scope="module")
def cifar_jpeg_subset(tmp_path_factory):
    """80 of the cached CIFAR-10 train JPEGs (8 per class), so DALI does not pre-scan 50,000 files per recipe."""
    import shutil

    from fastcl.data.cifar10 import cifar10_imagefolder

    src, dst = cifar10_imagefolder() / "train", tmp_path_factory.mktemp("cifar_jpeg")
    for cls in sorted(d for d in src.iterdir() if d.is_dir()):
        (dst / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:8]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


@pytest.mark.parametrize("name", [n for n in RECIPES if n not in ("dino_vits16", "mocov3_vits16", "simclrv2_r50")])
def test_spec_gives_the_same_batch_layout_on_dali_and_torchvision(name, monkeypatch, cifar_jpeg_subset):
    pytest.importorskip("nvidia.dali")
    from fastcl.data import build as data_build

    monkeypatch.setattr(data_build, "train_root", lambda source: cifar_jpeg_subset)
    recipe = load_recipe(name)
    batches = {}
    for backend in ("dali", "torch"):
        args, spec = _spec_of(recipe, ["--batch-size", "4", "--workers", "1", "--data-backend", backend], monkeypatch)
        loader = cli.build_train_loader(args, spec, CPU)
        assert type(loader).__name__ == {"dali": "DaliLoader", "torch": "TorchLoader"}[backend]
        loader.set_epoch(0)
        views, labels, indices = next(iter(loader))
        batches[backend] = [(tuple(v.shape), v.dtype) for v in views]
        assert labels.shape == indices.shape == (4,) and 0 <= int(indices.min()) and int(indices.max()) < 50000  # (80 for DALI)
        for v in views:  # normalized images: finite, roughly zero-mean / unit-scale
            assert torch.isfinite(v).all() and v.abs().mean() < 3
    assert batches["dali"] == batches["torch"]
    assert len(batches["dali"]) == spec.num_views


@pytest.mark.slow
def test_readme_main_command_runs_under_torchrun(tmp_path):
    """`torchrun recipes/mocov2_r50.py` with no training arguments (the CPU lowers the preset batch), stopped
    after a few steps with a small kNN set."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "recipes" / "mocov2_r50.py"), "--max-steps", "3", "--knn-samples", "500", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "lowered to 64" in r.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 3 and 0.1 <= result["top1"] <= 1.0  # kNN ran on real CIFAR-10 (chance is 0.1)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in logged)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["config"]["batch_size"] == 64 and ckpt["args"]["data_backend"] == "auto"


def test_device_resident_back_end_runs_a_recipe_end_to_end(tmp_path):
    """--data-backend gpu (auto on CUDA for CIFAR-10) through a recipe, here on CPU tensors: training batches and
    the kNN monitor's come from the device-resident arrays."""
    from fastcl.data.gpu import DeviceLoader

    recipe = load_recipe("simclr_r50")
    built = {}
    real = cli.build_train_loader

    def spy(args, spec, dist):
        built["loader"] = real(args, spec, dist)
        return built["loader"]

    cli.build_train_loader = spy
    try:
        res = recipe.main(["--data-backend", "gpu", "--max-steps", "2", "--batch-size", "16", "--train-samples", "256",
                           "--knn-samples", "250", "--workers", "0", "--out", str(tmp_path), "--arch", "resnet18_cifar"])
    finally:
        cli.build_train_loader = real
    assert isinstance(built["loader"], DeviceLoader) and len(built["loader"]) == 16
    assert res["step"] == 2 and 0.0 <= res["top1"] <= 1.0


_HELP_PROBE = r"""
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit:
            pass
    out[path] = buf.getvalue()
print(json.dumps({"help": out, "torch_imported": "torch" in sys.modules}))
"""


def _help_blocks(text):
    """{'--flag': 'its help on one line'} from argparse's --help output."""
    blocks = {}
    for part in text.split("\n  -")[1:]:
        one = " ".join(("-" + part).split())
        blocks[one.split()[0].rstrip(",")] = one
    return blocks


def test_help_is_fast_states_every_default_and_each_recipes_own_presets():
    """--help parses before anything heavy is imported (torch took 3-40 s), and every flag states its default:
    a flag filled from a preset names each preset's value, taken from that recipe's PRESETS (dino_vits16 shares
    dino_vits8's parser and must show its own patch size, crop scales and norm_last_layer)."""
    paths = [str(ROOT / "recipes" / f"{r}.py") for r in RECIPES]
    res = subprocess.run([sys.executable, "-c", _HELP_PROBE, *paths], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    probe = json.loads(res.stdout)
    assert probe["torch_imported"] is False
    for name, path in zip(RECIPES, paths):
        text = probe["help"][path]
        blocks = _help_blocks(text)
        recipe = load_recipe(name)
        parser = recipe.get_args_parser() if hasattr(recipe, "get_args_parser") else recipe.dino.get_args_parser()
        for a in parser._actions:
            if not a.option_strings or a.dest == "help" or a.default is False:
                continue
            flag = max(a.option_strings, key=len) if a.option_strings[0].startswith("--no-") else a.option_strings[0]
            block = next(b for k, b in blocks.items() if k in a.option_strings)
            presets = [(p, v[a.dest]) for p, v in recipe.PRESETS.items() if a.dest in v]
            if a.default is None and presets:
                for p, v in presets:
                    shown = cli._shown(v)
                    assert f"{p} preset: {shown}" in block or f"default: {shown}" in block, (name, flag, block)
            else:
                assert "default" in block, (name, flag, block)
    dino16 = _help_blocks(probe["help"][paths[RECIPES.index("dino_vits16")]])
    assert "imagenet preset: 16; cifar preset: 8" in dino16["--patch-size"]
    assert "imagenet preset: true; cifar preset: true" in dino16["--norm-last-layer"] or \
        "default: true" in dino16["--norm-last-layer"]
    dino8 = _help_blocks(probe["help"][paths[RECIPES.index("dino_vits8")]])
    assert "imagenet preset: false; cifar preset: true" in dino8["--norm-last-layer"]
    assert "imagenet preset: 0.4 1; cifar preset: 0.32 1" in dino8["--global-crops-scale"]
    assert "default: 0.32 1" in dino16["--global-crops-scale"]  # its own: both presets 0.32-1


def test_simclr_cifar_fast_preset_is_the_record_runs_settings(monkeypatch, capsys):
    """--preset cifar_fast: dkobak/simclr-cifar10's settings (batch 1024, SGD 0.03 x B/256, wd 5e-4, no warm-up,
    projector hidden 1024, crops from 0.2); a recipe without that preset refuses it naming the choices."""
    recipe = load_recipe("simclr_r50")
    seen = {}
    monkeypatch.setattr(cli, "run", lambda args, name, build, spec, knn_size=None: seen.update(a=args, s=spec, b=build))
    recipe.main(["--preset", "cifar_fast"])
    a, spec = seen["a"], seen["s"]
    assert (a.batch_size, a.optimizer, a.lr, a.wd, a.warmup_epochs, a.temperature, a.hidden_dim, a.crop_min) == \
        (1024, "sgd", 0.03, 5e-4, 0, 0.5, 1024, 0.2)
    assert cli.train_config(a, "simclr_r50").lr == pytest.approx(0.12)  # 0.03 x 1024/256, as the reference
    view = spec.views[0]
    assert view.scale == (0.2, 1.0) and view.blur_p == 0.0
    assert (view.brightness, view.contrast, view.saturation, view.hue) == pytest.approx((0.4, 0.4, 0.4, 0.1))
    a.arch = "resnet18"
    head = seen["b"](a).projector
    assert [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)] == [1024, 128]
    seen.clear()
    recipe.main([])  # the paper's CIFAR preset is unchanged
    assert (seen["a"].hidden_dim, seen["a"].crop_min, seen["s"].views[0].scale) == (0, 0.08, (0.08, 1.0))
    mocov2 = load_recipe("mocov2_r50")
    with pytest.raises(SystemExit):
        mocov2.main(["--preset", "cifar_fast"])
    assert "invalid choice: 'cifar_fast'" in capsys.readouterr().err
