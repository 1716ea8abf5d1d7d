"""CIFAR-10 speedrun: train recipes' ``cifar`` presets for a fixed number of epochs (or as many as fit a wall-clock
budget) on the fastest path, and record kNN top-1 against minutes (JSON + one PNG for all recipes).

On CUDA the recipes' ``--data-backend auto`` is the device-resident back end (CIFAR-10 held and augmented on
the GPU) and ``--compile auto`` compiles the step; elsewhere they run as they would for a user. Before each
run this measures the augmentation (the device back end's ms per batch, or the torchvision pipeline's img/s on
the machine's cores) and takes the step time from ``bench_train_step``'s JSON lines when given, so that
``--budget`` can pick the largest epoch count that fits; the run is stopped at the deadline if the estimate was
wrong (the partial log still comes back). ``--resume auto`` (default) continues a run stopped that way when
called again with the same ``--epochs`` and ``--out``.

    python benchmarks/cifar_run.py --epochs 30 --out runs/speedrun                     # MoCo v2
    python benchmarks/cifar_run.py --recipe mocov2_r50,simclr_r50,byol_r50 --budget 180 --out $OUT/speedrun
    python benchmarks/cifar_run.py --plot runs/speedrun/*/cifar_run.json                # redraw the PNG

Per recipe, ``--out/<recipe>/`` gets ``cifar_run.json`` (configuration, epochs, seconds per epoch, the
augmentation's share of the step, kNN top-1/top-5 against minutes since the start, the recipe's final result),
``log.jsonl`` (the recipe's) and ``train.log``; ``--out/knn_vs_minutes.png`` draws every recipe with lightly's
200-epoch kNN for each method and the 90 % record as reference lines.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# lightly's CIFAR-10 benchmark (ResNet-18, batch 512, 200 epochs, kNN k=200): the anchors to compare with
LIGHTLY_200EP = {"mocov2_r50": ("MoCo", 0.847), "simclr_r50": ("SimCLR", 0.848), "byol_r50": ("BYOL", 0.868),
                 "simsiam_r50": ("SimSiam", 0.764), "swav_r50": ("SwAV", 0.842), "dino_vits8": ("DINO", 0.813)}
CIFAR_TRAIN = 50_000


def _spec(recipe: str, argv=()):
    """The recipe's augmentation spec and arguments for ``argv`` (e.g. a --preset; as its main builds them),
    without running it."""
    import importlib.util

    from fastcl import cli

    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", ROOT / "recipes" / f"{recipe}.py")
    mod, seen = importlib.util.module_from_spec(spec), {}
    spec.loader.exec_module(mod)
    real_run = cli.run
    cli.run = lambda args, name, build, spec, knn_size=None: seen.update(spec=spec, args=args)
    try:
        mod.main(list(argv))
    finally:
        cli.run = real_run
    return seen["spec"], seen["args"]


def augment_seconds_per_batch(recipe: str, workers: int, seconds: float = 4.0, argv=()) -> tuple[float, str]:
    """Seconds to produce one batch of ``recipe``'s views on the path its run will take, on random uint8 images
    (the same cost as the real ones): the device back end on CUDA, else the torchvision pipeline on ``workers``."""
    import numpy as np
    import torch

    spec, a = _spec(recipe, argv)
    BATCH = a.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8 * BATCH, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(len(images), np.int64)
    if torch.cuda.is_available():
        from fastcl.data.gpu import DeviceLoader

        dl = DeviceLoader(images, labels, spec, BATCH, device="cuda", out_dtype=torch.bfloat16, channels_last=True)
        how = "device"
    else:
        from fastcl.data.datasets import ArrayDataset
        from fastcl.data.loader import TorchLoader
        from fastcl.data.transforms import MultiViewTransform

        dl = TorchLoader(ArrayDataset(images, labels, MultiViewTransform(spec)), BATCH, num_workers=workers,
                         persistent_workers=workers > 0)
        how = f"torchvision, {workers} workers"
    n, t0, it = 0, None, iter(dl)
    while True:
        try:
            next(it)
        except StopIteration:
            it = iter(dl)
            continue
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if t0 is None:  # the first batch pays start-up (workers, kernels)
            t0 = time.perf_counter()
        else:
            n += 1
        if t0 is not None and time.perf_counter() - t0 > seconds and n >= 3:
            break
    return (time.perf_counter() - t0) / n, how


def step_seconds(path: str | None, default: float) -> tuple[float, str]:
    """The split-BN-8 CIFAR MoCo step from bench_train_step's JSON lines, else ``default``."""
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("bench") == "mocov2_cifar_step" and rec.get("bn_splits") == 8:
                return rec["ms_per_step"] / 1e3, f"measured ({path})"
    return default, "assumed"


