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
