"""``python -m fastcl.viz attention|neighbors|curves|bench ...``: see ``fastcl.viz``; ``--help`` on each command."""
from __future__ import annotations

import argparse

from ..cli import ArgumentParser


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("python -m fastcl.viz", description="Pictures of a run: PNGs written next to the "
                                "input (or into --out), their paths printed.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{attention,neighbors,curves,bench}")
    a = sub.add_parser("attention", help="a ViT's last-block CLS attention per head on an image, with DINO's masks")
    a.add_argument("--checkpoint", required=True, help="ViT training checkpoint, backbone.pth or export (DINO, MoCo v3)")
    a.add_argument("--image", required=True, help="any image file PIL reads")
    a.add_argument("--threshold", type=float, default=0.6,
                   help="mask: keep the most-attended patches holding this share of a head's attention (default: 0.6)")
    a.add_argument("--out", default=None, help="folder for the PNG (default: the checkpoint's folder)")
    n = sub.add_parser("neighbors", help="query images and their nearest neighbours in feature space")
    n.add_argument("--checkpoint", required=True, help="training checkpoint, backbone.pth or export (ResNet or ViT)")
    n.add_argument("--data", default="cifar10",
                   help="'cifar10' (training split) or a folder: PATH/train, class folders or any images (default: cifar10)")
    n.add_argument("--k", type=int, default=8, help="neighbours per query (default: 8)")
    n.add_argument("--queries", type=int, default=8, help="query rows, drawn from the bank (default: 8)")
    n.add_argument("--samples", type=int, default=2000, help="bank: a fixed random subset of this many images "
                   "(0 = all; default: 2000)")
    n.add_argument("--seed", type=int, default=0, help="picks the bank and the queries (default: 0)")
    n.add_argument("--batch-size", type=int, default=256, help="feature extraction batch (default: 256)")
    n.add_argument("--workers", type=int, default=0, help="data loader workers (default: 0)")
    n.add_argument("--out", default=None, help="folder for the PNG (default: the checkpoint's folder)")
    c = sub.add_parser("curves", help="loss, lr, kNN / RankMe, img/s against step and wall-clock from log.jsonl")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (with log.jsonl); several are overlaid")
    c.add_argument("--out", default=None, help="folder for curves.png (default: the run folder, or the runs' "
                   "common parent)")
    b = sub.add_parser("bench", help="fused-vs-baseline ratios and floor multiples from the benchmark JSON")
    b.add_argument("results", nargs="+", metavar="RESULTS", help="pytest-benchmark JSON files or folders of them")
    b.add_argument("--out", default=None, help="folder for bench_ratios.png (default: beside the first input)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_parser().parse_args(argv)
    if args.cmd == "attention":
        from .attention import run

        res = run(args.checkpoint, args.image, args.out, args.threshold)
        print(f"{res['arch']}: {res['maps'].shape[0]} heads on a {res['maps'].shape[1]}x{res['maps'].shape[2]} patch grid")
    elif args.cmd == "neighbors":
        from .neighbors import run

        res = run(args.checkpoint, args.data, args.k, args.queries, args.samples, args.seed, args.out,
                  args.batch_size, args.workers)
        labels, nb = res["labels"], res["neighbors"]
        if bool((labels >= 0).all()):
            same = (labels[nb[:, 1:]] == labels[nb[:, :1]]).float().mean().item()
            print(f"neighbours sharing the query's label: {same:.1%}")
    elif args.cmd == "curves":
        from .curves import run

        res = run(args.runs, args.out)
    else:
        from .bench import run

        res = run(args.results, args.out)
        for r in res["rows"]:
            floor = f", {r['variant_floor_x']:.1f}x its floor" if r["variant_floor_x"] else ""
            print(f"{r['name']}: {r['variant']} {r['ratio']:.2f}x vs {r['baseline']}{floor}")
    print(f"wrote {res['png']}", flush=True)
    return res


if __name__ == "__main__":
    from ..cli import main_guard

    main_guard(main)
