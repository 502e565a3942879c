"""Keep freed host memory inside the process, so that a CPU training step stops page-faulting its buffers in.

glibc's malloc hands memory back to the kernel when the free space at the top of its heap passes a threshold
that it tunes by itself (twice the largest block it has freed from a direct mapping). A training step frees and
re-allocates hundreds of megabytes of activations and gradients in a pattern that crosses that threshold step
after step; each time, the next step takes the pages back one fault at a time (the kernel zeroes each). On a
2-core CPU that showed up as 25-60 thousand minor faults and up to half a second of system time per ViT-B step,
inside the matmuls that first write the fresh buffers (benchmarks/RESULTS.md, issue 15). Fixing both
thresholds (blocks up to 32 MiB from the heap, the most glibc allows; trim only above 1 GiB free) keeps the
pages: after its first steps a run reuses them. The cost is that the process holds on to its peak
memory, which a training process reaches every step anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCK_BYTES = 32 << 20  # glibc refuses a larger mmap threshold on 64-bit
_TRIM_ABOVE_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process (once); False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE_BYTES))
