"""The C allocator's settings for a training process: freed memory is kept for reuse.

A training step frees and allocates the same activations, gradients and statistics every
step, many of them a few MB each. glibc's malloc, left to its dynamic thresholds, serves
blocks like these with fresh mappings or gives the heap's free top back to the kernel, so
the next step takes a page fault on every 4 kB of them again (system time that grows with
whatever a variant keeps alive: BENCHMARKS.md, "the allocator"). Two of its documented
settings (``mallopt(3)``) stop that:

- ``M_MMAP_THRESHOLD`` 32 MiB (glibc's largest): blocks below it come from the heap, whose
  freed memory is reused;
- ``M_TRIM_THRESHOLD`` 256 MiB: the heap keeps up to that much free memory at its top
  instead of giving it back after every step.

The cost is that up to 256 MiB of freed memory stays with the process. Where the allocator
is not glibc's, or the user has configured it (any ``MALLOC_*_`` variable or
``glibc.malloc`` tunable), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def user_tuned_malloc(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether the user configured glibc's malloc themselves (any ``MALLOC_*_`` variable, or a
    ``glibc.malloc.*`` tunable): then smk leaves it as they set it."""
    return (any(k.startswith("MALLOC_") and k.endswith("_") for k in environ)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory() -> bool:
    """Set the two thresholds (see module docstring) once for this process; True if set.
    Worker processes forked afterwards inherit them."""
    if not sys.platform.startswith("linux") or user_tuned_malloc():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, say)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
