"""DeepSpeed ZeRO for the Trainer (``--zero-stage 1|2``): the optimizer state (stage 1) and also the
gradients (stage 2) are partitioned across the data-parallel ranks instead of replicated as with DDP.

What stays the same as the DDP path, and why it is exact:
  * precision: DeepSpeed keeps fp32 parameters (no ``bf16``/``fp16`` section in its config); the trainer's
    own ``torch.autocast`` gives the bf16 forward. DeepSpeed's bf16/fp16 modes would cast every parameter
    of the method to 16 bits, the frozen EMA teachers included, where an EMA step of 1 - 0.996 rounds away.
  * lr / weight decay: DeepSpeed hands the torch optimizer one flat fp32 shard per param group but keeps
    the group dicts themselves, so the trainer's per-step writes to ``optimizer.param_groups[i]`` still
    drive the update (checked at set-up, not assumed).
  * gradient hooks: after ``engine.backward`` the averaged gradients live only as shards. A method that
    overrides ``before_optimizer_step`` (DINO's per-parameter clip) gets the full averaged gradients back
    in ``p.grad`` (``deepspeed.utils.safe_get_full_grad``), and what it leaves there is written back into
    the shards (``safe_set_full_grad``).
  * skipped updates (DINO's ``--freeze-last-layer``, SwAV's prototype freeze): a hook sets ``p.grad = None`` and
    DDP's optimizer then leaves ``p`` alone -- no decay, no momentum, no step count. The torch optimizer under
    ZeRO steps whole flat shards, one per param group, so the parameters a method declares skippable
    (``Method.skippable_parameters``) get groups of their own (``isolate_skippable``); a step that skips all of
    a group's parameters gives them zero gradients (so the global clip norm is DDP's), runs the group at lr 0
    (an exact no-op for SGD, AdamW and LARS) and then drops the group's optimizer state, so its first real
    step starts from fresh state as DDP's does. A skip of anything else stops the run with a ValueError
    naming the parameters instead of training something else.
  * global-norm clip (``--clip-grad``) is DeepSpeed's ``gradient_clipping``: same formula as
    ``clip_grad_norm_``, applied after the hook as in the DDP path.

Not supported, with an error naming the option: stage 3 (it partitions the parameters themselves, which the
methods read and write outside module forwards: EMA teachers, prototype normalisation, state_dict for
checkpoints / kNN / export), ``--amp fp16`` (ZeRO with fp32 parameters has no loss scaler).

LARS: its trust ratio needs each parameter's whole ||w|| and ||g||, and the optimizer sees one flat shard per group
holding fragments of many parameters (cut anywhere). At set-up every element of the shard is tagged with its
parameter (DeepSpeed's ``_hp_mapping`` fragment addresses); each step sums squares per tag (``index_add_``) and
all-reduces the 2 x n sums, so every fragment is scaled by its whole parameter's ratio: the DDP update, up to the
order of the sums (tests/engine/test_zero_lars.py).

Checkpoints: ``checkpoint.pth`` keeps its usual content (model, position, RNGs, ...) with ``optimizer``
None and a ``zero`` entry naming a tag; the partitioned optimizer state is a DeepSpeed checkpoint
(``engine.save_checkpoint``, one shard per rank, plus DeepSpeed's copy of the trainable weights, which is
never loaded back) in ``<out>/zero/<tag>/``. The tag directory is written completely (barrier) before
``checkpoint.pth`` is atomically replaced to point at it, tags are never reused, and older tags are removed
only afterwards, so a crash at any point leaves a consistent pair. Resuming needs the same stage and
process count (the shards are cut for that layout); DeepSpeed's ``zero_to_fp32.py`` lands next to them.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import rng_state, set_rng_state

ZERO_DIR = "zero"  # next to checkpoint.pth
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements), the cap for large models


def check_zero_options(stage: int, *, optimizer: str, amp: str, world_size: int) -> None:
    """Reject combinations ZeRO cannot train correctly, before any work is done."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {stage}")
    if stage == 3:
        raise ValueError(
            "--zero-stage 3 is not supported: ZeRO-3 partitions the parameters themselves, but the methods read "
            "and write whole parameters outside module forwards (EMA teacher / momentum-encoder updates, SwAV's "
            "prototype normalisation) and the trainer, kNN monitor and backbone export use method.state_dict(); "
            "all of these would silently see empty placeholders. Use --zero-stage 2 (optimizer state and "
            "gradients partitioned)")
    if optimizer not in ("sgd", "adamw", "lars"):
        raise ValueError(f"--zero-stage {stage} supports --optimizer sgd, adamw and lars, got {optimizer!r}")
    if amp == "fp16":
        raise ValueError(f"--amp fp16 with --zero-stage {stage}: ZeRO keeps fp32 parameters here and has no loss "
                         "scaler for an fp16 autocast; use --amp bf16 (or none)")
    if world_size == 1 and not dist.is_initialized() and not all(
            k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        raise ValueError(f"--zero-stage {stage} partitions across processes: launch with torchrun "
                         "--nproc_per_node=N (a plain single process has no process group and nothing to "
                         "partition across)")
    try:
        importlib.import_module("deepspeed")
    except ImportError as e:
        raise ValueError(f"--zero-stage {stage} needs DeepSpeed: pip install deepspeed==0.19.8 "
                         f"(or pip install -e '.[deepspeed]'); import failed: {e}") from None


def ds_config(stage: int, *, batch_size: int, world_size: int, clip_grad: float,
              trainable: int = DS_BUCKET) -> dict:
    """The DeepSpeed config, built here so it always matches the TrainConfig. ``trainable``: the number of trained
    parameter elements; DeepSpeed allocates its gradient reduce bucket at ``reduce_bucket_size`` elements whatever
    the model (5e8 by default: 1.9 GiB of fp32 per GPU for a 22 M-parameter ViT-S), so it is capped there."""
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": int(max(1, min(DS_BUCKET, trainable)))},
        "gradient_clipping": float(clip_grad),  # 0 = off, as --clip-grad
        # fp32 parameters on purpose (no "bf16"/"fp16" section): see the module docstring
        # torch's SGD is not on DeepSpeed's ZeRO list; it is elementwise like AdamW and tested against DDP
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 62,  # the trainer does the logging
        "wall_clock_breakdown": False,
    }


