"""What every recipe shares: the common argument parser, presets, data loaders and the run itself.

A recipe (``recipes/<method>_<arch>.py``) adds its method's arguments and presets, builds its method
and calls ``run``. With no ``--data`` a recipe trains on CIFAR-10 (downloaded on first use and cached)
with its ``cifar`` preset; with ``--data PATH`` (ImageNet layout: PATH/train/<class>/*.jpg and
PATH/val/<class>/*) it uses its ``imagenet`` preset, the paper's settings.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .data.augment import AugmentSpec

if TYPE_CHECKING:  # torch and the engine are imported where used: `recipe --help` answers without them
    import torch

    from .engine import DistInfo, TrainConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's contract for bad input: one ``error:`` line naming the flag, exit code 1
    (argparse prints its whole usage block, dozens of lines for a recipe, and exits 2). Sub-commands
    (``add_subparsers``) inherit it."""

    def error(self, message: str):
        usage_error(message)


def usage_error(message: str):
    print(f"error: {message} (--help lists the flags)", file=sys.stderr, flush=True)
    sys.exit(1)


def make_dir(d: Path, what: str) -> None:
    """``mkdir -p d``; an OSError (a file in the way, no permission) as one line: "WHAT: cannot write there (...)"
    (``what`` names the flag and the path asked for, e.g. ``--out run/x.pth`` for its folder)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what}: cannot write there ({e.strerror or e})") from e


def int_at_least(low: int):
    """An argparse ``type``: an int >= ``low``, refused at parse time naming the flag ("argument --dim: must be
    >= 1, got 0"; was: a ZeroDivisionError or "negative dimension" traceback from inside the model)."""
    def parse(text: str) -> int:
        v = int(text)  # (a ValueError: argparse says "invalid int value")
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = True):
    """An argparse ``type``: a float in [low, high) (or the open/closed ends asked for)."""
    def parse(text: str) -> float:
        v = float(text)
        if not (low < v if low_open else low <= v) or not (v < high if high_open else v <= high):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}"
                                             f"{')' if high_open else ']'}, got {v}")
        return v

    parse.__name__ = "float"
    return parse


