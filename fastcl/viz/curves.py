"""Training curves from ``log.jsonl``: loss, lr, kNN top-1, RankMe and the embedding std (the label-free monitor,
when logged) and img/s against the step and against wall-clock minutes, several runs overlaid.

    python -m fastcl.viz curves runs/mocov2_r50 runs/simclr_r50 [--out DIR]

Every record of ``log.jsonl`` carrying a metric becomes one point of that metric's line (nothing is averaged or
thinned): training records (``loss``, ``lr``, ``img_per_s``, logged every ``--log-every`` steps), evaluation
records (``knn_top1``; ``rankme`` and ``emb_std`` of the label-free monitor on unlabeled data). Wall-clock
minutes count from the run's first record (``time``, Unix seconds); a log without times gets the step column
only. The PNG goes to the run folder (several runs: their common parent) or ``--out``, as ``curves.png``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

__all__ = ["METRICS", "read_log", "read_curves", "curves_figure", "run"]

# (record key, axis label)
METRICS = [("loss", "loss"), ("lr", "learning rate"), ("knn_top1", "kNN top-1"), ("rankme", "RankMe"),
           ("emb_std", "embedding std"), ("img_per_s", "img/s")]


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/log.jsonl``. A torn last line (a run killed mid-write) is skipped with a warning;
    ValueError for a missing / empty log or a bad line elsewhere."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir}: no such folder")
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"run folder {run_dir}: no log.jsonl (not a fastcl run, or it has not logged yet)")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"warning: {path}: last line is cut short, skipped", file=sys.stderr)
                continue
            raise ValueError(f"{path}, line {i + 1}: not JSON ({e})") from e
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}, line {i + 1}: not a log record (no 'step')")
        records.append(rec)
    if not records:
        raise ValueError(f"run folder {run_dir}: log.jsonl has no records")
    return records


def read_curves(records: list[dict]) -> dict[str, dict[str, list]]:
    """``{metric: {"step": [...], "value": [...], "minutes": [...] or None}}`` for every metric in METRICS that
    some record carries (finite numbers only), in log order: one entry per record."""
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    t0 = min(times) if times else None
    curves = {}
    for metric, _ in METRICS:
        steps, values, minutes = [], [], []
        for r in records:
            v = r.get(metric)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            steps.append(r["step"])
            values.append(float(v))
            t = r.get("time")
            minutes.append((t - t0) / 60 if t0 is not None and isinstance(t, (int, float)) else None)
        if steps:
            has_time = all(m is not None for m in minutes)
            curves[metric] = {"step": steps, "value": values, "minutes": minutes if has_time else None}
    return curves


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in run_dirs]


def curves_figure(runs: dict[str, dict]):
    """Rows: the metrics any run has; columns: against step, against wall-clock minutes. One colour per run."""
    from .common import pyplot

    plt = pyplot()
    metrics = [(m, label) for m, label in METRICS if any(m in c for c in runs.values())]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 2.3 * len(metrics)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (metric, label) in enumerate(metrics):
        for (name, curves), color in zip(runs.items(), colors * (1 + len(runs) // len(colors))):
            c = curves.get(metric)
            if c is None:
                continue
            style = dict(color=color, label=name, marker="o" if len(c["step"]) < 30 else None, ms=3, lw=1.2)
            axes[row, 0].plot(c["step"], c["value"], **style)
            if c["minutes"] is not None:
                axes[row, 1].plot(c["minutes"], c["value"], **style)
        axes[row, 0].set_ylabel(label)
        if metric == "lr":
            for ax in axes[row]:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[-1, 0].set_xlabel("step")
    axes[-1, 1].set_xlabel("wall-clock minutes")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(run_dirs: list[str | Path], out: str | Path | None = None) -> dict:
    """Draw the curves; returns ``{"png", "runs": {label: read_curves(...)}}``."""
    from .common import out_dir, save

    if not run_dirs:
        raise ValueError("curves needs at least one RUN_DIR")
    dirs = [Path(d) for d in run_dirs]
    runs = {label: read_curves(read_log(d)) for label, d in zip(_labels(dirs), dirs)}
    if not any(runs.values()):
        raise ValueError(f"{', '.join(map(str, dirs))}: the logs carry none of {', '.join(m for m, _ in METRICS)}")
    fig = curves_figure(runs)
    default = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    png = save(fig, out_dir(out, default) / "curves.png")
    return {"png": png, "runs": runs}
