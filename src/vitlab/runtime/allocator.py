"""Host memory of a CPU run: keep what glibc's malloc frees inside the process instead of handing it back.

With glibc's defaults a training step's activations go back to the kernel when they are freed, and the next
step page-faults them in again: 81 000-212 000 minor faults per step of ViT-S/4 or ViT-22B-S/4 at depth 6,
batch 128, which then trained at 0.78-0.89x the speed with freed memory kept (0 faults; benchmarks/README.md,
"Models on an AVX512-BF16 CPU"). jemalloc and tcmalloc keep freed memory by design; with glibc three
`mallopt` settings do the same. The vitlab command applies them at start (`keep_freed_memory`);
VITLAB_SYSTEM_MALLOC=1 leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_OUT = "VITLAB_SYSTEM_MALLOC"
# glibc's <malloc.h> parameters and the values set (mallopt takes a C int)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    M_TRIM_THRESHOLD: 2**31 - 1,  # give the free top of the heap back only beyond 2 GiB (the largest int)
    # grow the heap by 1 GiB of address space at a time (touched only when used): blocks above the mmap threshold
    # are then cut from the free top of the heap too; with 64 MiB, ViT-S/4's 51 MB fp32 activations went
    # through mmap and faulted 25 000 times a step again
    M_TOP_PAD: 1 << 30,
    M_MMAP_THRESHOLD: 32 << 20,  # blocks up to 32 MiB (glibc's maximum) come from the heap, not from mmap
}


_state = "not set by vitlab (library use: call vitlab.runtime.allocator.keep_freed_memory())"


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory, unless told or tuned otherwise; returns what it did, in words."""
    global _state
    _state = _apply()
    return _state


def host_memory() -> str:
    """What `keep_freed_memory` did in this process, in words (for a run's start block)."""
    return _state


def _apply() -> str:
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return f"glibc defaults ({OPT_OUT} is set)"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "the system allocator (not glibc)"
    if os.environ.get("LD_PRELOAD") or any(key.startswith("MALLOC_") for key in os.environ):
        return "as configured by LD_PRELOAD / MALLOC_* variables"
    libc = ctypes.CDLL(None)
    if not all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items()):
        return "glibc defaults (mallopt refused the settings)"
    return f"glibc, freed memory kept in the process ({OPT_OUT}=1 to leave the defaults)"
