"""A CIFAR-10 training run sized to a wall-clock budget, with kNN top-1 against minutes (JSON + PNG).

For a lent GPU call of a few minutes: measures the torchvision loader's img/s on this machine's cores (a few
seconds), takes the step time of the same configuration from ``bench_train_step``'s JSON lines when given,
picks the largest epoch count whose run (cosine schedule over those epochs, kNN every few epochs and at the
end) fits ``--budget`` seconds, runs the recipe as a user would, and stops it at the deadline if the estimate
was wrong (the partial log still comes back).

    python benchmarks/cifar_run.py --budget 300 --out $OUT/cifar [--step-json bench.jsonl] [-- recipe args]
    python benchmarks/cifar_run.py --plot $OUT/cifar/cifar_run.json     # redraw the PNG from the JSON

Writes to ``--out``: ``cifar_run.json`` (configuration, epochs, seconds per epoch, kNN top-1/top-5 against
minutes since the start, the recipe's final result), ``log.jsonl`` (the recipe's), ``train.log`` and
``knn_vs_minutes.png`` (lightly's 200-epoch kNN for the method as a reference line).
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
CIFAR_TRAIN, BATCH = 50_000, 512


def loader_img_per_s(recipe: str, workers: int, seconds: float = 6.0) -> float:
    """Two-view torchvision pipeline img/s on random uint8 CIFAR-shaped data (same cost as the real images)."""
    import numpy as np

    from fastcl.data import augment
    from fastcl.data.datasets import ArrayDataset
    from fastcl.data.loader import TorchLoader
    from fastcl.data.transforms import MultiViewTransform

    spec = augment.mocov2_aug_plus(32, augment.CIFAR10_MEAN, augment.CIFAR10_STD, blur_p=0.0)
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (20_000, 32, 32, 3), dtype=np.uint8), np.zeros(20_000, np.int64),
                      MultiViewTransform(spec))
    dl = TorchLoader(ds, BATCH, num_workers=workers, persistent_workers=True)
    it, n = iter(dl), 0
    for _ in range(min(3, len(dl))):  # worker start-up is not throughput
        next(it)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            next(it)
        except StopIteration:
            it = iter(dl)
            continue
        n += BATCH
    return n / (time.perf_counter() - t0)


def step_seconds(path: str | None, default: float) -> tuple[float, str]:
    """The split-BN-8 CIFAR MoCo step from bench_train_step's JSON lines, else ``default``."""
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("bench") == "mocov2_cifar_step" and rec.get("bn_splits") == 8:
                return rec["ms_per_step"] / 1e3, f"measured ({path})"
    return default, "assumed"


