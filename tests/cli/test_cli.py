"""What every recipe shares (fastcl.cli): the CPU batch cap for preset batches, and val labels of an ImageFolder
dataset following the train split's class order."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcl import cli
from fastcl.data import build as data_build
from fastcl.engine.distributed import DistInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from recipe_loader import load_recipe  # noqa: E402

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("argv, dist, batch", [
    ([], CPU, 64),  # the preset's 512 x 12 crops of ViT-S/8 does not fit 24 GB of host memory
    ([], DistInfo(1, 2, 1, torch.device("cpu")), 128),  # 64 per process
    ([], DistInfo(0, 1, 0, torch.device("cuda", 0)), 512),  # a GPU keeps the paper's batch
    (["--batch-size", "512"], CPU, 512),  # a batch the user asked for is theirs
    (["--batch-size", "32"], CPU, 32),
])
def test_cpu_lowers_only_a_preset_batch_and_lr_follows(argv, dist, batch, capsys):
    dino = load_recipe("dino_vits8")
    args = dino.cli.parse_args(dino.get_args_parser(), dino.PRESETS, argv)
    assert args.batch_size == int(argv[1]) if argv else 512
    cli.cap_cpu_batch(args, dist)
    assert args.batch_size == batch
    cfg = cli.train_config(args, "dino_vits8")
    assert cfg.batch_size == batch and cfg.lr == pytest.approx(0.0005 * batch / 256)
    lowered = "lowered to" in capsys.readouterr().err
    assert lowered == (batch != (int(argv[1]) if argv else 512) and dist.is_main)
    assert cfg.min_lr == pytest.approx(1e-6 * batch / 512 if not argv else 1e-6)  # the preset's final/peak kept


def test_cpu_cap_keeps_a_given_min_lr():
    swav = load_recipe("swav_r50")
    args = swav.cli.parse_args(swav.get_args_parser(), swav.PRESETS, ["--min-lr", "0.001"])
    cli.cap_cpu_batch(args, CPU)
    assert args.batch_size == 64 and args.min_lr == 0.001


def _image_folder(root: Path, classes, per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_val_labels_follow_train_classes(tmp_path):
    _image_folder(tmp_path / "train", ["ant", "bee", "cat"])
    _image_folder(tmp_path / "val", ["bee", "cat"])
    args = argparse.Namespace(data=str(tmp_path))
    assert data_build.dataset(args.data, "train", None).classes == ["ant", "bee", "cat"]
    # val on its own would label bee 0 and cat 1 (kNN against train's 1 and 2: silently wrong)
    with pytest.raises(FileNotFoundError, match="val/ant"):
        data_build.dataset(args.data, "val", None)
    _image_folder(tmp_path / "val", ["ant"])
    val = data_build.dataset(args.data, "val", None)
    assert val.classes == ["ant", "bee", "cat"]
    assert sorted(val[i][1] for i in range(len(val))) == [0, 0, 1, 1, 2, 2]


def test_missing_split_folder_names_it(tmp_path):
    _image_folder(tmp_path / "train", ["ant"])
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        data_build.dataset(str(tmp_path), "val", None)


def _guarded(recipe_name, argv, capsys):
    """Run a recipe's main as its __main__ does (through main_guard): (exit code, stderr without the
    CPU machine's "warning: no CUDA device" line)."""
    recipe = load_recipe(recipe_name)
    with pytest.raises(SystemExit) as e:
        cli.main_guard(lambda: recipe.main(argv))
    err = capsys.readouterr().err
    return e.value.code, "".join(l for l in err.splitlines(True) if not l.startswith("warning: no CUDA device"))


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    (["--max-steps", "-1"], "error: --max-steps must be >= 0, got -1"),
    (["--log-every", "0"], "error: --log-every must be >= 1, got 0"),
    (["--ckpt-every", "-1"], "error: --ckpt-every must be >= 0, got -1"),
    (["--knn-samples", "-5"], "error: --knn-samples must be >= 0, got -5"),
    (["--lr", "nan"], "error: --lr must be a finite number, got nan"),
    (["--lr", "0"], "error: --lr must be > 0.0, got 0.0"),
    (["--momentum", "1.5"], "error: --momentum must be in [0, 1), got 1.5"),
])
def test_nonsense_flags_are_refused_up_front_in_one_line(argv, message, tmp_path, capsys):
    code, err = _guarded("mocov2_r50", argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err.strip() == message
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("argv,message", [
    (["--kernels", "cuda"], "error: argument --kernels: invalid choice: 'cuda'"),
    (["--batch-size", "abc"], "error: argument --batch-size: invalid int value: 'abc'"),
    (["--epochs"], "error: argument --epochs: expected one argument"),
    (["--bogus", "1"], "error: unrecognized arguments: --bogus 1"),
    (["--preset", "nope"], "error: argument --preset: invalid choice: 'nope'"),
])
def test_argparse_errors_are_one_line_and_exit_1(argv, message, tmp_path, capsys):
    """What argparse itself refuses (a bad choice or type, a missing value, an unknown flag) follows the same
    contract as the checks above: one error line naming the flag, exit 1 (was: the whole usage block, ~40
    lines, and exit 2)."""
    code, err = _guarded("mocov2_r50", argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(message), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("module,argv,flag", [
    ("fastcl.viz.__main__", ["nope"], "invalid choice: 'nope'"),
    ("fastcl.viz.__main__", ["attention", "--image", "x.jpg"], "required: --checkpoint"),
    ("fastcl.eval.linear", ["--data", "cifar10"], "required: --checkpoint"),
    ("fastcl.eval.export", ["--checkpoint", "a", "--out", "b", "--format", "onnx"], "argument --format"),
    ("fastcl.data.shards", ["--src", "x", "--shard-size", "many"], "argument --shard-size"),
])
def test_every_command_line_tool_refuses_bad_flags_in_one_line(module, argv, flag, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: ") and flag in err, err


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_folder_of_undecodable_images_is_one_error_line(backend, tmp_path, capsys):
    """Every file is an image by name and none decodes: one error line naming the folder and a file (was: a
    RuntimeError traceback from DALI's pre-scan; through a torchvision DataLoader worker, the worker's whole
    traceback inside the message)."""
    bad = tmp_path / "photos"
    bad.mkdir()
    (bad / "a.jpg").write_text("not an image")
    (bad / "b.png").write_bytes(b"x")
    code, err = _guarded("simclr_r50", ["--data", str(bad), "--data-backend", backend, "--workers", "1",
                                        "--arch", "resnet18", "--batch-size", "2", "--max-steps", "1",
                                        "--knn-every", "0", "--out", str(tmp_path / "o")], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error") or "Traceback" in line]
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: {'--data ' if backend == 'dali' else ''}{bad}: none of its 2 image file(s)")
    assert "a.jpg" in lines[0]


def test_data_flags_name_themselves(tmp_path, capsys):
    """A wrong --eval-data is named as --eval-data (was: "--data /nonexistent: ..."), and one image given as
    --data is said to be one image (was: "not a text file listing image paths (it is not UTF-8 text)")."""
    from PIL import Image

    img = tmp_path / "cat.jpg"
    Image.new("RGB", (8, 8)).save(img)
    code, err = _guarded("simclr_r50", ["--data", str(img), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err.splitlines()[-1].startswith(f"error: --data {img}: one image file; --data takes"), err
    code, err = _guarded("simclr_r50", ["--data", str(tmp_path), "--eval-data", str(tmp_path / "nope"),
                                        "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err.splitlines()[-1] == (f"error: --eval-data {tmp_path / 'nope'}: no such file or folder "
                                                  "(--eval-data takes cifar10 or an ImageNet-layout folder "
                                                  "(train/<class>/*, val/<class>/*))"), err
    assert not (tmp_path / "o").exists()


def _refused_batch(recipe, batch, tmp_path, capsys) -> str:
    """``recipe`` on a folder of 6 small images with ``--batch-size batch``: its one error line (exit 1, nothing
    written is asserted here)."""
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    code, err = _guarded(recipe, ["--data", str(tmp_path), "--data-backend", "torch", "--batch-size", str(batch),
                                  "--arch", "resnet18", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and not (tmp_path / "o").exists(), err
    return err.splitlines()[-1]


@pytest.mark.parametrize("recipe", ["mocov1_r50", "mocov2_r50"])
def test_a_batch_that_split_bn_cannot_split_is_one_error_line(recipe, tmp_path, capsys):
    """MoCo's split BN on one device needs the batch to split into --bn-splits equal parts: said up front,
    naming both flags (was: "error: SplitBatchNorm2d: batch 3 is not divisible by num_splits=8" at the first
    step, after the run folder was made)."""
    assert _refused_batch(recipe, 3, tmp_path, capsys) == (
        "error: --batch-size 3 does not split into --bn-splits 8 equal sub-batches (split BN on one device): use a "
        "multiple of 8 or --bn-splits 1")


@pytest.mark.parametrize("recipe", ["byol_r50", "invaspread_r18", "simclr_r50"])
def test_one_image_per_process_is_refused_up_front(recipe, tmp_path, capsys):
    """--batch-size 1 on one process: was BN's "Expected more than 1 value per channel" (BYOL, SimSiam, MoCo v3),
    a non-finite loss blamed on the lr (InvaSpread) or a silent loss of 0 (SimCLR, no negative)."""
    assert _refused_batch(recipe, 1, tmp_path, capsys) == (
        "error: --batch-size 1 is fewer than 2 images per process (1 process(es)): in-batch negatives and BatchNorm "
        "need at least 2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --kernels triton is valid")
def test_triton_kernels_without_a_gpu_are_one_error_line(tmp_path, capsys, monkeypatch):
    """--kernels triton on a CPU machine without the interpreter (was: "RuntimeError: 0 active drivers ([]).
    There should only be one." from Triton at the first step, as a traceback)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = _guarded("mocov2_r50", ["--kernels", "triton", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err.splitlines()[-1].startswith("error: --kernels triton runs Triton kernels, which need a "
                                                         "CUDA device"), err
    assert not (tmp_path / "o").exists()


def _recipes_with_parsers():
    import glob
    import os

    for f in sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "recipes" / "*.py"))):
        recipe = load_recipe(os.path.basename(f)[:-3])
        if hasattr(recipe, "get_args_parser"):  # (dino_vits16 / vitb16 parse with dino_vits8's)
            yield recipe


def test_every_recipes_count_and_size_flags_refuse_a_negative_at_parse_time(capsys):
    """Every int flag of every recipe (queue sizes, head widths, patch sizes, crop counts, epochs of a phase)
    refuses -1 naming the flag, before torch builds anything (was: a "negative dimension" or ZeroDivisionError
    traceback from inside the model, or a silently accepted --n-local -1 / --local-crops-number -1)."""
    common = {a.dest for a in cli.base_parser()._actions}
    checked = 0
    for recipe in _recipes_with_parsers():
        for a in recipe.get_args_parser()._actions:
            if (not a.option_strings or a.dest in common or a.choices
                    or getattr(a.type, "__name__", None) != "int"):
                continue
            flag = a.option_strings[0]
            with pytest.raises(SystemExit) as e:
                cli.parse_args(recipe.get_args_parser(), recipe.PRESETS, [flag, "-1"])
            err = capsys.readouterr().err
            assert e.value.code == 1 and err.startswith(f"error: argument {flag}: must be >= "), (recipe, flag, err)
            checked += 1
    assert checked >= 60  # (the sweep found the flags)


@pytest.mark.parametrize("recipe,argv,message", [
    ("cmc_r50", ["--feat-dim", "0"], "argument --feat-dim: must be >= 1, got 0"),
    ("cpcv2_r50", ["--context-dim", "0"], "argument --context-dim: must be >= 1, got 0"),
    ("dino_vits8", ["--patch-size", "0"], "argument --patch-size: must be >= 1, got 0"),
    ("mocov3_vits16", ["--num-heads", "0"], "argument --num-heads: must be >= 1, got 0"),
    ("mocov3_r50", ["--mlp-dim", "0"], "argument --mlp-dim: must be >= 1, got 0"),
    ("simclr_r50", ["--dim", "0"], "argument --dim: must be >= 1, got 0"),
    ("mocov2_r50", ["--bn-splits", "0"], "argument --bn-splits: must be >= 1, got 0"),
    ("dino_vits8", ["--drop-path", "1.5"], "argument --drop-path: must be in [0.0, 1.0), got 1.5"),
    ("cmc_r50", ["--lr-decay-fracs", "0.5", "0"], "argument --lr-decay-fracs: must be in (0.0, 1.0), got 0.0"),
    ("simclr_r50", ["--jitter-strength", "-1"], "argument --jitter-strength: must be in [0.0, inf), got -1.0"),
])
def test_sizes_that_zero_would_break_are_refused_at_parse_time(recipe, argv, message, tmp_path, capsys):
    """A 0 width, patch or head count crashed inside the model (ZeroDivisionError, "select(): index 0 out of range"
    tracebacks); --bn-splits 0, --drop-path 1.5 or a decay at fraction 0 were taken silently."""
    code, err = _guarded(recipe, argv + ["--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err.strip() == f"error: {message} (--help lists the flags)", err
    assert not (tmp_path / "o").exists()


def test_bad_resume_files_are_one_error_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pth")
    for f, msg in (("notes.txt", "not a PyTorch checkpoint, or torn"), ("foreign.pth", "not a fastcl training")):
        code, err = _guarded("mocov2_r50", ["--resume", str(tmp_path / f), "--out", str(tmp_path / "o"),
                                            "--train-samples", "64", "--batch-size", "16", "--workers", "0",
                                            "--no-knn", "--max-steps", "1"], capsys)
        assert code == 1 and err.startswith("error: ") and msg in err and "Traceback" not in err
        assert err.count("\n") == 1


def test_out_at_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    code, err = _guarded("mocov2_r50", ["--out", str(tmp_path / "taken"), "--train-samples", "64", "--batch-size",
                                        "16", "--workers", "0", "--no-knn", "--max-steps", "1"], capsys)
    assert code == 1 and err.strip() == f"error: --out {tmp_path / 'taken'} is a file, not a folder"


def test_workers_0_keeps_auto_off_dali_and_dali_names_the_flags():
    from fastcl.data.build import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("/data", "auto", cpu, workers=0) == "torch"  # the bit-exact setting of README
    pytest.importorskip("nvidia.dali")
    with pytest.raises(ValueError, match="--data-backend dali needs --workers >= 1"):
        resolve_backend("/data", "dali", cpu, workers=0)


def test_cpu_caps_the_knn_bank_unless_given_and_the_banner_shows_resolved_values(tmp_path, capsys):
    argv = ["--max-steps", "1", "--batch-size", "16", "--train-samples", "64", "--workers", "0", "--out",
            str(tmp_path / "a")]
    seen = {}
    real = cli.build_knn_loaders

    def spy(args, dist, size):
        seen["knn_samples"] = args.knn_samples
        return None  # (no kNN work in this test)

    cli.build_knn_loaders = spy
    try:
        load_recipe("mocov2_r50").main(argv)
        err = capsys.readouterr().err
        assert seen["knn_samples"] == cli.CPU_KNN_SAMPLES and "pass --knn-samples 0 for all" in err
        load_recipe("mocov2_r50").main(argv[:-1] + [str(tmp_path / "b"), "--knn-samples", "0"])
        assert seen["knn_samples"] == 0
    finally:
        cli.build_knn_loaders = real
    printed = capsys.readouterr().out
    assert "resolved: data back end torchvision (0 workers), amp off, kernels torch, compile none, device cpu" in printed
    assert "lr 0.001875 (= 0.03 x 16/256)" in printed
    assert "batch_size_given" not in printed and "min_lr_given" not in printed


def test_sigterm_stops_a_run_in_one_line_and_keeps_the_checkpoint(tmp_path):
    """A scheduler's or torchrun's SIGTERM mid-run: one 'stopped by SIGTERM' line, exit 143, no traceback, and
    the checkpoint written before it still resumes (was: a long traceback)."""
    import os
    import signal
    import subprocess
    import time

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    cmd = [sys.executable, str(root / "recipes" / "mocov2_r50.py"), "--train-samples", "64", "--batch-size", "16",
           "--epochs", "500", "--no-knn", "--workers", "0", "--data-backend", "torch", "--device", "cpu",
           "--crop-size", "16", "--ckpt-every", "2", "--log-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pth").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoint.pth").exists(), p.communicate()[1] if p.poll() is not None else "no checkpoint"
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err, err
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["position"]["step"] >= 2


def test_resolved_line_names_activation_checkpointing():
    from types import SimpleNamespace as NS

    args = NS(no_knn=True, knn_samples=0, workers=0, lr=0.03, grad_ckpt=True)
    cfg = NS(batch_size=256, lr=0.03, min_lr=0.0)
    trainer = NS(device=torch.device("cpu"), amp_dtype=None, knn_loaders=None, compile_mode="none", steps_per_epoch=4)
    line = cli.resolved_line(args, cfg, object(), trainer)
    assert "compile none, activation checkpointing, device cpu" in line
    args.grad_ckpt = False
    assert "activation checkpointing" not in cli.resolved_line(args, cfg, object(), trainer)
