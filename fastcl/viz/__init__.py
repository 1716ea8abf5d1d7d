"""Pictures of a run: attention maps, nearest-neighbour grids, training curves and benchmark ratios.

    python -m fastcl.viz attention --checkpoint runs/dino_vits8/checkpoint.pth --image cat.jpg
    python -m fastcl.viz neighbors --checkpoint runs/mocov2_r50/checkpoint.pth --data cifar10
    python -m fastcl.viz curves runs/mocov2_r50 runs/simclr_r50
    python -m fastcl.viz bench benchmarks/results/2026-12-04-h200/

Each command writes a PNG (matplotlib, Agg back end) next to its input -- the checkpoint's folder, the run folder
(several runs: their common parent), the results folder -- or into ``--out DIR``, and prints its path. The
computations behind every picture are functions returning arrays (``cls_attention``, ``nearest_neighbors``,
``read_curves``, ``bench_rows``), so what a picture shows can be checked without looking at it.

Modules import torch and matplotlib where used: ``python -m fastcl.viz --help`` answers without them.
"""
