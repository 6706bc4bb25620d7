"""
The peak of the bytes ``malloc`` has handed out and not yet taken back, sampled in a thread.

A process's peak resident size (VmHWM) also counts memory that was freed but that glibc keeps
(freed blocks inside the heap below live ones cannot go back to the kernel): at the training
benchmark's official size that is 2 to 3 GB in either model, and it moves by a few hundred MB
from run to run with the order of allocations. The peak of the allocated bytes is the CPU's
counterpart of ``torch.cuda.max_memory_allocated``: what the model and the optimizer hold at
once, without the allocator's fragmentation. glibc keeps no peak, so :class:`PeakAllocated`
reads ``mallinfo2`` (blocks in use in every arena plus mmap'ed blocks) every few milliseconds;
a peak shorter than that can be missed, which the step's large tensors (alive for tens of
milliseconds or more) are not.
"""

import ctypes
import threading
import time
from typing import Optional

from ..engine.cpu_allocator import glibc_function

__all__ = ["PeakAllocated"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2():
    """glibc's ``mallinfo2`` function, or None (another C library, glibc before 2.33)."""
    function = glibc_function("mallinfo2")
    if function is not None:
        function.restype = _MallInfo2
    return function


class PeakAllocated:
    """
    Context manager: the peak of the bytes allocated with ``malloc`` (in use, mmap'ed blocks
    included) while the block runs, in MB, as ``peak_mb`` (None where ``mallinfo2`` is
    missing).

    Example::

        with PeakAllocated() as allocated:
            train_step()
        print(allocated.peak_mb)

    ``mallinfo2`` walks the heap's free lists under malloc's lock (seconds per minute of CPU
    time on a large fragmented heap): time steps outside the block.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_mb: Optional[float] = None
        self._mallinfo2 = _mallinfo2()
        self._stop = threading.Event()
        self._thread = None

    def _allocated_mb(self) -> float:
        info = self._mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._allocated_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakAllocated":
        if self._mallinfo2 is not None:
            self.peak_mb = self._allocated_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._allocated_mb())
