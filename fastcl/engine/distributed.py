"""torchrun-aware process setup and the few collectives the methods need.

Runs the same under ``torchrun`` (NCCL on GPU, gloo on CPU) and as a single plain process.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not use_cuda and device == "auto" and rank == 0:  # one plain line (a warnings.warn showed a path and source)
        print("warning: no CUDA device found: training on the CPU (slow; use --preset cifar --max-steps N for a "
              "quick try)", file=sys.stderr, flush=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is visible (use --device cpu or auto)")
        # cuda:N pins a single process to GPU N; under torchrun each process takes its LOCAL_RANK's GPU
        index = int(device.split(":", 1)[1]) if device.startswith("cuda:") and world_size == 1 else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: GPU {index} requested, {torch.cuda.device_count()} visible")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown_distributed() -> None:
    """End of a process's distributed work: destroy the process groups, then hand the GIL to other threads for
    50 ms. A gloo worker thread that ran an async collective (DeepSpeed's all-gathers, on a group its engine
    keeps alive) frees the work's tensors when it is done, and that needs the GIL; when the main thread reaches
    interpreter shutdown first, the thread exits inside that C++ destructor and ``std::terminate`` aborts the
    process ("terminate called without an active exception", exit -6) after a run that succeeded. Measured on the
    2-core CPU, 2 gloo processes, ZeRO-2 steps then exit: 4 of 24 launches aborted without the pause, 0 of 16 with
    it (a core dump showed ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` -> ``take_gil`` ->
    ``pthread_exit`` -> ``std::terminate``)."""
    import time

    if is_dist():
        dist.destroy_process_group()
    time.sleep(0.05)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def wrap_ddp(module: torch.nn.Module, device_ids: list[int] | None) -> torch.nn.parallel.DistributedDataParallel:
    """DDP as the engine runs it.

    - No buffer sync in the forward: queues and centers are kept identical by the methods themselves, BN
      statistics are given rank 0's before kNN and checkpoints, and the engine broadcasts rank 0's parameters and
      buffers at the start. torch 2.14 names this ``forward_sync_buffers=False`` and warns (FutureWarning, every
      rank, every run) on the older ``broadcast_buffers=False``, which torch 2.11 still needs.
    - ``gradient_as_bucket_view``: ``p.grad`` is a view into DDP's all-reduce buckets instead of a second copy
      (4 bytes per trained parameter less; grads set to None by a hook or zero_grad are views again after the next
      backward).
    """
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(module, device_ids=device_ids, gradient_as_bucket_view=True, **no_sync)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (no gradient); identity on one process."""
    if not is_dist():
        return x
    # into one buffer (was: a list of world tensors, then torch.cat: a second copy of everything gathered, e.g.
    # MoCo's whole image batch every step); torch.compile traces it as well
    out = x.new_empty((x.shape[0] * get_world_size(), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks; gradients flow back to every rank's rows, summed over ranks (SimCLR's
    negatives). A functional collective, which torch.compile traces: ``torch.distributed.nn.functional.all_gather``
    raises under it, and the whole method forward then ran eager under DDP + ``--compile`` (no error, one warning)."""
    if not is_dist():
        return x
    import torch.distributed._functional_collectives as fc

    # (torch 2.11 names it all_gather_tensor_autograd; 2.14 renamed it and warns on the old name)
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(x.contiguous(), 0, dist.group.WORLD)
    return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or mean); identity on one process."""
    if is_dist():
        dist.all_reduce(x)
        if op == "mean":
            x /= get_world_size()
    return x


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle BN: gather the batch, permute it across ranks, return this rank's share.

    Returns ``(x_shuffled_local, idx_unshuffle)``; equal batch sizes on every rank are required.
    """
    x_all = all_gather_nograd(x)
    n = x_all.shape[0]
    # every rank must use rank 0's permutation: gathered, not broadcast (dist.broadcast breaks the compiled graph
    # in two; all_gather is traced), a few bytes per image beside the images just gathered
    perm = all_gather_nograd(torch.randperm(n, device=x.device))[:n]
    idx_unshuffle = torch.argsort(perm)
    rank, world = get_rank(), get_world_size()
    return x_all[perm.view(world, -1)[rank]], idx_unshuffle.view(world, -1)[rank]


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo ``batch_shuffle_ddp`` for the key embeddings ``x``."""
    x_all = all_gather_nograd(x)
    return x_all[idx_unshuffle]
