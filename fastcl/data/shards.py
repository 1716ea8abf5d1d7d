"""Sharded tar datasets (the WebDataset layout): ``shard-000000.tar`` holding ``KEY.jpg`` (or .png, ...) and, for
labeled data, ``KEY.cls`` (the class index as text), members of one sample next to each other.

Write shards from a folder::

    python -m fastcl.data.shards --src FOLDER --out DIR --shard-size N [--labels]

(``FOLDER``: images at any depth, or with ``--labels`` one sub-folder per class, e.g. ``imagenet/train``; non-image
files are skipped and counted). It prints the ``--data`` pattern to train with, e.g.
``--data 'DIR/shard-{000000..000009}.tar'``.

Read them (``ShardLoader``, the torchvision back end): a streaming reader -- each shard is read front to back,
never by random access to a sample -- with the engine's loader protocol. Per epoch (all deterministic in
``seed``, ``epoch``):

1. the shards are put in a random order (seed + epoch) and their samples concatenated (tar order inside a shard);
   the sequence is cut to a multiple of ``world_size * batch_size`` (as ``shard_batches`` with ``drop_last``: at
   most ``world_size * batch_size - 1`` samples, at the end of the epoch's order, skipped this epoch);
2. rank ``r`` takes the ``r``-th contiguous slice: every kept sample is read exactly once per epoch across the
   ranks, each rank gets the same number of full batches;
3. the rank's slice is split into ``slots`` contiguous parts (``max(1, num_workers)``), one per DataLoader worker;
   each slot streams its part through a shuffle buffer (``shuffle_buffer`` samples, seeded by seed, epoch, rank,
   slot) and emits whole batches; the rank's batch ``i`` is slot ``i % slots``'s batch ``i // slots``.

Samples carry their position in the listed shards' order as ``index`` (stable across epochs: memory banks key on
it) and the ``.cls`` label, or -1 without one.

**Mid-epoch resume** (``set_epoch(e, start_batch=k)``): each slot re-reads its part of the epoch and drops, before
decoding, the samples of the batches already trained on, and the workers take their slots rotated so that batch
``k`` comes first: the remaining batches are exactly the ones the interrupted run had not trained on, in the same
order, each sample once; with ``--workers 0`` also with the same augmentations (bit-exact, as for folders). It costs
reading (not decoding) the skipped part of the epoch. Resuming with another ``--workers`` changes the slots, so the
epoch's plan: the resumed epoch then restarts its plan at batch ``k`` of the new plan (a warning says so; some
samples of that epoch are then seen twice or not at all); later epochs are unaffected.

The DALI back end reads the same shards with ``fn.readers.webdataset`` (``fastcl.data.dali``).
"""
from __future__ import annotations

import io
import multiprocessing
import multiprocessing.context
import os
import re
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .imagefolder import IMG_EXTENSIONS, _LOAD_ERRORS, scan_images
from .loader import EpochPosition

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shard_source(source: str) -> bool:
    """``source`` names tar shards: a ``{000000..000099}`` pattern or a single ``.tar`` path."""
    return source.endswith(".tar") or (_BRACES.search(source) is not None and ".tar" in source)


