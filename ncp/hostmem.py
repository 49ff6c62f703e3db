"""Host memory of a training process: keep what it frees, so that a CPU step does not pay the kernel to map and
zero its activations again.

glibc hands blocks above a (moving) threshold to fresh mmaps and trims the heap after large frees; a training step
frees and allocates the same activations every step, so on a CPU each step faulted them in again. On the SD1.5
architecture at 128 px that was a third of the step's CPU time, spent as system time (benchmarks/RESULTS.md section
5). `keep_host_memory` sets glibc's thresholds so that blocks up to 32 MiB come from the heap and the heap is not
trimmed: the process keeps its peak resident, the step reuses it. It must run before torch loads (set after
`import torch`, the same settings left a cached run's system time as it was: measured), so the training scripts
call it first. On a GPU only host memory is concerned (the device has its own caching allocator). This module
imports nothing heavy. NCP_KEEP_HOST_MEMORY=0 leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 256 << 20))
applied = False  # whether this process runs with the settings


def keep_host_memory() -> bool:
    """Apply SETTINGS under glibc on Linux (not elsewhere, not with NCP_KEEP_HOST_MEMORY=0); whether they apply."""
    global applied
    if applied or not sys.platform.startswith("linux") or os.environ.get("NCP_KEEP_HOST_MEMORY") == "0":
        return applied
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return applied
