"""Run logging: JSONL (one object per logged step), TensorBoard scalars, and a progress bar (rank 0)."""
from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a dependency, but profiling must never be what breaks a run
    _nvtx = None


_NO_RANGE = nullcontext()  # (stateless: one object serves every range)


def nvtx_range(name: str):
    """An NVTX range (visible in Nsight Systems). Without an NVTX tool attached nvtx records nothing, and this
    returns a shared no-op context instead of building an ``nvtx.annotate`` (~0.4 us per range on the host)."""
    return _nvtx.annotate(name, domain="fastcl") if _nvtx_attached() else _NO_RANGE


@functools.lru_cache(maxsize=None)
def _nvtx_attached() -> bool:
    """Whether NVTX ranges of the "fastcl" domain reach a tool (nsys, ...). Decided once, at the first range, as
    nvtx itself does: it caches the domain, a disabled one (no tool injected at that point) stays disabled."""
    if _nvtx is None or not _nvtx.enabled():  # (NVTX_DISABLE set: nvtx's annotate is a nullcontext)
        return False
    try:
        from nvtx._lib import dummy_domain
    except ImportError:  # another nvtx layout: keep the ranges
        return True
    return _nvtx.get_domain("fastcl") is not dummy_domain


class RunLogger:
    """``log.jsonl`` (appended) and TensorBoard scalars. ``resume_step``: a run resumed from a checkpoint of that
    step first drops the records past it (a killed run logged steps the resumed one will log again), from
    log.jsonl and, through ``purge_step``, from TensorBoard."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "log.jsonl"
        if resume_step is not None and path.exists():
            _truncate_jsonl(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"),
                                         purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                  for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))  # wall clock (Unix s): accuracy vs minutes, step gaps
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self._tb.add_scalar(k, v, record["step"])

    def print(self, *args) -> None:
        if self.enabled:
            print(*args, flush=True)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to step ``last_step`` (and any without a step); atomic."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if not isinstance(rec, dict) or rec.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)


class Progress:
    """tqdm bar over the whole run (ETA to the end), with loss / lr / img/s in the postfix."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr,
                            unit="step", mininterval=1.0)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Images per second between two log points."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.images / max(now - self.t0, 1e-9)
        self.t0, self.images = now, 0
        return r
