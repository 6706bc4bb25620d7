"""
Result files written atomically, and never over a file the user did not ask to replace.

A result is written to a temporary file in the destination's own folder (so that the final
rename stays on one file system), flushed to disk, given the mode of a newly created file
(``0o666`` less the umask: ``mkstemp``'s ``0o600`` would hide it from the user's group) and
renamed over the destination with ``os.replace``. A reader sees the old file or the new one,
never a truncated one; a failed or interrupted write removes its temporary file and leaves the
old file as it was. Temporary names are unpredictable and created with ``O_EXCL``
(``tempfile.mkstemp``), so a planted symlink is never followed.
"""

import contextlib
import os
import tempfile
from typing import IO, Iterable, Iterator

__all__ = ["atomic_output", "atomic_open", "new_file_mode", "refuse_existing", "replace_atomic"]


def refuse_existing(paths: Iterable[str], force: bool, flag: str = "--force") -> None:
    """
    Raises:
        FileExistsError: one of ``paths`` exists and ``force`` is False; the message names the
            file and ``flag``.
    """
    if force:
        return
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; pass {flag} to replace it (never overwritten)")


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def replace_atomic(temporary: str, path: str) -> None:
    """Flushes ``temporary`` to disk, gives it a new file's mode and renames it over ``path``
    (same folder); the folder's entry is flushed too, where the OS allows."""
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(temporary, new_file_mode())
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """
    Yields a new temporary path next to ``path`` for a writer that takes a file name
    (``torch.save``, ``LazyConfig.save``, safetensors); when the block ends without an
    exception the file replaces ``path`` atomically, otherwise it is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder
    )
    os.close(handle)
    try:
        yield temporary
        replace_atomic(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` for writing, atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as temporary:
        with open(temporary, mode, **kwargs) as f:
            yield f