def plan_epochs(budget: float, step_s: float, data_img_s: float, knn_s: float, startup_s: float) -> tuple[int, int]:
    """(epochs, knn_every) whose run fits ``budget``: per epoch max(GPU step, data) x steps + checkpoint."""
    steps = CIFAR_TRAIN // BATCH
    epoch_s = steps * max(step_s * 1.1, BATCH / data_img_s) + 1.5
    for epochs in range(200, 0, -1):
        every = max(1, epochs // 6)
        total = startup_s + epochs * epoch_s + (epochs // every) * knn_s
        if total <= budget:
            return epochs, every
    return 1, 1


def summarize(out: Path, meta: dict) -> dict:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
    t0 = meta["start_time"]
    knn = [{"epoch": r["epoch"], "step": r["step"], "minutes": (r["time"] - t0) / 60, "top1": r["knn_top1"],
            "top5": r.get("knn_top5")} for r in recs if "knn_top1" in r]
    steps = [r for r in recs if "loss" in r]
    res = {**meta, "knn": knn, "last_loss": steps[-1]["loss"] if steps else None,
           "img_per_s_logged_median": sorted(r["img_per_s"] for r in steps)[len(steps) // 2] if steps else None}
    if (out / "result.json").exists():
        res["result"] = json.loads((out / "result.json").read_text())
    (out / "cifar_run.json").write_text(json.dumps(res, indent=1))
    return res


def plot(summary_path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG (redraw with --plot later)")
        return None
    res = json.loads(summary_path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs, ys = [k["minutes"] for k in res["knn"]], [k["top1"] for k in res["knn"]]
    ax.plot(xs, ys, "o-", label=f"fastcl {res['recipe']} ({res['epochs']} ep, {res.get('gpu', '?')})")
    name, ref = LIGHTLY_200EP.get(res["recipe"], (None, None))
    if ref:
        ax.axhline(ref, ls="--", c="gray", label=f"lightly {name}, 200 ep (87-104 min, A6000): {ref:.3f}")
    ax.axhline(0.90, ls=":", c="k", label="90% kNN record: 1 h 39 min (A100)")
    ax.set_xlabel("minutes since start (training + kNN)")
    ax.set_ylabel("kNN top-1 (k=200, T=0.1), CIFAR-10 test")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    png = summary_path.with_name("knn_vs_minutes.png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="mocov2_r50")
    p.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds for the whole run")
    p.add_argument("--out", type=Path, default=Path("runs/cifar_run"))
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--step-json", default=None, help="bench_train_step's $FASTCL_BENCH_JSON file")
    p.add_argument("--step-ms", type=float, default=80.0, help="step time to assume without --step-json")
    p.add_argument("--knn-s", type=float, default=10.0, help="seconds one kNN evaluation is assumed to take")
    p.add_argument("--epochs", type=int, default=0, help="fixed epoch count (0: the largest that fits)")
    p.add_argument("--plot", type=Path, default=None, help="only redraw the PNG of this cifar_run.json")
    p.add_argument("recipe_args", nargs="*", help="more recipe arguments (after --)")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    data_img_s = loader_img_per_s(args.recipe, args.workers)
    step_s, step_src = step_seconds(args.step_json, args.step_ms / 1e3)
    startup_s = 25.0 + (time.time() - t_start)
    if args.epochs:
        epochs, every = args.epochs, max(1, args.epochs // 6)
    else:
        epochs, every = plan_epochs(args.budget, step_s, data_img_s, args.knn_s, startup_s)
    import torch

    meta = {"recipe": args.recipe, "epochs": epochs, "knn_every": every, "budget_s": args.budget,
            "workers": args.workers, "loader_img_per_s": data_img_s, "step_s": step_s, "step_source": step_src,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
            "torch": torch.__version__, "start_time": t_start}
    print(f"cifar_run: loader {data_img_s:.0f} img/s on {args.workers} workers, step {step_s * 1e3:.1f} ms "
          f"({step_src}) -> {epochs} epochs, kNN every {every}, budget {args.budget:.0f} s", flush=True)
    cmd = [sys.executable, str(ROOT / "recipes" / f"{args.recipe}.py"), "--epochs", str(epochs),
           "--knn-every", str(every), "--workers", str(args.workers), "--out", str(args.out / "run"),
           "--resume", "none", "--log-every", "20", *args.recipe_args]
    meta["command"] = " ".join(cmd[1:])
    deadline = t_start + args.budget
    with open(args.out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            meta["stopped_at_deadline"] = True
    meta["returncode"] = proc.returncode
    meta["wall_s"] = time.time() - t_start
    run = args.out / "run"
    for name in ("log.jsonl", "result.json"):
        if (run / name).exists():
            (args.out / name).write_bytes((run / name).read_bytes())
    res = summarize(args.out, meta)
    png = plot(args.out / "cifar_run.json")
    knn = res["knn"][-1] if res["knn"] else None
    print(f"cifar_run: rc={proc.returncode}, {epochs} epochs in {meta['wall_s'] / 60:.1f} min"
          + (f", final kNN top-1 {knn['top1']:.4f} top-5 {knn['top5']:.4f} at {knn['minutes']:.1f} min" if knn else "")
          + (f"; plot {png}" if png else ""), flush=True)


if __name__ == "__main__":
    main()
