"""Peak tensor memory of a piece of work on the CPU, measured from the allocator's own records.

There is no ``torch.cuda.max_memory_allocated`` for CPU tensors, and neither ``tracemalloc`` (it sees Python's
allocator, not torch's C++ one) nor the process RSS (glibc keeps freed pages) measures them. The PyTorch profiler
with ``profile_memory=True`` receives every allocation and free of the CPU allocator with its size; its memory
profiler (``torch.profiler._memory_profiler``, what ``export_memory_timeline`` draws) turns them into a timeline of
tensor creations and destructions. ``peak_cpu_memory`` sums that timeline: the peak is the most bytes held by
tensors at once during ``fn`` (tensors alive before it count from the start), exactly what
``torch.cuda.max_memory_allocated`` reports on a GPU, minus the caching allocator's rounding.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def peak_cpu_memory(fn: Callable[[], object]) -> tuple[int, int]:
    """Run ``fn`` once under the profiler; returns (peak bytes, bytes still held at its end) of CPU tensors."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    cur = peak = 0
    for _t, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            cur += size
        elif action == Action.DESTROY:
            cur -= size
        peak = max(peak, cur)  # (INCREMENT_VERSION: same bytes, a new version)
    return peak, cur


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn`` runs its forward (distinct storages):
    a second, independent count of what checkpointing removes. Storages of ``exclude`` (parameters, inputs:
    held anyway) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
