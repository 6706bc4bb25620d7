"""
glibc ``malloc`` settings for training on the CPU.

With glibc's defaults, a CPU training step returns its large temporaries (activations, their
gradients: a few hundred KB to tens of MB each) to the operating system when they are freed
(``munmap``, or trimming the heap top), and the next step faults the same amount back in,
page by page, each page zeroed by the kernel. On the shapes demo's training processes that is
about 10,000 page faults per iteration, most of their system CPU time (docs/benchmarks.md,
"System CPU time of CPU training"). :func:`keep_freed_memory` makes ``malloc`` keep freed
memory for the next step instead (``mallopt``, as the ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` environment variables would at start-up).

Blocks above 32 MiB, glibc's largest mmap threshold, stay mmap'ed (fresh pages at every step).
At the official sizes there are several (BERT's embedding gradient and AdamW's temporaries for
it among them), and turning mmap off too (``MALLOC_MMAP_MAX_=0``) makes such a step
faster. It is not the default because a heap that serves every block grows with fragmentation
when image sizes change from step to step (multi-scale training: docs/benchmarks.md, "malloc
at the official sizes"); set that variable to choose it.
"""

import ctypes
import ctypes.util
import logging
import os
from typing import Dict

__all__ = ["glibc_function", "keep_freed_memory", "return_freed_memory", "MALLOC_SETTINGS"]

logger = logging.getLogger(__name__)

# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

MALLOC_SETTINGS: Dict[str, int] = {
    # Blocks up to 32 MiB (glibc's largest allowed threshold on 64-bit) come from the heap and
    # are reused, instead of mmap'ed fresh for every allocation.
    "MALLOC_MMAP_THRESHOLD_": 32 * 1024 * 1024,
    # Freed memory at the heap top is kept (-1: never trimmed; mallopt(3)) instead of being given
    # back above 128 KiB. A finite threshold (it was 1 GiB) is crossed at the official sizes
    # when the backward frees its activations: the next step faults them in again, seconds of
    # system time. The peak resident size is unchanged: the memory kept was resident at it.
    "MALLOC_TRIM_THRESHOLD_": -1,
    # The heap grows by 64 MiB at a time (fewer brk calls).
    "MALLOC_TOP_PAD_": 64 * 1024 * 1024,
}
_PARAMETERS = {
    "MALLOC_MMAP_THRESHOLD_": _M_MMAP_THRESHOLD,
    "MALLOC_TRIM_THRESHOLD_": _M_TRIM_THRESHOLD,
    "MALLOC_TOP_PAD_": _M_TOP_PAD,
}


def keep_freed_memory() -> Dict[str, int]:
    """
    Applies :data:`MALLOC_SETTINGS` to this process with glibc's ``mallopt``. A setting given
    in the environment (``MALLOC_MMAP_THRESHOLD_=...``) is the user's and is left alone.

    Returns:
        the settings applied, {name: value} (empty where the C library is not glibc, which is
        logged).
    """
    mallopt = glibc_function("mallopt")
    if mallopt is None:
        logger.info("No glibc mallopt: the allocator keeps its defaults")
        return {}
    applied = {}
    for name, value in MALLOC_SETTINGS.items():
        if name in os.environ:
            continue
        if mallopt(ctypes.c_int(_PARAMETERS[name]), ctypes.c_int(value)) != 1:
            logger.info("mallopt refused %s=%d: left at glibc's default", name, value)
            continue
        applied[name] = value
    return applied


def return_freed_memory() -> bool:
    """
    Gives the memory ``malloc`` keeps after frees back to the kernel (glibc's
    ``malloc_trim(0)``), e.g. after loading a model through temporary copies.

    Returns:
        whether glibc's ``malloc_trim`` ran (False with another C library).
    """
    malloc_trim = glibc_function("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim(ctypes.c_size_t(0))
    return True


def glibc_function(name: str):
    """The C library's function ``name`` through ctypes, or None where the library has none
    (another C library than glibc, an older glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None
