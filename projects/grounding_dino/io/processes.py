"""
Child processes that do not outlive their parent, nor keep its locks.

A ``kill -9`` of a process (what the kernel's OOM killer sends) runs none of its cleanup, so its
children (DataLoader decoding processes, the labeller's workers) would stay alive, and a child
forked while the parent held an ``flock`` shares that lock until it exits: a rerun would find
the files still locked. :func:`die_with_parent` asks Linux to kill the calling process when its
parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); :func:`forget_fds` closes the inherited
descriptors a child must not hold.
"""

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Optional, Sequence

__all__ = ["die_with_parent", "forget_fds"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: Optional[int] = None) -> bool:
    """
    Makes the calling process receive SIGKILL when its parent dies (Linux; elsewhere nothing).

    Args:
        parent_pid: the parent this process was started by; when it has already died (the
            parent's death came before this call), the process exits at once.

    Returns:
        True when the kernel will kill this process with its parent.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the request: nothing will send the signal
    return True


def forget_fds(fds: Sequence[int]) -> None:
    """Closes descriptors inherited through ``fork`` (a lock held by them would outlive the
    parent while this process lives)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # already closed