def expand(pattern: str) -> list[str]:
    """The paths of a brace pattern (``shard-{000000..000099}.tar``: zero-padded, inclusive; several ranges
    allowed), or ``[pattern]``. Raises ``FileNotFoundError`` naming the first missing shard and the count."""
    paths = [pattern]
    while True:
        m = _BRACES.search(paths[0])
        if m is None:
            break
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        if hi < lo:
            raise ValueError(f"--data {pattern}: empty range {m.group(0)}")
        paths = [p[:m.start()] + str(k).zfill(width) + p[m.end():] for p in paths for k in range(lo, hi + 1)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--data {pattern}: {len(missing)} of {len(paths)} shard(s) missing, e.g. {missing[0]}")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset key and extension: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def index_shard(path: str) -> list[tuple[str, int, int, int | None, str]]:
    """``(key, data offset, size, label, image member name)`` of the image samples of one shard, in tar order
    (headers only)."""
    samples: dict[str, list] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            if key not in samples:
                samples[key] = [None, None, None, None]
                order.append(key)
            if "." + ext in IMG_EXTENSIONS:
                samples[key][0], samples[key][1], samples[key][3] = m.offset_data, m.size, m.name
            elif ext == "cls":
                tar.fileobj.seek(m.offset_data)
                samples[key][2] = int(tar.fileobj.read(m.size).decode().strip())
    return [(k, *samples[k]) for k in order if samples[k][0] is not None]


class ShardIndex:
    """The samples of a list of shards: per shard its ``(key, offset, size, label, member name)`` rows."""

    def __init__(self, source: str):
        self.source = source
        self.paths = expand(source)
        self.shards = [index_shard(p) for p in self.paths]
        self.sizes = np.array([len(s) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        if self.sizes.sum() == 0:
            raise ValueError(f"--data {source}: the shards hold no image sample (expected KEY.jpg members)")
        self.has_labels = all(row[3] is not None for shard in self.shards for row in shard)

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def head(self, n: int) -> "ShardIndex":
        """The first ``n`` samples in the listed order (all when fewer): the first shards, the last one cut."""
        n = min(n, len(self))
        k = int(np.searchsorted(np.cumsum(self.sizes), n)) + 1
        out = object.__new__(ShardIndex)
        out.source, out.paths, out.shards = self.source, self.paths[:k], [list(s) for s in self.shards[:k]]
        out.shards[-1] = out.shards[-1][:n - int(self.starts[k - 1])]
        out.sizes = np.array([len(s) for s in out.shards], np.int64)
        out.starts, out.has_labels = self.starts[:k], self.has_labels
        return out


# ============ DALI's index files ============

def dali_index_text(rows: Sequence[tuple]) -> str:
    """DALI's webdataset index of one shard (the format of its ``wds2idx`` tool, version v1.2): a line
    ``v1.2 <samples>``, then one line per sample listing its components as ``<ext> <data offset> <size> <name>``.
    Only the image member is listed: the reader outputs the image, labels come from ``ShardIndex``."""
    lines = [f"v1.2 {len(rows)}"]
    for row in rows:
        name = re.sub(r"\s", "_", row[4])  # (the format splits on whitespace; the name is only informational)
        lines.append(f"{_split_name(row[4])[1]} {row[1]} {row[2]} {name}")
    return "\n".join(lines) + "\n"


def _index_images(text: str) -> list[tuple[int, int]] | None:
    """(offset, size) of each sample's image component in a DALI index file, or ``None`` if it is not one."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit() or len(lines) != int(head[1]) + 1:
        return None
    out = []
    for line in lines[1:]:
        t = line.split()
        if len(t) % 4:
            return None
        img = [(int(t[i + 1]), int(t[i + 2])) for i in range(0, len(t), 4) if "." + t[i].lower() in IMG_EXTENSIONS]
        if img:
            out.append(img[-1])  # (ShardIndex keeps a key's last image member too)
    return out


def _describes(idx_path: Path, rows: Sequence[tuple]) -> bool:
    try:
        text = idx_path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return _index_images(text) == [(r[1], r[2]) for r in rows]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dali_index_files(index: ShardIndex, cache_dir: str | os.PathLike | None = None,
                     rows: Sequence[Sequence[tuple] | None] | None = None) -> list[str]:
    """One DALI index file per shard of ``index`` (``fn.readers.webdataset``'s ``index_paths``): ``<shard>.idx``
    next to the shard (``shard-000000.idx``) when it describes the shard (written by ``write_shards``, by an earlier
    run or by DALI's ``wds2idx``); else written there now; else -- a read-only folder, or an ``.idx`` there that
    describes another version of the shard (left as it is) -- in ``cache_dir`` (default ``$FASTCL_DATA`` or
    ``~/.cache/fastcl``, under ``wds-index/``), named by a hash of the shard's path, size and mtime.

    ``rows[s]`` (when given and not ``None``) replaces shard ``s``'s rows: an index that is not the shard's own (an
    undecodable sample's line pointing at another sample, ``DaliShardLoader``) is only written in ``cache_dir``,
    its name hashing its text too: the shard's own ``.idx`` stays as it is."""
    out = []
    for s, (path, shard_rows) in enumerate(zip(index.paths, index.shards)):
        own = rows is None or rows[s] is None
        if not own:
            shard_rows = rows[s]
        target = Path(path).with_suffix(".idx")
        if own and _describes(target, shard_rows):
            out.append(str(target))
            continue
        text = dali_index_text(shard_rows)
        if own and not target.exists():
            try:
                _write_atomic(target, text)
                out.append(str(target))
                continue
            except OSError:
                pass
        st = os.stat(path)
        import hashlib

        tag = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}" + ("" if own else "\n" + text)
        tag = hashlib.sha1(tag.encode()).hexdigest()[:16]
        root = Path(cache_dir or os.environ.get("FASTCL_DATA") or Path.home() / ".cache" / "fastcl") / "wds-index"
        cached = root / f"{target.stem}-{tag}.idx"
        if not _describes(cached, shard_rows):
            try:
                root.mkdir(parents=True, exist_ok=True)
                _write_atomic(cached, text)
            except OSError as err:
                raise OSError(f"--data {index.source}: cannot write DALI's index of {path} next to it nor in "
                              f"{root} ({err.strerror or err}): set FASTCL_DATA to a writable folder") from None
        out.append(str(cached))
    return out


# ============ the streaming reader ============

def _slot_ranges(n_batches: int, slots: int, batch_size: int) -> list[tuple[int, int]]:
    """Sample ranges (within the rank's slice) of each slot: slot s holds ceil((n - s) / slots) batches."""
    counts = [max(0, -(-(n_batches - s) // slots)) for s in range(slots)]
    out, start = [], 0
    for c in counts:
        out.append((start, start + c * batch_size))
        start += c * batch_size
    return out


class _SlotStream(torch.utils.data.IterableDataset):
    """What a DataLoader worker runs: its slot(s) of the rank's plan, as single samples (the DataLoader batches
    them: every slot holds whole batches)."""

    def __init__(self, loader: "ShardLoader"):
        self.loader = loader
        self.plan: dict = {}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        p = self.plan
        slots = p["slots"]
        # worker j takes slot (j + start_batch) % slots: the DataLoader asks workers in turn from worker 0, so batch
        # start_batch (of slot start_batch % slots) comes first
        mine = [(j + p["start_batch"]) % slots for j in range(worker, slots, n_workers)]
        streams = [self.loader._slot_samples(p, s) for s in mine]
        if len(streams) == 1:
            yield from streams[0]
            return
        bs = self.loader.batch_size  # one worker, several slots (workers 0): whole batches in turn
        while streams:
            for it in list(streams):
                batch = [x for _, x in zip(range(bs), it)]
                if not batch:
                    streams.remove(it)
                yield from batch


class ShardLoader(EpochPosition):
    """Streaming loader over tar shards with the engine's loader protocol (module docstring).

    Yields ``(views, labels, indices)`` as ``TorchLoader``. ``transform`` runs on the decoded RGB PIL image.
    """

    def __init__(self, source: str, transform: Callable | None, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 2, shuffle_buffer: int = 1000,
                 pin_memory: bool = False, index: ShardIndex | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.index = index or ShardIndex(source)
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.slots = max(1, num_workers)
        self.epoch, self.start_batch = 0, 0
        # one flag per sample found undecodable, shared with the DataLoader workers (as ImageFileDataset's)
        self._bad_flags = multiprocessing.Array("b", max(1, len(self.index)), lock=False)
        if len(self) == 0:
            raise ValueError(f"the training set has {len(self.index)} samples, fewer than one global batch "
                             f"({world_size} process(es) x {batch_size}): lower --batch-size")
        self._stream = _SlotStream(self)
        # (its own generator: the DataLoader draws its base seed from it, not from the global RNG that the
        # transforms of --workers 0 use, so a resumed run's augmentations stay those of the uninterrupted one)
        self._generator = torch.Generator()
        self._loader = torch.utils.data.DataLoader(self._stream, batch_size=batch_size, num_workers=num_workers,
                                                   pin_memory=pin_memory, generator=self._generator)

    def __len__(self) -> int:
        return len(self.index) // (self.world_size * self.batch_size)

    def state_dict(self) -> dict:
        return {"backend": "shards", "slots": self.slots}

    def load_state_dict(self, state: dict | None) -> None:
        if state and state.get("backend") == "shards" and state.get("slots") != self.slots:
            warnings.warn(f"ShardLoader: the checkpoint's epoch plan had {state['slots']} slot(s) (--workers), this "
                          f"run has {self.slots}: the resumed epoch continues at its batch position in the new plan "
                          "(some of its samples are seen twice or not at all); later epochs are unaffected",
                          RuntimeWarning, stacklevel=2)

    # ---- the plan ----
    def _rank_slice(self, epoch: int) -> list[tuple[int, int, int]]:
        """This rank's samples of ``epoch`` as ``(shard, first row, end row)`` runs, in reading order."""
        order = torch.randperm(len(self.index.paths), generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = len(self) * self.batch_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        runs, pos = [], 0
        for s in order.tolist():
            n = int(self.index.sizes[s])
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                runs.append((s, a - pos, b - pos))
            pos += n
            if pos >= hi:
                break
        return runs

    def epoch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's index batches for ``epoch`` in yield order (reads no image: for tests and accounting)."""
        plan = self._plan(self.epoch if epoch is None else epoch, 0)
        per_slot = [[i for i, _ in self._slot_rows(plan, s)] for s in range(plan["slots"])]
        bs, out = self.batch_size, []
        for i in range(len(self)):
            s, j = i % plan["slots"], i // plan["slots"]
            out.append(np.asarray(per_slot[s][j * bs:(j + 1) * bs], np.int64))
        return out

    def _plan(self, epoch: int, start_batch: int) -> dict:
        return {"epoch": epoch, "start_batch": start_batch, "slots": self.slots, "runs": self._rank_slice(epoch)}

    def _slot_rows(self, plan: dict, slot: int) -> Iterator[tuple[int, tuple]]:
        """(global index, (shard, row)) of a slot's samples after the shuffle buffer, before any skipping."""
        a, b = _slot_ranges(len(self), plan["slots"], self.batch_size)[slot]
        rng = np.random.default_rng([self.seed, plan["epoch"], self.rank, slot])
        buf: list = []

        def rows():
            pos = 0
            for s, r0, r1 in plan["runs"]:
                lo, hi = max(a, pos), min(b, pos + r1 - r0)
                for r in range(r0 + lo - pos, r0 + hi - pos):
                    yield int(self.index.starts[s]) + r, (s, r)
                pos += r1 - r0
                if pos >= b:
                    return

        for item in rows():
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            k = int(rng.integers(len(buf)))
            buf[k], item = item, buf[k]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _slot_samples(self, plan: dict, slot: int):
        """A slot's decoded samples, the batches before ``start_batch`` dropped undecoded."""
        k, slots = plan["start_batch"], plan["slots"]
        skip = max(0, -(-(k - slot) // slots)) * self.batch_size
        handles: dict[int, object] = {}
        try:
            for n, (index, (s, r)) in enumerate(self._slot_rows(plan, slot)):
                if n < skip:
                    continue
                yield self._load(handles, index, s, r)
        finally:
            for f in handles.values():
                f.close()

    def _load(self, handles: dict, index: int, s: int, r: int):
        from PIL import Image

        n = len(self.index)
        for k in range(n):  # a sample that does not decode: the next one in the listed order (as image folders)
            j = (index + k) % n
            if self._bad_flags[j]:  # (found bad before, here or in another worker: not decoded again)
                continue
            s2, r2 = self._locate(j) if k else (s, r)
            key, off, size, label = self.index.shards[s2][r2][:4]
            f = handles.get(s2)
            if f is None:
                f = handles[s2] = open(self.index.paths[s2], "rb")
            f.seek(off)  # (within the shard being streamed: a forward seek past the member header)
            try:
                img = Image.open(io.BytesIO(f.read(size)))
                img.load()
                img = img.convert("RGB")
            except _LOAD_ERRORS as err:
                name = f"{self.index.paths[s2]}:{key}"
                if not self._bad_flags[j]:
                    self._bad_flags[j] = 1
                    warnings.warn(f"ShardLoader: cannot decode {name} ({type(err).__name__}: {err}); substituting the "
                                  "next sample", RuntimeWarning, stacklevel=2)
                continue
            x = self.transform(img) if self.transform is not None else img
            return x, -1 if label is None else label, index
        raise ValueError(f"--data {self.index.source}: no decodable image")

    def _locate(self, index: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.index.starts, index, side="right") - 1)
        return s, index - int(self.index.starts[s])

    @property
    def bad_files(self) -> set[str]:
        """``"shard:key"`` of the samples found undecodable so far, by this process or its DataLoader workers."""
        out = set()
        for j in np.flatnonzero(np.frombuffer(self._bad_flags, np.int8)).tolist():
            s, r = self._locate(j)
            out.add(f"{self.index.paths[s]}:{self.index.shards[s][r][0]}")
        return out

    def bad_file_report(self) -> dict:
        return {"bad_files": sorted(self.bad_files), "skipped_files": []}

    # pickling (spawned DataLoader workers keep the shared flags, any other copy starts its own; the DataLoader and
    # its generator stay behind: a worker only streams samples)
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_loader"] = state["_generator"] = None
        if multiprocessing.context.get_spawning_popen() is None:
            state["_bad_flags"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._bad_flags is None:
            self._bad_flags = multiprocessing.Array("b", max(1, len(self.index)), lock=False)

    def __iter__(self):
        self._stream.plan = self._plan(self.epoch, self.start_batch)
        self._generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank)
        self.start_batch = 0
        yield from self._loader


# ============ the writer ============

def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int, *, labels: bool = False,
                 prefix: str = "shard") -> tuple[str, int, list[str]]:
    """Write ``src``'s images (sorted by path) into ``out/prefix-000000.tar``, ... with ``shard_size`` samples
    each: ``KEY.EXT`` (the file's bytes, extension lower-cased) and with ``labels`` ``KEY.cls`` (the index of the
    top-level sub-folder, sorted); next to each its DALI index ``prefix-000000.idx`` (``dali_index_text``). Returns (the ``--data`` pattern, samples written, skipped non-image files)."""
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder")
    if labels:
        from .imagefolder import ImageFolderDataset

        ds = ImageFolderDataset(src)
        files, skipped = ds.samples, ds.skipped_files
    else:
        paths, skipped = scan_images(src)
        files = [(p, None) for p in paths]
    if not files:
        raise ValueError(f"--src {src}: no image files ({', '.join(IMG_EXTENSIONS)})")
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(files) // shard_size)
    width = max(6, len(str(n_shards - 1)))
    for k in range(n_shards):
        final = out / f"{prefix}-{k:0{width}d}.tar"
        tmp = final.with_name(final.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(k * shard_size, min(len(files), (k + 1) * shard_size)):
                path, label = files[i]
                ext = Path(path).suffix.lower().lstrip(".")
                ext = "jpg" if ext == "jpeg" else ext
                members = [(f"{i:09d}.{ext}", Path(path).read_bytes())]
                if label is not None:
                    members.append((f"{i:09d}.cls", str(label).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, final)
        _write_atomic(final.with_suffix(".idx"), dali_index_text(index_shard(str(final))))  # (for DALI)
    pattern = str(out / f"{prefix}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar")
    return pattern, len(files), list(skipped)


def main(argv: Sequence[str] | None = None) -> None:
    from ..cli import ArgumentParser, main_guard

    p = ArgumentParser(prog="python -m fastcl.data.shards",
                                description="Write a folder of images as WebDataset tar shards (KEY.jpg [+ KEY.cls]).")
    p.add_argument("--src", required=True, help="folder of images (any depth); with --labels one sub-folder per class")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default: 10000)")
    p.add_argument("--labels", action="store_true", help="the top-level sub-folders are classes: write KEY.cls")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    args = p.parse_args(argv)

    def run():
        pattern, n, skipped = write_shards(args.src, args.out, args.shard_size, labels=args.labels, prefix=args.prefix)
        more = f"; skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}" if skipped else ""
        print(f"wrote {n} samples in {-(-n // args.shard_size)} shard(s){more}\ntrain with: --data '{pattern}'",
              flush=True)

    main_guard(run)


if __name__ == "__main__":
    main(sys.argv[1:])