def base_parser() -> argparse.ArgumentParser:
    """Arguments shared by all recipes (``add_help=False`` so recipes can use it as a parent)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10",
                   help="'cifar10' (downloaded and cached under $FASTCL_DATA or ~/.cache/fastcl), an "
                        "ImageNet-layout folder with train/ and val/ class sub-folders, or unlabeled images: any "
                        "other folder (images at any depth) or a text file listing image paths, one per line")
    g.add_argument("--eval-data", default=None,
                   help="labeled data for the kNN monitor: 'cifar10' or an ImageNet-layout folder (default: --data "
                        "when it has labels; unlabeled --data without it gets the label-free monitor: RankMe and "
                        "the embedding's std)")
    g.add_argument("--data-backend", default="auto", choices=["auto", "gpu", "dali", "torch"],
                   help="augmentation back end (default: auto = gpu for CIFAR-10 on CUDA -- the dataset held and "
                        "augmented on the device --, else DALI when installed, on the GPU or with its CPU operators, "
                        "else torchvision; --train-samples, --workers 0 and tar shards use torchvision)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading workers / DALI threads per process (default: min(8, cores))")
    g = p.add_argument_group("optimization")
    g.add_argument("--preset", default=None, choices=["cifar", "imagenet"],  # (the recipe's own: annotate_help)
                   help="hyper-parameter preset (default: cifar for --data cifar10, imagenet otherwise)")
    g.add_argument("--arch", default=None, help="backbone name (see fastcl.models.BACKBONES)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch size over all processes")
    g.add_argument("--lr", type=float, default=None, help="base lr for batch 256 (scaled linearly)")
    g.add_argument("--min-lr", type=float, default=0.0,
                   help="final lr of the cosine schedule (default: 0; DINO 1e-6, SwAV lr/1000 from their presets)")
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--optimizer", default=None, choices=["sgd", "lars", "adamw"])
    g.add_argument("--momentum", type=float, default=0.9, help="SGD/LARS momentum (default: 0.9)")
    g.add_argument("--wd", type=float, default=None, help="weight decay")
    g.add_argument("--wd-end", type=float, default=None,
                   help="final weight decay of a cosine schedule (default: none, --wd throughout)")
    g.add_argument("--clip-grad", type=float, default=None, help="max grad norm (0 = off)")
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2],
                   help="DeepSpeed ZeRO under torchrun (default: 0 = off, plain DDP): 1 partitions the optimizer "
                        "state across the processes, 2 also the gradients (stage 3 would partition the parameters, "
                        "which EMA teachers and checkpoints read whole). Needs deepspeed")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output dir for checkpoints and logs (default: runs/<recipe>)")
    g.add_argument("--resume", default="auto",
                   help="'auto' (default: latest checkpoint in --out if any), 'none', or a checkpoint path")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps (a quick try; schedules still span --epochs). 0 = off")
    g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (default: 1000)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--knn-every", type=int, default=None, help="kNN eval every N epochs (0: only at the end)")
    g.add_argument("--knn-k", type=int, default=200)
    g.add_argument("--knn-t", type=float, default=0.1)
    g.add_argument("--knn-samples", type=int, default=None,
                   help="use this many train (and a fifth as many val) images for kNN, or training images for the "
                        "label-free monitor (0 = all, 25,600 for the label-free one; default: all, "
                        f"{CPU_KNN_SAMPLES} on a CPU)")
    g.add_argument("--no-knn", action="store_true", help="skip the kNN (or label-free) monitor")
    g.add_argument("--train-samples", type=int, default=0,
                   help="train on a fixed random subset of this many images (quick tries, tests; 0 = all)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    g.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="fused Triton kernels (auto: on CUDA) or the plain-torch references")
    g.add_argument("--compile", default="auto", choices=["auto", "none", "default", "max-autotune", "reduce-overhead"],
                   help="torch.compile the method's forward and loss (auto: default on CUDA, none on CPU; "
                        "reduce-overhead adds CUDA graphs)")
    g.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing: keep only each ViT block's / ResNet or RegNet stage's input and "
                        "recompute the rest in the backward (less activation memory for one more forward; default: "
                        "off; EMA teachers need none)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--no-channels-last", action="store_true",
                   help="keep activations in NCHW (default: channels_last, the tensor-core layout)")
    g.add_argument("--seed", type=int, default=0)
    return p


def _shown(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return " ".join(_shown(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# a hand-written "(default: ...)" (one level of nested parentheses) or a help that is only a default statement
_DEFAULT_NOTE = re.compile(r"\s*\((?:default|defaults?):(?:[^()]|\([^()]*\))*\)|^default:.*$", re.S)


def annotate_help(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    """Make ``--help`` state every default: a flag left at None takes its value from the preset, so its help
    names each preset's value (from ``presets``, never hand-copied, so a recipe sharing another's parser --
    dino_vits16 -- shows its own); any other flag shows its argparse default."""
    if getattr(parser, "_fastcl_annotated", False):
        return
    for a in parser._actions:
        if a.dest == "preset":  # the recipe's presets (SimCLR has a third, cifar_fast)
            a.choices = list(presets)
        if a.help == argparse.SUPPRESS or not a.option_strings or a.dest == "help":
            continue
        text = a.help or ""
        values = [(name, p[a.dest]) for name, p in presets.items() if a.dest in p]
        if a.default is None and values:
            text = _DEFAULT_NOTE.sub("", text).strip()
            shown = {_shown(v) for _, v in values}
            if len(shown) == 1 and len(values) == len(presets):
                note = f"default: {shown.pop()}"
            else:
                note = "; ".join(f"{name} preset: {_shown(v)}" for name, v in values)
            text = f"{text} ({note})" if text else f"({note})"
        elif a.default is not None and a.default is not False and not re.search(r"\bdefault:", text):
            text = f"{text} (default: {_shown(a.default)})".strip()
        a.help = text
    parser._fastcl_annotated = True


def parse_args(parser: argparse.ArgumentParser, presets: dict[str, dict], argv=None) -> argparse.Namespace:
    """Parse, then fill every argument left at None from the chosen preset."""
    parser.error = usage_error  # (recipes build plain argparse parsers): one error line, exit 1
    common = {a.dest for a in base_parser()._actions}  # (checked by check_args, with their own lower bounds)
    for a in parser._actions:  # no count, size or epoch flag of a recipe is negative; sizes that 0 would break
        if a.type is int and a.dest not in common:  # declare cli.int_at_least(1) themselves
            a.type = int_at_least(0)
    annotate_help(parser, presets)
    args = parser.parse_args(argv)
    args.batch_size_given = args.batch_size is not None  # a preset's batch may be lowered on a CPU, a given one not
    args.min_lr_given = args.min_lr is not None  # (DINO/SwAV take theirs from the preset)
    preset = args.preset or ("cifar" if args.data == "cifar10" else "imagenet")
    if preset not in presets:
        parser.error(f"--preset {preset!r} is not defined for this recipe (have: {sorted(presets)})")
    args.preset = preset
    for k, v in presets[preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    optional = ("wd_end", "out", "knn_samples", "eval_data")
    missing = [k for k, v in vars(args).items() if v is None and k not in optional]
    if missing:
        parser.error(f"no value for {missing} (not given and not in preset {preset!r})")
    check_args(args)
    return args


# (flag, lowest allowed value, whether the lowest is excluded): checked for every recipe, before anything runs
_BOUNDS = [("epochs", 1, False), ("batch_size", 1, False), ("lr", 0.0, True), ("min_lr", 0.0, False),
           ("warmup_epochs", 0.0, False), ("wd", 0.0, False), ("wd_end", 0.0, False), ("clip_grad", 0.0, False),
           ("max_steps", 0, False), ("ckpt_every", 0, False), ("log_every", 1, False), ("knn_every", 0, False),
           ("knn_k", 1, False), ("knn_t", 0.0, True), ("knn_samples", 0, False), ("train_samples", 0, False),
           ("workers", 0, False), ("seed", 0, False)]


def check_args(args: argparse.Namespace) -> None:
    """Refuse nonsense up front, naming the flag (was: --epochs 0 "succeeded" with a random backbone,
    --log-every 0 divided by zero after a step, --lr nan trained NaNs)."""
    import math

    for name, low, strict in _BOUNDS:
        v = getattr(args, name, None)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v}")
        if v < low or (strict and v == low):
            raise ValueError(f"{flag} must be {'>' if strict else '>='} {low}, got {v}")
    if not 0.0 <= args.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}")


# ---------------------------------------------------------------------------------------------- data
def dataset_stats(args) -> tuple[tuple, tuple]:
    from .data import build as data_build

    return data_build.dataset_stats(args.data)


def build_train_loader(args, spec: AugmentSpec, dist: DistInfo):
    """The training loader (views, labels, indices) for ``spec``, sharded over the ranks (fastcl.data.build)."""
    from .data import build as data_build

    return data_build.build_train_loader(args.data, spec, args.data_backend, dist, batch_size=args.batch_size,
                                         workers=args.workers, seed=args.seed, train_samples=args.train_samples,
                                         channels_last=not args.no_channels_last)


def build_knn_loaders(args, dist: DistInfo, size: int):
    """(train, val) loaders with the eval transform, for the kNN monitor."""
    if args.no_knn:
        return None
    from .data import build as data_build

    return data_build.build_knn_loaders(args.data, dist, size, knn_samples=args.knn_samples, workers=args.workers,
                                        backend=args.data_backend, eval_data=getattr(args, "eval_data", None))


# ---------------------------------------------------------------------------------------------- run
def seed_everything(seed: int, rank: int) -> None:
    import numpy as np
    import torch

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


# Preset batches (512 on CIFAR, 256-1024 on ImageNet) do not fit a CPU's memory with multi-crop ViTs: a CPU run
# that did not choose --batch-size gets this many images per process (lr follows through the linear scaling).
CPU_BATCH_PER_PROCESS = 64


# The kNN monitor's bank on a CPU when --knn-samples is not given: embedding all 50,000 CIFAR-10 training images
# takes ~10 min on 2 cores (and 1.5 h for a ViT-S/8), longer than a quick run's training.
CPU_KNN_SAMPLES = 5000


def cap_cpu_knn(args, dist: DistInfo) -> None:
    """Resolve --knn-samples: all images, or CPU_KNN_SAMPLES on a CPU (with a warning naming the flag)."""
    if args.knn_samples is not None:
        return
    args.knn_samples = 0
    if dist.device.type == "cpu" and not args.no_knn:
        args.knn_samples = CPU_KNN_SAMPLES
        if dist.is_main:
            from .data.build import LABEL_FREE_SAMPLES, has_labels

            try:  # unlabeled data and no --eval-data: the label-free monitor (a bad --data is reported later)
                label_free = getattr(args, "eval_data", None) is None and not has_labels(args.data)
            except (OSError, ValueError):
                label_free = False
            if label_free:
                msg = (f"the label-free monitor (RankMe, embedding std) embeds {CPU_KNN_SAMPLES} training images, not "
                       f"{LABEL_FREE_SAMPLES:,}; pass --knn-samples 0 for {LABEL_FREE_SAMPLES:,}")
            else:
                msg = (f"the kNN monitor embeds {CPU_KNN_SAMPLES} training images (and {CPU_KNN_SAMPLES // 5} test "
                       "images), not all; pass --knn-samples 0 for all")
            print(f"warning: training on the CPU: {msg}", file=sys.stderr, flush=True)


def cap_cpu_batch(args, dist: DistInfo) -> None:
    cap = CPU_BATCH_PER_PROCESS * dist.world_size
    if dist.device.type != "cpu" or getattr(args, "batch_size_given", True) or args.batch_size <= cap:
        return
    if dist.is_main:
        print(f"warning: training on the CPU: the {args.preset} preset's batch {args.batch_size} is lowered to {cap} "
              f"({CPU_BATCH_PER_PROCESS} per process) to fit in memory, lr (and a preset's final lr) scaled with it; "
              "pass --batch-size N to choose", file=sys.stderr, flush=True)
    if not getattr(args, "min_lr_given", True):  # a preset's final lr follows, keeping its final/peak ratio
        args.min_lr *= cap / args.batch_size
    args.batch_size = cap


def train_config(args, recipe: str) -> TrainConfig:
    from .engine import TrainConfig

    return TrainConfig(
        out_dir=args.out or str(Path("runs") / recipe), epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr * args.batch_size / 256, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, momentum=args.momentum, weight_decay=args.wd,
        weight_decay_end=args.wd_end, clip_grad=args.clip_grad, amp=args.amp,
        channels_last=not args.no_channels_last, ckpt_every=args.ckpt_every, log_every=args.log_every,
        max_steps=args.max_steps, knn_every=args.knn_every, knn_k=args.knn_k, knn_t=args.knn_t,
        seed=args.seed, resume=args.resume, zero_stage=args.zero_stage, compile=args.compile,
        grad_ckpt=getattr(args, "grad_ckpt", False), extra=vars(args).copy())


def run(args, recipe: str, build_method: Callable[[argparse.Namespace], torch.nn.Module], spec: AugmentSpec,
        knn_size: int | None = None) -> dict:
    """Set up processes, data and the method, train, and export the backbone. Returns the final metrics."""
    import torch

    from . import kernels
    from .engine import Trainer, init_distributed

    kernels.set_backend(args.kernels)
    dist = init_distributed(args.device)
    if args.kernels == "triton" and dist.device.type != "cuda" and not kernels.utils.interpreting():
        raise ValueError("--kernels triton runs Triton kernels, which need a CUDA device (or TRITON_INTERPRET=1 for "
                         "Triton's slow CPU interpreter); on the CPU use --kernels auto or torch")
    cap_cpu_batch(args, dist)
    if args.batch_size < 2 * dist.world_size:  # (was: BN's "Expected more than 1 value per channel", a NaN loss
        # blamed on the lr (InvaSpread), or SimCLR's loss 0 with no negative)
        raise ValueError(f"--batch-size {args.batch_size} is fewer than 2 images per process ({dist.world_size} "
                         "process(es)): in-batch negatives and BatchNorm need at least 2")
    cap_cpu_knn(args, dist)
    seed_everything(args.seed, dist.rank)
    cfg = train_config(args, recipe)
    if dist.is_main:
        print(f"fastcl {recipe} | preset {args.preset} | {dist.world_size} process(es) on {dist.device}")
        shown = {k: v for k, v in vars(args).items() if k not in ("batch_size_given", "min_lr_given")}
        print(json.dumps(shown, indent=1, default=str), flush=True)
    loader = build_train_loader(args, spec, dist)
    knn_loaders = build_knn_loaders(args, dist, knn_size or spec.views[0].size)
    method = build_method(args)
    trainer = Trainer(method, loader, cfg, dist, knn_loaders=knn_loaders)
    if dist.is_main:
        print(resolved_line(args, cfg, loader, trainer), flush=True)
    result = trainer.fit()
    from .data.build import data_report

    result.update(data_report(loader, dist))  # bad and skipped files, all ranks (collective)
    if dist.is_main:
        out = Path(cfg.out_dir)
        backbone = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}  # (ZeRO: views)
        from .eval.export import model_kwargs_of

        torch.save({"backbone": backbone, "arch": args.arch, "model_kwargs": model_kwargs_of({"args": vars(args)}),
                    "backbone_class": trainer.backbone_record()["backbone_class"]}, out / "backbone.pth")
        (out / "result.json").write_text(json.dumps(result, indent=1))
        data = result.get("data", {})
        files = "".join(f"; {data[f'num_{k}']} {what} file(s) listed in result.json" for k, what in
                        (("bad_files", "undecodable (substituted)"), ("skipped_files", "non-image (skipped)"))
                        if data.get(f"num_{k}"))
        shown = {k: v for k, v in result.items() if k != "data"}
        print(f"done: {json.dumps(shown)}{files}; backbone weights in {out / 'backbone.pth'}", flush=True)
    if torch.distributed.is_initialized():
        from .engine.distributed import shutdown_distributed

        shutdown_distributed()
    return result


def resolved_line(args, cfg, loader, trainer) -> str:
    """What "auto" and the scaling rules turned into: the back end that runs, amp, kernels, compile, device, and
    the lr actually used (the banner above shows the arguments as given)."""
    from . import kernels

    backend = {"DeviceLoader": "gpu (device-resident)", "DaliLoader": "dali", "TorchLoader": "torchvision",
               "DaliShardLoader": "dali (tar shards)", "ShardLoader": "torchvision (tar shards)"}.get(
        type(loader).__name__, type(loader).__name__)
    kern = kernels.get_backend()
    if kern == "auto":
        kern = "triton" if trainer.device.type == "cuda" and kernels.triton_available() else "torch"
    amp = {None: "off"}.get(trainer.amp_dtype, str(trainer.amp_dtype).replace("torch.", ""))
    knn = "off" if args.no_knn else (f"{args.knn_samples} train images" if args.knn_samples else "all images")
    if type(trainer.knn_loaders).__name__ == "LabelFree":  # (unlabeled data, no --eval-data)
        n = trainer.knn_loaders.num_images
        knn = f"off (no labels): label-free monitor (RankMe, embedding std) on {n} training images"
    return (f"resolved: data back end {backend} ({args.workers} workers), amp {amp}, kernels {kern}, compile "
            f"{trainer.compile_mode}{', activation checkpointing' if getattr(args, 'grad_ckpt', False) else ''}, "
            f"device {trainer.device}; batch {cfg.batch_size}, lr {cfg.lr:.4g} "
            f"(= {args.lr:g} x {cfg.batch_size}/256), min lr {cfg.min_lr:.4g}, {trainer.steps_per_epoch} steps/epoch, "
            f"kNN {knn}")


def _one_line(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised from a DataLoader worker ("Caught ValueError in DataLoader
    worker process 0. Original Traceback ..."), the worker's own message, its traceback's last line."""
    msg = str(e)
    if "\nOriginal Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        prefix = f"{type(e).__name__}: "
        msg = last[len(prefix):] if last.startswith(prefix) else last
    return msg


def main_guard(fn: Callable[[], object]) -> None:
    """Run a recipe's main; turn expected user errors into one clear line and a non-zero exit, and a stop by
    SIGTERM (torchrun, a scheduler) or Ctrl-C into one line too (was: a long traceback, e.g. during kNN)."""
    import signal

    def _terminated(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        fn()
    except KeyboardInterrupt as e:
        print(f"stopped by {e.args[0] if e.args else 'SIGINT'}: what was written is kept (the same command resumes "
              "from the last checkpoint in --out, if one was written)", file=sys.stderr, flush=True)
        sys.exit(130 if not e.args else 128 + signal.Signals[e.args[0]].value)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:  # (OSError: FileNotFoundError,
        # permissions, full disk; FloatingPointError: the linear probe diverged)
        if isinstance(e, RuntimeError):  # of the RuntimeErrors only the non-finite loss is the user's (engine
            from .engine import NonFiniteLossError  # imported here: --help must not pay for torch)

            if not isinstance(e, NonFiniteLossError):
                raise
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
