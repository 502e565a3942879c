"""Peak-memory probes for the throughput benchmark: RSS on CPU, the caching allocator's peak on GPU.

A probe is reset at the start of the region it measures and read at its end, so one process can measure
several regions (the parts of a step, the cases of a sweep) one after another. On CPU the reset writes 5 to
`/proc/self/clear_refs` (VmHWM := VmRSS, Linux >= 4.0). glibc keeps freed blocks resident below its mmap
threshold, which would hide a region's allocations behind memory freed earlier; the benchmark therefore
starts its workers with a fixed `MALLOC_MMAP_THRESHOLD_` (see `MALLOC_ENV`) so that large tensors are
mapped and unmapped one by one and RSS follows what is alive.
"""
from __future__ import annotations

from pathlib import Path

import torch

#: environment of the worker processes: blocks of 128 KiB and more are mmapped and returned when freed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is missing from /proc/self/status")


class MemoryProbe:
    """`reset()` marks the start of a region; `current()` and `peak()` are MiB (absolute, not added)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def reset(self) -> float:
        """Start a region: forget the earlier peak; return the memory in use now."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")
        return self.current()

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / MIB
        return _status_kib("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MIB
        return _status_kib("VmHWM") / 1024