def isolate_skippable(groups: list[dict], skippable) -> list[dict]:
    """``groups`` with each group that holds skippable parameters split in two: the others, and those (same
    settings, ``skippable=True``); empty groups dropped. Under ZeRO a group is one flat shard that the optimizer
    steps whole: a skip can only leave out whole groups."""
    ids = {id(p) for p in skippable}
    out = []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in ids]
        skip = [p for p in g["params"] if id(p) in ids]
        out += [{**g, "params": rest}] if rest else []
        out += [{**g, "params": skip, "skippable": True}] if skip else []
    return out


def _keep_module(src, dst) -> None:
    """``load_checkpoint``'s module loader: a no-op, the method (buffers, frozen teacher) came from checkpoint.pth."""


class ZeroEngine:
    """Owns the DeepSpeed engine for one Trainer: backward, the hooked step and the checkpoint shards."""

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer, *, stage: int, batch_size: int,
                 clip_grad: float, device: torch.device):
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # its per-init INFO lines would drown the trainer's output
        if not dist.is_initialized():  # torchrun --nproc_per_node=1 (init_distributed skips one process)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
        self.stage = stage
        self.world_size = dist.get_world_size()
        # (DeepSpeed broadcasts rank 0's parameters, not buffers: as the trainer's DDP with broadcast_buffers=False)
        self.groups = list(optimizer.param_groups)  # the dicts the trainer writes lr / weight_decay into (at set-up)
        self.params = [p for g in self.groups for p in g["params"]]  # (DeepSpeed swaps in flat shards)
        # the skippable groups by index, with their parameters (DeepSpeed swaps a flat shard into each group)
        self.skippable = {i: list(g["params"]) for i, g in enumerate(self.groups) if g.get("skippable")}
        self.names = {id(p): n for n, p in method.named_parameters()}
        self._hook_owner = type(method)
        rng = rng_state()  # DeepSpeed's set-up must not shift the (possibly just resumed) random streams
        self.engine, self.zero_optimizer, _, _ = deepspeed.initialize(
            model=method, optimizer=optimizer,
            config=ds_config(stage, batch_size=batch_size, world_size=self.world_size, clip_grad=clip_grad,
                             trainable=sum(p.numel() for p in self.params)))
        set_rng_state(rng)
        real = self.zero_optimizer.optimizer  # the torch optimizer DeepSpeed steps on the shards
        if real is not optimizer or len(real.param_groups) != len(self.groups) or any(
                a is not b for a, b in zip(real.param_groups, self.groups)):
            raise RuntimeError("DeepSpeed replaced the optimizer's param groups: the trainer's lr / weight-decay "
                               "schedule would not reach the update")
        from .optim import LARS

        if isinstance(real, LARS):
            self._link_lars_segments(real)

    def _link_lars_segments(self, lars) -> None:
        """Tell LARS which parameter each element of its flat shards belongs to (DeepSpeed's own fragment map,
        ``p._hp_mapping``), once: its step then reduces per-parameter norms over the shards of all ranks."""
        zo = self.zero_optimizer
        flats, lps = zo.single_partition_of_fp32_groups, zo.bit16_groups
        if len(flats) != len(self.groups) or any(
                len(g["params"]) != 1 or g["params"][0] is not f for g, f in zip(self.groups, flats)):
            raise RuntimeError("DeepSpeed's flat shards are not the optimizer's parameters: LARS cannot map them")
        for group, flat, params in zip(self.groups, flats, lps):
            seg = torch.full((flat.numel(),), len(params), dtype=torch.long, device=flat.device)  # padding: n
            for j, p in enumerate(params):  # (same order on every rank: the index names the parameter)
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:  # this rank holds a fragment of p
                    a = mapping.get_hp_fragment_address()
                    seg[a.start:a.start + a.numel] = j
            lars.zero_segments[id(flat)] = (seg, len(params))

    # ------------------------------------------------------------------ step
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # backward + reduce(-scatter) of the gradients into the shards

    def step(self, before_optimizer_step: Callable, info) -> None:
        """The method's gradient hook on full averaged gradients, then clip + optimizer step on the shards."""
        from ..methods.base import Method

        skipped = []
        if getattr(self._hook_owner, "before_optimizer_step", None) is not Method.before_optimizer_step:
            skipped = self._run_grad_hook(before_optimizer_step, info)
        # (the optimizer's own group dicts: a resume's load_state_dict replaced those of set-up time)
        real = self.zero_optimizer.optimizer
        groups = [real.param_groups[i] for i in skipped]
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0  # with zero gradients: the shard's parameters stay bit-identical
        self.engine.step()
        for g, lr in zip(groups, lrs):
            g["lr"] = lr
            real.state.pop(g["params"][0], None)  # never stepped, as DDP's skipped parameters

    def _run_grad_hook(self, hook: Callable, info) -> list[int]:
        """Runs ``hook`` on the full averaged gradients and writes them back; returns the indices of the groups
        whose update it skipped (all their parameters' gradients set to None; they get zero gradients)."""
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        for p in self.params:  # one all-reduce per parameter rebuilds the averaged gradient from the shards
            g = safe_get_full_grad(p)
            p.grad = None if g is None else g.detach().clone()
        try:
            hook(info)
            skipped = [i for i, ps in self.skippable.items() if all(p.grad is None for p in ps)]
            whole = {id(p) for i in skipped for p in self.skippable[i]}
            dropped = [self.names.get(id(p), "?") for p in self.params if p.grad is None and id(p) not in whole]
            if dropped:
                raise ValueError(
                    f"--zero-stage {self.stage}: the method's before_optimizer_step set the gradient of "
                    f"{len(dropped)} parameter(s) ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''}) "
                    f"to None at step {info.step} to skip their update, and the method's skippable_parameters() "
                    "does not name them (all of them, with the rest of their group). ZeRO steps whole flat "
                    "shards and cannot skip other single parameters: name them there, or drop --zero-stage")
            new = [torch.zeros_like(p) if id(p) in whole else p.grad for p in self.params]
        finally:
            for p in self.params:
                p.grad = None  # must be None again: safe_set_full_grad writes into p.grad when it exists
        for p, g in zip(self.params, new):
            safe_set_full_grad(p, g.to(torch.float32))  # local: copies this rank's fragment into its shard
        return skipped

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_path: Path, step: int) -> dict:
        """Collective: every rank writes its shard; returns what checkpoint.pth records about them."""
        zero_dir = ckpt_path.parent / ZERO_DIR
        tag = [f"{ckpt_path.stem}-step{step:09d}"]
        if dist.get_rank() == 0:  # never overwrite a tag (checkpoint.pth may point at it: a 2nd save at a step)
            base, n = tag[0], 0
            while (zero_dir / tag[0]).exists():
                n += 1
                tag[0] = f"{base}-{n}"
        dist.broadcast_object_list(tag, 0)
        tag = tag[0]
        # the weights are in checkpoint.pth already: DeepSpeed's own module copy keeps only the trainable ones
        self.engine.save_checkpoint(str(zero_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        dist.barrier()  # every shard is on disk before checkpoint.pth may point at it
        return {"stage": self.stage, "world_size": self.world_size, "dir": ZERO_DIR, "tag": tag}

    @staticmethod
    def prune(ckpt_path: Path, keep_tag: str) -> None:
        """Rank 0, after checkpoint.pth points at ``keep_tag``: drop this checkpoint name's older shards."""
        zero_dir = ckpt_path.parent / ZERO_DIR
        for d in zero_dir.glob(f"{ckpt_path.stem}-step*"):
            if d.name != keep_tag and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def check_resumable(ckpt: dict, path: Path, stage: int, world_size: int) -> None:
        info = ckpt.get("zero")
        if not stage:
            if info:
                raise ValueError(f"{path} was written with --zero-stage {info['stage']} (its optimizer state is "
                                 f"partitioned in {path.parent / info['dir'] / info['tag']}): resume with "
                                 f"--zero-stage {info['stage']} on {info['world_size']} processes")
            return
        if not info:
            raise ValueError(f"--zero-stage {stage}: {path} holds a plain (unpartitioned) optimizer state; resume "
                             "it without --zero-stage, or start a new run (--out elsewhere or --resume none)")
        if info["stage"] != stage or info["world_size"] != world_size:
            raise ValueError(f"--zero-stage {stage} on {world_size} processes: {path} was written with "
                             f"--zero-stage {info['stage']} on {info['world_size']} processes, and its optimizer "
                             "shards only fit that layout; resume with the same --zero-stage and process count")

    def load(self, ckpt_path: Path, info: dict) -> None:
        """Collective: restore this rank's optimizer shard (the method was already loaded from checkpoint.pth)."""
        load_dir = ckpt_path.parent / info["dir"]
        if not (load_dir / info["tag"]).is_dir():
            raise FileNotFoundError(f"{ckpt_path} points at ZeRO optimizer shards in {load_dir / info['tag']}, "
                                    "which do not exist: copy that folder along with the checkpoint")
        rng = rng_state()
        loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=info["tag"], load_optimizer_states=True,
                                                load_lr_scheduler_states=False,
                                                custom_load_fn=_keep_module)  # checkpoint.pth restored it all
        set_rng_state(rng)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the ZeRO shards in {load_dir / info['tag']}")
