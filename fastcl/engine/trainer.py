"""The training loop. It knows no method: everything method-specific goes through ``fastcl.methods.Method``.

Per step: scheduled lr/wd -> forward (autocast) -> backward -> method hook -> clip -> optimizer step ->
method hook (EMA, ...). Checkpoints (atomic) every ``ckpt_every`` steps and at every epoch end hold the
method (networks, momentum encoder, queue + pointer, centers), optimizer, scaler, the position in the
data and every rank's RNG state, so a resumed run continues the uninterrupted one exactly (CPU,
``num_workers=0``). A non-finite loss stops the run naming the step, before anything is saved.
With ``zero_stage`` 1/2 the DDP wrap is replaced by DeepSpeed ZeRO (``zero.py``: backward, hooked step,
clip and the partitioned optimizer state go through it).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..methods.base import Method, Step
from .checkpoint import (LATEST, claim_out_dir, find_resume, load_checkpoint, rng_state, save_atomic,
                         set_rng_state)
from .distributed import DistInfo, wrap_ddp
from .logging import Progress, RunLogger, Throughput, nvtx_range
from .optim import build_optimizer, cosine_schedule


class NonFiniteLossError(RuntimeError):
    pass


@torch.no_grad()
def _broadcast_from_rank0(tensors) -> None:
    for t in tensors:
        dist.broadcast(t.data, src=0)


@dataclass
class TrainConfig:
    out_dir: str = "output"
    epochs: int = 200
    batch_size: int = 256  # global (all ranks)
    optimizer: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.03  # peak lr, already scaled for the batch size
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None  # cosine weight-decay schedule (DINO 0.04 -> 0.4)
    clip_grad: float = 0.0  # max grad norm; 0 = off
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    channels_last: bool = True  # CNNs on CUDA
    ckpt_every: int = 0  # steps; 0 = only at epoch ends
    log_every: int = 10
    max_steps: int = 0  # stop after this many global steps (schedules still span all epochs); 0 = off
    knn_every: int = 0  # epochs; 0 = only at the end
    knn_k: int = 200
    knn_t: float = 0.1
    seed: int = 0
    resume: str | None = "auto"
    zero_stage: int = 0  # DeepSpeed ZeRO: 1 partitions the optimizer state, 2 also the gradients; 0 = DDP
    compile: str = "none"  # torch.compile of the method's forward (and so its backward): auto (default on
    #                        CUDA, none on CPU) | none | default | max-autotune | reduce-overhead (CUDA graphs)
    grad_ckpt: bool = False  # activation checkpointing of the trainable backbones (ViT blocks, ResNet/RegNet stages)
    extra: dict[str, Any] = field(default_factory=dict)  # the recipe's own args, saved with checkpoints


class Trainer:
    def __init__(self, method: Method, loader, cfg: TrainConfig, dist_info: DistInfo, *,
                 knn_loaders: tuple | None = None, log_fn: Callable[[dict], None] | None = None):
        self.cfg, self.dist, self.loader = cfg, dist_info, loader
        self.device = dist_info.device
        self.knn_loaders = knn_loaders
        self.method = method.to(self.device)
        self.grad_ckpt_modules: list[str] = []
        if cfg.grad_ckpt:  # before any wrapping (DDP, DeepSpeed, compile), so all of them see the checkpointed modules
            from ..models.checkpointing import enable_grad_checkpointing

            self.grad_ckpt_modules = enable_grad_checkpointing(self.method)
        on_cuda = self.device.type == "cuda"
        if cfg.channels_last and on_cuda:
            self.method.to(memory_format=torch.channels_last)
        amp = ("bf16" if on_cuda else "none") if cfg.amp == "auto" else cfg.amp
        if amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"--amp must be auto, bf16, fp16 or none, got {cfg.amp!r}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        self.zero = None
        if cfg.zero_stage:
            from .zero import check_zero_options

            check_zero_options(cfg.zero_stage, optimizer=cfg.optimizer, amp=amp, world_size=dist_info.world_size)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        groups = self.method.param_groups(cfg.weight_decay)
        if cfg.zero_stage:  # a skipped update must leave whole flat shards out
            from .zero import isolate_skippable

            groups = isolate_skippable(groups, self.method.skippable_parameters())
        for g in groups:
            g["base_wd"] = g["weight_decay"]
        self.optimizer = build_optimizer(cfg.optimizer, groups, lr=cfg.lr, momentum=cfg.momentum,
                                         betas=tuple(cfg.betas), device=self.device)
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training loader yields no batch: the dataset is smaller than one global "
                             f"batch ({cfg.batch_size}); lower --batch-size")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.schedules = self._build_schedules()
        self._out_lock = claim_out_dir(cfg.out_dir) if dist_info.is_main else None  # one run per --out
        self._bar: Progress | None = None  # the progress bar, while fit() runs
        try:
            self._setup(log_fn, on_cuda)
        except BaseException:  # a refused resume, a bad option: the folder is free again for the next try
            if self._out_lock is not None:
                self._out_lock.release()
            raise

    def _setup(self, log_fn, on_cuda: bool) -> None:
        """The part of the construction that runs with ``--out`` claimed: resume, logs, wrapping, compilation."""
        cfg, dist_info = self.cfg, self.dist
        self.log_fn = log_fn
        self.model: nn.Module = self.method
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self._last_checkpoint: tuple[Path, int] | None = None  # (path, step) a resume would start from
        resumed = self._maybe_resume()
        # log.jsonl / TensorBoard cut back to the checkpoint's step: a killed run's records past it are replayed
        self.logger = RunLogger(cfg.out_dir, enabled=dist_info.is_main,
                                resume_step=self.step if resumed is not None else None)
        if dist_info.world_size > 1:
            self._broadcast_state()
        if cfg.zero_stage:
            from .zero import ZeroEngine

            self.zero = ZeroEngine(self.method, self.optimizer, stage=cfg.zero_stage, batch_size=cfg.batch_size,
                                   clip_grad=cfg.clip_grad, device=self.device)
            self.model = self.zero.engine
            if resumed is not None:
                self.zero.load(*resumed)
        elif dist_info.world_size > 1:
            self.model = wrap_ddp(self.method, [self.device.index] if on_cuda else None)
        self.compile_mode = self._compile_mode(on_cuda)
        if self.compile_mode != "none":
            # forward + loss in one graph (the fused kernels are torch.library ops with fake implementations);
            # the optimizer step and the methods' hooks (EMA, queue) stay eager. A compiler failure falls back to
            # eager with PyTorch's warning naming it, instead of ending the run (--compile none avoids both)
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True
            self.model = torch.compile(self.model, mode=None if self.compile_mode == "default" else self.compile_mode)

    COMPILE_MODES = ("auto", "none", "default", "max-autotune", "reduce-overhead")

    def _compile_mode(self, on_cuda: bool) -> str:
        mode = self.cfg.compile
        if mode not in self.COMPILE_MODES:
            raise ValueError(f"--compile must be one of {', '.join(self.COMPILE_MODES)}, got {mode!r}")
        if mode == "auto":
            mode = "default" if on_cuda and not self.cfg.zero_stage else "none"
        if mode != "none" and self.cfg.zero_stage:
            raise ValueError(f"--compile {mode} with --zero-stage {self.cfg.zero_stage}: the DeepSpeed engine is not "
                             "compiled by fastcl yet; pass --compile none")
        if mode == "reduce-overhead" and not on_cuda:
            raise ValueError("--compile reduce-overhead records CUDA graphs: it needs a CUDA device")
        return mode

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        """Rank 0's parameters and buffers to every rank. DDP runs with ``broadcast_buffers=False`` (queues,
        banks and centers are the methods' own), so it would leave randomly initialised buffers (a MoCo queue,
        an InstDisc memory bank) different on each rank, each seeded with its own rank."""
        _broadcast_from_rank0([*self.method.parameters(), *self.method.buffers()])

    @torch.no_grad()
    def _sync_norm_stats(self) -> None:
        """BN running statistics drift apart per rank (DDP without buffer broadcast, no SyncBN in the ResNet
        methods): give every rank rank 0's before kNN and checkpoints, as DDP's default buffer broadcast does."""
        if self.dist.world_size > 1:
            _broadcast_from_rank0([t for m in self.method.modules()
                                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                                   for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None])

    # ------------------------------------------------------------------ schedules
    def _build_schedules(self) -> dict[str, np.ndarray]:
        c, spe = self.cfg, self.steps_per_epoch
        s = {"lr": cosine_schedule(c.lr, c.min_lr, c.epochs, spe, c.warmup_epochs),
             "wd": cosine_schedule(c.weight_decay, c.weight_decay if c.weight_decay_end is None
                                   else c.weight_decay_end, c.epochs, spe)}
        own = dict(self.method.schedules(c.epochs, spe))
        if self.method.lr_schedule is not None:
            own["lr"] = np.asarray(self.method.lr_schedule(c.epochs, spe), dtype=np.float64)
        if "lr" in own and (c.warmup_epochs or c.min_lr) and self.dist.is_main:  # (step-lr recipes)
            print(f"warning: this method's own lr schedule replaces the cosine one: --warmup-epochs "
                  f"{c.warmup_epochs} and --min-lr {c.min_lr} have no effect", flush=True)
        s.update(own)
        for name, arr in s.items():
            if len(arr) != self.total_steps:
                raise ValueError(f"schedule {name!r} has {len(arr)} steps, expected {self.total_steps}")
        return s

    def _apply_schedules(self, step: int) -> Step:
        # written into the optimizer's group dicts of this step, every step: a resume's load_state_dict replaces the
        # dicts, and a value equal to the last step's costs no more to write than to compare
        values = {}
        for name, arr in self.schedules.items():  # (a loop: a comprehension is one more Python frame per step)
            values[name] = float(arr[step])
        lr, wd, base_lr, base_wd = values["lr"], values["wd"], self.cfg.lr, self.cfg.weight_decay
        for g in self.optimizer.param_groups:
            g["lr"] = base_lr if g.get("fixed_lr") else lr * g.get("lr_scale", 1.0)
            if g["base_wd"] > 0:  # no-decay groups stay at 0
                g["weight_decay"] = wd * g["base_wd"] / base_wd if base_wd else 0.0
        return Step(step, self.epoch, self.steps_per_epoch, self.total_steps, values)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        # every rank's RNG and loader state (DALI's augmentation stream), so each resumes its own streams
        mine = (rng_state(), self.loader.state_dict() if hasattr(self.loader, "state_dict") else None)
        if self.dist.world_size > 1:
            both = [None] * self.dist.world_size
            dist.all_gather_object(both, mine)
        else:
            both = [mine]
        rngs, loaders = [r for r, _ in both], [s for _, s in both]
        return {"model": self.method.state_dict(), "method": type(self.method).__name__, **self.backbone_record(),
                "optimizer": None if self.zero else self.optimizer.state_dict(),  # ZeRO: shards, see save
                "scaler": self.scaler.state_dict(),
                "position": {"epoch": self.epoch, "batch": self.batch_in_epoch, "step": self.step},
                "rng": rngs, "loader": loaders, "world_size": self.dist.world_size,
                "config": dataclasses.asdict(self.cfg), "args": self.cfg.extra}  # args: the recipe's (arch, ...)

    def backbone_record(self) -> dict:
        """What export needs to find and rebuild the backbone: where it sits in ``model`` (DINO: the teacher's,
        ``teacher_backbone.``) and its class (a fastcl encoder has no torchvision/timm counterpart)."""
        backbone = self.method.backbone
        prefix = next((name + "." for name, m in self.method.named_modules() if name and m is backbone), None)
        cls = type(backbone)
        return {"backbone_prefix": prefix, "backbone_class": f"{cls.__module__}.{cls.__qualname__}"}

    def save(self, name: str = LATEST) -> None:
        with nvtx_range("checkpoint"):
            self._save(name)

    def _save(self, name: str) -> None:
        path = Path(self.cfg.out_dir) / name
        self._check_state_finite(path)  # collective under DDP: all ranks agree
        self._sync_norm_stats()  # collective
        zero = self.zero.save(path, self.step) if self.zero else None  # collective: shards first
        state = self._state()  # collective: every rank takes part
        if self.dist.is_main:
            save_atomic({**state, "zero": zero} if zero else state, path)
            if zero:
                self.zero.prune(path, zero["tag"])
        self._last_checkpoint = (path, self.step)

    def _what_exists(self) -> str:
        """Which checkpoint a resumed run would start from, in words."""
        if self._last_checkpoint is None:
            return f"no checkpoint of this run exists in {self.cfg.out_dir} (nothing to resume)"
        path, step = self._last_checkpoint
        return f"the last checkpoint, {path} (step {step}), is intact and was not overwritten"

    @torch.no_grad()
    def _check_state_finite(self, path: Path) -> None:
        """Refuse to write a checkpoint holding NaN/inf parameters, buffers or optimizer state (a finite loss can be
        followed by an update that poisons the weights): one isfinite per tensor, one host read, at checkpoints
        only."""
        tensors = [t for t in [*self.method.parameters(), *self.method.buffers()] if t.is_floating_point()]
        if not self.zero:
            tensors += [v for st in self.optimizer.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor) and v.is_floating_point()]
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else \
            torch.ones((), dtype=torch.bool, device=self.device)
        if self.dist.world_size > 1:
            ok = ok.to(self.device, torch.int32)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok):
            raise NonFiniteLossError(
                f"the weights are not finite after step {self.step} (an update diverged): {path} was not written; "
                f"{self._what_exists()}. Lower the lr, check the data, or try --amp none.")

    def _maybe_resume(self) -> tuple | None:
        path = find_resume(self.cfg.out_dir, self.cfg.resume)
        if path is None:
            return None
        ckpt = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "position", "rng") if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {path} lacks {missing}: not a fastcl training checkpoint (--resume takes "
                             "the checkpoint.pth a run writes in its --out)")
        from .zero import ZeroEngine  # (imports no DeepSpeed)

        ZeroEngine.check_resumable(ckpt, path, self.cfg.zero_stage, self.dist.world_size)
        self._check_same_run(ckpt, path)
        try:
            self.method.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # another method / arch / queue size: name the file, not just the tensors
            raise ValueError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0]} ...); pass "
                             "--out NEW_DIR for a new run or --resume none") from e
        if not self.cfg.zero_stage:  # ZeRO: the shards are loaded once the engine exists
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        pos = ckpt["position"]
        self.epoch, self.batch_in_epoch, self.step = pos["epoch"], pos["batch"], pos["step"]
        if ckpt.get("world_size") == self.dist.world_size:
            set_rng_state(ckpt["rng"][self.dist.rank])
            if hasattr(self.loader, "load_state_dict"):  # (the loader warns if the state is not its own)
                self.loader.load_state_dict((ckpt.get("loader") or [None] * (self.dist.rank + 1))[self.dist.rank])
        elif self.dist.is_main:
            print(f"warning: {path} was written by {ckpt.get('world_size')} ranks, resuming on "
                  f"{self.dist.world_size}: RNG streams restart", flush=True)
        self._last_checkpoint = (path, self.step)
        if self.dist.is_main:
            print(f"resumed from {path} at epoch {self.epoch}, batch {self.batch_in_epoch}, step {self.step}",
                  flush=True)
        return path, ckpt.get("zero")

    # Options that may change between a run and its resumption; any other recipe argument defines the run.
    RESUMABLE_CHANGES = frozenset({"out", "resume", "max_steps", "ckpt_every", "log_every", "knn_every", "knn_k",
                                   "knn_t", "knn_samples", "no_knn", "eval_data", "workers", "device", "kernels",
                                   "data_backend",
                                   "amp", "batch_size_given", "min_lr_given", "compile",
                                   "grad_ckpt"})

    def _check_same_run(self, ckpt: dict, path: Path) -> None:
        """Auto-resume finds whatever sits in --out: refuse a checkpoint of another configuration (a different
        dataset, arch, batch, queue ...) naming the options, instead of mixing the two runs."""
        theirs, mine = ckpt.get("method"), type(self.method).__name__
        if theirs and theirs != mine:  # (was: a list of the two recipes' differing options, half of them None)
            raise ValueError(f"checkpoint {path} was written by {theirs}, not {mine}; pass --out NEW_DIR for a new "
                             "run, or --resume none to start over in this one")
        old, new = ckpt.get("args") or {}, self.cfg.extra
        if not old or not new:
            return
        norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (argparse lists vs preset tuples)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in self.RESUMABLE_CHANGES and norm(old.get(k)) != norm(new.get(k)))
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ValueError(f"checkpoint {path} is from another configuration ({shown}); pass --out NEW_DIR for a "
                             "new run, --resume none to start over in this one, or the checkpoint's options")

    # ------------------------------------------------------------------ evaluation
    def knn(self) -> dict | None:
        if self.knn_loaders is None:
            return None
        from ..eval.rankme import LabelFree

        if isinstance(self.knn_loaders, LabelFree):  # unlabeled data: RankMe and the embedding's std instead
            with nvtx_range("label-free monitor"):
                return self._label_free(self.knn_loaders.loader)
        train_loader, val_loader = self.knn_loaders
        with nvtx_range("knn"):
            return self._knn(train_loader, val_loader)

    def _label_free(self, loader) -> dict:
        from ..eval.rankme import label_free_eval

        self._sync_norm_stats()
        res = label_free_eval(self.method.backbone, loader, self.device, self.amp_dtype, progress=self.dist.is_main)
        self.logger.log({"step": self.step, "epoch": self.epoch, **res})
        self.logger.print(f"epoch {self.epoch} step {self.step}: RankMe {res['rankme']:.1f} (at most "
                          f"{res['rankme_max']}), embedding std {res['emb_std']:.4f} (1/sqrt(dim) = "
                          f"{res['emb_std_ref']:.4f}; 0 = collapsed)")
        return res

    def _knn(self, train_loader, val_loader) -> dict:
        from ..eval.knn import knn_eval

        self._sync_norm_stats()  # every rank embeds its shard with the same model
        with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
            res = knn_eval(self.method.backbone, train_loader, val_loader, self.device,
                           k=self.cfg.knn_k, T=self.cfg.knn_t, progress=self.dist.is_main)
        self.logger.log({"step": self.step, "epoch": self.epoch, **{f"knn_{k}": v for k, v in res.items()}})
        self.logger.print(f"epoch {self.epoch} step {self.step}: kNN top-1 {res['top1']:.4f}")
        return res

    # ------------------------------------------------------------------ loop
    def _to_device(self, views):
        device = self.device
        cl = self.cfg.channels_last and device.type == "cuda"
        views = views if isinstance(views, (list, tuple)) else [views]
        out = []
        for v in views:
            if v.device != device:  # (.to would return v itself: a loader that already yields device tensors)
                v = v.to(device, non_blocking=True)
            if cl and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            out.append(v)
        return out

    def _check_finite(self) -> None:
        """Raise if a step since the last check had a non-finite loss (one host sync per check). Under DDP the
        ranks agree (first bad step of any rank), so all stop together instead of some waiting in a collective."""
        n = self.step - self._unchecked_from
        if n == 0:  # (the same on every rank: they step together)
            return
        never = torch.iinfo(torch.long).max
        bad = ~torch.isfinite(self._losses[:n])
        first = torch.where(bad.any(), bad.to(torch.uint8).argmax().to(torch.long) + self._unchecked_from, never)
        if self.dist.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        s = int(first.item())
        self._unchecked_from = self.step
        if s != never:  # (s counts from 0; log.jsonl numbers the step after it, s + 1)
            raise NonFiniteLossError(
                f"loss is not finite at step {s + 1} (epoch {s // self.steps_per_epoch}): stopping; "
                f"{self._what_exists()}. Lower the lr, check the data, or try --amp none.")

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            if self._bar is not None:  # (an error's line then starts on a line of its own, not after the bar)
                self._bar.close()
            self.logger.close()
            if self._out_lock is not None:
                self._out_lock.release()

    def _fit(self) -> dict:
        cfg = self.cfg
        end_step = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        bar = self._bar = Progress(end_step, self.step, enabled=self.dist.is_main)
        first_step, first_loss = self.step + 1, float("nan")  # the bar's loss before the first log step
        tput = Throughput()
        # every step's loss since the last check, on the device (one copy per step; was 6 ops per step keeping the
        # first bad step number there): read at log / checkpoint / epoch boundaries, at most min(log_every,
        # steps_per_epoch) steps apart, so a step never syncs and the error still names the first bad step
        self._losses = torch.zeros(min(cfg.log_every, self.steps_per_epoch, end_step) + 1, device=self.device)
        slots = self._losses.unbind()  # one view per slot, made once (a step copies into its own: no indexing op)
        self._unchecked_from = self.step
        # what every step looks up, once: the loop below is the engine's host overhead on a small step
        # (benchmarks/bench_overhead.py), so what does nothing here -- NVTX ranges without a tool attached, autocast
        # with amp off, a disabled GradScaler's identity scale / pass-through step / no-op update and unscale_ -- is
        # not entered every step
        nv_data, nv_fwd, nv_bwd, nv_opt, nv_ema = (nvtx_range(n) for n in
                                                   ("data", "forward", "backward", "optimizer", "ema"))
        amp_dtype, device_type = self.amp_dtype, self.device.type
        scaler = self.scaler if self.scaler.is_enabled() else None
        # CUDA graphs (--compile reduce-overhead): each step starts a new iteration of the recorded graphs, whose
        # replay may overwrite the last step's outputs -- nothing of them is read after its own step (the loss is
        # copied into its slot, logged values are read in that step), so this is said explicitly, not inferred
        mark_step = torch.compiler.cudagraph_mark_step_begin if self.compile_mode == "reduce-overhead" else None
        model, method, optimizer, zero = self.model, self.method, self.optimizer, self.zero
        spe, log_every, ckpt_every, clip_grad = self.steps_per_epoch, cfg.log_every, cfg.ckpt_every, cfg.clip_grad
        is_main, batch_size = self.dist.is_main, cfg.batch_size
        result: dict = {}
        method.train()
        while self.step < end_step:
            self.loader.set_epoch(self.epoch, self.batch_in_epoch)
            data_iter = iter(self.loader)
            while self.batch_in_epoch < spe and self.step < end_step:
                step = self.step
                with nv_data:
                    try:
                        views, _labels, indices = next(data_iter)
                    except StopIteration:
                        raise RuntimeError(
                            f"loader ended after {self.batch_in_epoch} of {spe} batches in "
                            f"epoch {self.epoch}") from None
                    views = self._to_device(views)
                info = self._apply_schedules(step)
                if method.needs_indices:
                    info.indices = indices.to(self.device, non_blocking=True)
                if mark_step is not None:
                    mark_step()
                if amp_dtype is None:
                    with nv_fwd:
                        out = model(views, info)
                else:
                    with nv_fwd, torch.autocast(device_type, dtype=amp_dtype):
                        out = model(views, info)
                loss = out["loss"]
                if step + 1 == first_step and is_main:  # one read, in the first step only: the bar shows a
                    first_loss = float(loss.detach())  # loss from the start (was: from step 10)
                slots[step - self._unchecked_from].copy_(loss.detach())
                with nv_bwd:
                    if zero:
                        zero.backward(loss)
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        (loss if scaler is None else scaler.scale(loss)).backward()
                with nv_opt:
                    if zero:  # hook on the full averaged grads, clip and step on the shards
                        zero.step(method.before_optimizer_step, info)
                    else:
                        method.before_optimizer_step(info)
                        if clip_grad > 0:
                            if scaler is not None:
                                scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(method.parameters(), clip_grad, foreach=True)
                        if scaler is None:
                            optimizer.step()
                        else:
                            scaler.step(optimizer)
                            scaler.update()
                with nv_ema:
                    method.after_optimizer_step(info)
                self.step = step = step + 1
                self.batch_in_epoch += 1
                tput.add(batch_size)
                if step % log_every == 0 or step == end_step:
                    self._check_finite()
                    rec = {"step": step, "epoch": self.epoch, "lr": info["lr"],
                           **{k: float(v.detach()) for k, v in out.items()}, "img_per_s": tput.rate()}
                    self.logger.log(rec)
                    if self.log_fn:
                        self.log_fn(rec)
                    bar.update(1, loss=f"{rec['loss']:.4f}", lr=f"{info['lr']:.3g}",
                               img_s=f"{rec['img_per_s']:.0f}")
                elif step == first_step and is_main:
                    bar.update(1, loss=f"{first_loss:.4f}", lr=f"{info['lr']:.3g}")
                else:  # the count and ETA move every step (slow CPU steps); loss etc. need a sync: log steps only
                    bar.update(1)
                if ckpt_every and step % ckpt_every == 0 and self.batch_in_epoch < spe:  # (epoch ends save below)
                    self._check_finite()
                    self.save()
            if self.batch_in_epoch >= self.steps_per_epoch:  # epoch finished
                self.epoch += 1
                self.batch_in_epoch = 0
                self._check_finite()
                self.save()
                if cfg.knn_every and self.epoch % cfg.knn_every == 0 and self.step < end_step:
                    result = self.knn() or result
                    self.method.train()
        bar.close()
        self._check_finite()
        self.save()
        result = self.knn() or result
        return {"step": self.step, "epoch": self.epoch, **(result or {})}