def plan_epochs(budget: float, step_s: float, aug_s: float, serial: bool, knn_s: float,
                startup_s: float, batch: int = 512) -> tuple[int, int]:
    """(epochs, knn_every) whose run fits ``budget``. On the device back end augmentation and step share the GPU
    (their times add); a CPU pipeline overlaps with the step (the slower one sets the pace)."""
    steps = CIFAR_TRAIN // batch
    per_step = step_s * 1.1 + aug_s if serial else max(step_s * 1.1, aug_s)
    epoch_s = steps * per_step + 1.5  # + the epoch-end checkpoint
    for epochs in range(200, 0, -1):
        every = max(1, epochs // 6)
        if startup_s + epochs * epoch_s + (epochs // every) * knn_s <= budget:
            return epochs, every
    return 1, 1


def summarize(out: Path, meta: dict) -> dict:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
    t0 = meta["start_time"]
    knn = [{"epoch": r["epoch"], "step": r["step"], "minutes": (r["time"] - t0) / 60, "top1": r["knn_top1"],
            "top5": r.get("knn_top5")} for r in recs if "knn_top1" in r]
    steps = [r for r in recs if "loss" in r]
    ends = {}  # epoch -> time of its last logged step
    for r in steps:
        ends[r["epoch"]] = r["time"]
    gaps = [b - a for a, b in zip(list(ends.values())[:-1], list(ends.values())[1:])]
    res = {**meta, "knn": knn, "last_loss": steps[-1]["loss"] if steps else None,
           "seconds_per_epoch_median": sorted(gaps)[len(gaps) // 2] if gaps else None,
           "img_per_s_logged_median": sorted(r["img_per_s"] for r in steps)[len(steps) // 2] if steps else None}
    if (out / "result.json").exists():
        res["result"] = json.loads((out / "result.json").read_text())
    (out / "cifar_run.json").write_text(json.dumps(res, indent=1))
    return res


def plot(summaries: list[Path], png: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (redraw with --plot later)")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, path in enumerate(summaries):
        res = json.loads(Path(path).read_text())
        color = f"C{i}"
        ax.plot([k["minutes"] for k in res["knn"]], [k["top1"] for k in res["knn"]], "o-", c=color,
                label=f"fastcl {res['recipe']} ({res['epochs']} ep, {res.get('gpu', '?')})")
        name, ref = LIGHTLY_200EP.get(res["recipe"], (None, None))
        if ref:
            ax.axhline(ref, ls="--", c=color, alpha=0.6, label=f"lightly {name}, 200 ep (87-104 min, A6000): {ref:.3f}")
    ax.axhline(0.90, ls=":", c="k", label="90% kNN record: 1 h 39 min (A100)")
    ax.set_xlabel("minutes since the run's start (training + kNN)")
    ax.set_ylabel("kNN top-1 (k=200, T=0.1), CIFAR-10 test")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


def run_recipe(recipe: str, args, out: Path) -> dict:
    import torch

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    aug_s, aug_how = augment_seconds_per_batch(recipe, args.workers, argv=args.recipe_args)
    batch = _spec(recipe, args.recipe_args)[1].batch_size
    step_s, step_src = step_seconds(args.step_json, args.step_ms / 1e3)
    serial = aug_how == "device"
    startup_s = (60.0 if torch.cuda.is_available() else 25.0) + (time.time() - t_start)  # (+ compilation on CUDA)
    if args.epochs:
        epochs, every = args.epochs, max(1, args.epochs // 6)
    else:
        epochs, every = plan_epochs(args.budget, step_s, aug_s, serial, args.knn_s, startup_s, batch)
    share = aug_s / (aug_s + step_s) if serial else None
    meta = {"recipe": recipe, "epochs": epochs, "knn_every": every, "budget_s": args.budget, "workers": args.workers,
            "augment": aug_how, "augment_ms_per_batch": aug_s * 1e3, "augment_share_of_step": share,
            "step_s": step_s, "step_source": step_src,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "start_time": t_start}
    print(f"cifar_run {recipe}: augmentation {aug_s * 1e3:.1f} ms/batch ({aug_how})"
          + (f" = {share:.0%} of a step" if share is not None else "")
          + f", step {step_s * 1e3:.1f} ms ({step_src}) -> {epochs} epochs, kNN every {every}", flush=True)
    cmd = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--epochs", str(epochs), "--knn-every", str(every),
           "--workers", str(args.workers), "--out", str(out / "run"), "--resume", args.resume, "--log-every", "20",
           *args.recipe_args]
    meta["command"] = " ".join(cmd[1:])
    deadline = t_start + args.budget if not args.epochs else float("inf")
    with open(out / "train.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            meta["stopped_at_deadline"] = True
    meta["returncode"] = proc.returncode
    meta["wall_s"] = time.time() - t_start
    for name in ("log.jsonl", "result.json"):
        if (out / "run" / name).exists():
            (out / name).write_bytes((out / "run" / name).read_bytes())
    res = summarize(out, meta)
    knn = res["knn"][-1] if res["knn"] else None
    print(f"cifar_run {recipe}: rc={proc.returncode}, {epochs} epochs in {meta['wall_s'] / 60:.1f} min"
          + (f", final kNN top-1 {knn['top1']:.4f} top-5 {knn['top5']:.4f} at {knn['minutes']:.1f} min" if knn else "")
          + (f", {res['seconds_per_epoch_median']:.1f} s/epoch" if res["seconds_per_epoch_median"] else ""), flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="mocov2_r50", help="recipe name(s), comma-separated (default: mocov2_r50)")
    p.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds per recipe (ignored with --epochs)")
    p.add_argument("--epochs", type=int, default=0, help="fixed epoch count (0: the largest that fits --budget)")
    p.add_argument("--out", type=Path, default=Path("runs/cifar_run"))
    p.add_argument("--resume", default="auto", help="passed to the recipe (auto: continue a stopped run in --out)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--step-json", default=None, help="bench_train_step's $FASTCL_BENCH_JSON file")
    p.add_argument("--step-ms", type=float, default=40.0, help="step time to assume without --step-json")
    p.add_argument("--knn-s", type=float, default=8.0, help="seconds one kNN evaluation is assumed to take")
    p.add_argument("--plot", type=Path, nargs="+", default=None, help="only redraw the PNG from these cifar_run.json")
    p.add_argument("recipe_args", nargs="*", help="more recipe arguments (after --)")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot, args.plot[0].parent.parent / "knn_vs_minutes.png"))
        return
    recipes = [r.strip() for r in args.recipe.split(",") if r.strip()]
    for r in recipes:
        if not (ROOT / "recipes" / f"{r}.py").exists():
            raise SystemExit(f"error: --recipe {r}: no recipes/{r}.py")
    outs = []
    for r in recipes:
        run_recipe(r, args, args.out / r)
        outs.append(args.out / r / "cifar_run.json")
    png = plot(outs, args.out / "knn_vs_minutes.png")
    if png:
        print(f"cifar_run: plot {png}")


if __name__ == "__main__":
    main()
