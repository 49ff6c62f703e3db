"""Host memory of a CPU training process: keep what it frees, so that a step does not pay the kernel to map and
zero its activations again.

glibc hands blocks above a (moving) threshold to fresh mmaps and trims the heap after large frees; a training step
frees and allocates the same activations every step, so on a CPU each step faulted them in again. On the SD1.5
architecture at 128 px that was a third of the step's CPU time, spent as system time (benchmarks/RESULTS.md section
5). `keep_host_memory` sets glibc's thresholds so that blocks up to 32 MiB come from the heap and the heap is never
trimmed: the process keeps its peak resident and each step reuses it. The earlier it runs the better (set late,
after the libraries had loaded, it left part of the system time: measured), so the training scripts call it before
anything else. Not on a machine with a GPU: there the steps' memory is the device's, and a host that kept every
freed block would hold each process's peak of model loading for the whole run. This module imports nothing heavy.
NCP_KEEP_HOST_MEMORY=0 leaves glibc's defaults, =1 applies them on a GPU machine too.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
# mmap only above 32 MiB (glibc's largest), never trim (-1), grow the heap 256 MiB at a time
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 256 << 20))
GPU_DEVICES = ("/dev/nvidiactl", "/dev/kfd")  # CUDA's and ROCm's device nodes
applied = False  # whether this process runs with the settings


def gpu_present() -> bool:
    return any(os.path.exists(d) for d in GPU_DEVICES)


def keep_host_memory() -> bool:
    """Apply SETTINGS under glibc on Linux on a machine without a GPU (NCP_KEEP_HOST_MEMORY: 0 never, 1 always);
    whether this process runs with them."""
    global applied
    choice = os.environ.get("NCP_KEEP_HOST_MEMORY", "")
    if applied or choice == "0" or not sys.platform.startswith("linux") or (choice != "1" and gpu_present()):
        return applied
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another C library: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return applied
