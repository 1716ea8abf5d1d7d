"""Fused-vs-baseline speed ratios and memory/compute-floor multiples from the benchmark suite's JSON.

    python -m fastcl.viz bench benchmarks/results/2026-12-04-h200/            # every pytest-benchmark JSON there
    python -m fastcl.viz bench bench_kernels.json bench_train_step.json --out DIR

Input: the files ``pytest benchmarks/ --benchmark-json F`` writes (``benchmarks/gpu_session.sh`` keeps them), or a
folder holding them (other JSON files there are skipped). Each benchmark records its medians in ``extra_info`` as
``<variant>_ms``; the baseline is the first of ``hand`` (a hand-written training loop), ``foreach`` (EMA:
``torch._foreach_lerp_``), ``torch`` (the plain-torch reference) and ``eager`` (DINO step: fastcl without
``torch.compile``) present, and every other variant gets ratio = baseline_ms / variant_ms (> 1: faster than the
baseline); ``loop_ms`` (EMA's per-parameter Python loop) is not drawn. Where the benchmark records ``floor_ms``
(bytes moved / peak bandwidth), the floor multiple variant_ms / floor_ms is drawn for the baseline and each variant.
The PNG, ``bench_ratios.png``, goes next to the first input (a folder: into it) or to ``--out``.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["BASELINES", "read_results", "bench_rows", "bench_figure", "run"]

BASELINES = ("hand", "foreach", "torch", "eager")
_NOT_DRAWN = ("loop", "floor")


def read_results(paths: list[str | Path]) -> list[dict]:
    """The ``benchmarks`` entries of the pytest-benchmark JSON files in ``paths`` (files, or folders whose
    ``*.json`` are read; a folder's non-benchmark JSON is skipped). ValueError if none is found."""
    if not paths:
        raise ValueError("bench needs a RESULTS.json file or a folder of them")
    entries = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"benchmark results {p}: no such file or folder")
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                if p.is_dir():
                    continue
                raise ValueError(f"benchmark results {f}: not JSON ({e})") from e
            if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
                if p.is_dir():
                    continue
                raise ValueError(f"benchmark results {f}: no 'benchmarks' list (expected pytest --benchmark-json "
                                 "output)")
            entries += [dict(b, source=f.name) for b in data["benchmarks"]]
    if not entries:
        raise ValueError(f"{', '.join(map(str, paths))}: no pytest-benchmark JSON (with a 'benchmarks' list) found")
    return entries


def bench_rows(entries: list[dict]) -> list[dict]:
    """One row per (benchmark, variant) with a baseline: ``{"name", "variant", "baseline", "baseline_ms",
    "variant_ms", "ratio" = baseline_ms / variant_ms, "floor_ms", "baseline_floor_x", "variant_floor_x"}`` (floor
    fields None when the benchmark has no floor)."""
    rows = []
    for b in entries:
        extra = b.get("extra_info") or {}
        ms = {k[:-3]: float(v) for k, v in extra.items()
              if k.endswith("_ms") and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
        floor = ms.get("floor")
        base = next((n for n in BASELINES if n in ms), None)
        if base is None:
            continue
        name = b.get("name", "?").removeprefix("test_")
        for variant, t in ms.items():
            if variant == base or variant.startswith(_NOT_DRAWN):
                continue
            rows.append({"name": name, "variant": variant, "baseline": base, "baseline_ms": ms[base], "variant_ms": t,
                         "ratio": ms[base] / t, "floor_ms": floor,
                         "baseline_floor_x": ms[base] / floor if floor else None,
                         "variant_floor_x": t / floor if floor else None, "source": b.get("source")})
    if not rows:
        raise ValueError("no benchmark records a baseline and a fused time (extra_info <variant>_ms with one of "
                         f"{', '.join(f'{n}_ms' for n in BASELINES)})")
    return rows


def bench_figure(rows: list[dict], title: str = ""):
    """Left: ratio baseline / variant per row (log scale, 1 = same speed); right: floor multiples where known."""
    import numpy as np

    from .common import pyplot

    plt = pyplot()
    floors = [r for r in rows if r["floor_ms"]]
    ncols = 2 if floors else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 0.32 * len(rows) + 1.4), squeeze=False)
    ax = axes[0, 0]
    y = np.arange(len(rows))[::-1]
    ratios = [r["ratio"] for r in rows]
    ax.barh(y, ratios, color=["seagreen" if v >= 1 else "indianred" for v in ratios], height=0.7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{r['name']}: {r['variant']} vs {r['baseline']}" for r in rows], fontsize=7)
    for yi, r in zip(y, rows):
        ax.text(r["ratio"], yi, f" {r['ratio']:.2f}x ({r['variant_ms']:.3g} vs {r['baseline_ms']:.3g} ms)",
                va="center", fontsize=6)
    ax.set_xlabel("speed-up = baseline ms / fused ms (log; > 1 faster)")
    ax.set_xlim(min(0.5, min(ratios) / 1.5), max(ratios) * 6)
    if floors:
        ax2 = axes[0, 1]
        yf = np.arange(len(floors))[::-1]
        ax2.barh(yf + 0.18, [r["baseline_floor_x"] for r in floors], height=0.36, color="lightgray", label="baseline")
        ax2.barh(yf - 0.18, [r["variant_floor_x"] for r in floors], height=0.36, color="steelblue", label="fused")
        ax2.set_xscale("log")
        ax2.axvline(1.0, color="black", lw=0.8)
        ax2.set_yticks(yf, [f"{r['name']}: {r['variant']} vs {r['baseline']}" for r in floors], fontsize=7)
        for yi, r in zip(yf, floors):
            ax2.text(r["variant_floor_x"], yi - 0.18, f" {r['variant_floor_x']:.1f}x", va="center", fontsize=6)
            ax2.text(r["baseline_floor_x"], yi + 0.18, f" {r['baseline_floor_x']:.1f}x", va="center", fontsize=6)
        ax2.set_xlabel("time / floor (bytes moved / peak bandwidth; log, 1 = at the floor)")
        ax2.set_xlim(0.8, max(r["baseline_floor_x"] for r in floors) * 4)
        ax2.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if title else 1))
    return fig


def run(paths: list[str | Path], out: str | Path | None = None) -> dict:
    """Draw the ratios; returns ``{"png", "rows"}``."""
    from .common import out_dir, save

    paths = [Path(p) for p in paths]
    rows = bench_rows(read_results(paths))
    first = paths[0]
    fig = bench_figure(rows, title=f"fastcl benchmarks: {', '.join(p.name for p in paths)}")
    png = save(fig, out_dir(out, first if first.is_dir() else first.resolve().parent) / "bench_ratios.png")
    return {"png": png, "rows": rows}
