"""
Writing result files so that nothing is lost or overwritten by surprise: a result is written to
a temporary file in its folder (an unpredictable name created with ``O_EXCL``, so no symlink
placed there in advance is followed), given the mode a new file gets (``0o666`` less the
umask, not ``mkstemp``'s 0600), and renamed onto its name in one step. Without ``replace`` the
last step refuses a file that exists (a hard link, which cannot replace anything), so a file
that appears while the result is computed is kept too.

Example::

    refuse_existing(["out/results.json"], force=args.force)  # before the work starts
    with atomic_file("out/results.json") as f:
        json.dump(results, f)
"""

import contextlib
import errno
import os
import tempfile
from typing import IO, Iterator, Sequence

__all__ = [
    "new_file_mode",
    "refuse_existing",
    "temporary_path",
    "publish",
    "atomic_file",
    "atomic_output",
    "replace_atomic",
    "write_bytes_atomic",
    "temporary_directory",
]


def _umask() -> int:
    try:  # Linux: reading it does not change it (os.umask would, for every thread)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``mkdir`` when ``directory``) gives a new file: 0o666 (0o777) less
    the process's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def refuse_existing(paths: Sequence[str], *, force: bool, what: str = "") -> None:
    """
    Refuses to start a command whose results would replace existing files.

    Args:
        paths: the files the command will write.
        force: the user asked for them to be replaced (``--force``): nothing is refused.
        what: the option the files come from (``"--json"``), put before the message.

    Raises:
        FileExistsError: naming the first few existing files, their count and ``--force``.
    """
    if force:
        return
    existing = [path for path in paths if os.path.lexists(path)]
    if not existing:
        return
    shown = ", ".join(existing[:3]) + (
        f" and {len(existing) - 3} more" if len(existing) > 3 else ""
    )
    prefix = f"{what}: " if what else ""
    files = "it" if len(existing) == 1 else f"these {len(existing)} files"
    raise FileExistsError(
        f"{prefix}{shown} exist{'s' if len(existing) == 1 else ''}; this command does not write "
        f"over files: pass --force to replace {files}, or choose another name"
    )


def temporary_path(path: str, suffix: str = "") -> str:
    """Creates an empty file with an unpredictable name next to ``path``
    (``.<name>.<random><suffix>``) and returns its name; the caller writes it and calls
    :func:`publish`, or removes it."""
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(handle)
    return temporary


def publish(temporary: str, path: str, *, replace: bool) -> None:
    """
    Gives ``temporary`` the mode of a new file and renames it to ``path``.

    Args:
        replace: replace a file ``path`` that exists (never through a symlink: the link itself
            is replaced); else one that exists is refused and ``temporary`` is left as it is.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false.
    """
    os.chmod(temporary, new_file_mode())
    if replace:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # fails if path exists, in one step
    except FileExistsError:
        raise FileExistsError(f"{path} exists; not replaced: pass --force to replace it") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A file system without hard links: check, then rename (a short window remains).
        if os.path.lexists(path):
            raise FileExistsError(
                f"{path} exists; not replaced: pass --force to replace it"
            ) from None
        os.rename(temporary, path)
        return
    os.remove(temporary)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", *, replace: bool = True) -> Iterator[IO]:
    """
    A file object whose content appears at ``path`` in one step when the block ends (flushed
    and fsynced); if the block raises, ``path`` is untouched and the temporary file removed.

    Args:
        mode: ``"w"`` or ``"wb"``.
        replace: see :func:`publish`.
    """
    temporary = temporary_path(path, ".partial")
    try:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        publish(temporary, path, replace=replace)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def replace_atomic(temporary: str, path: str) -> None:
    """Flushes the written file ``temporary`` to disk and renames it over ``path`` (same folder)
    with a new file's mode: :func:`publish` with ``replace=True``."""
    with open(temporary, "rb+") as f:
        os.fsync(f.fileno())
    publish(temporary, path, replace=True)


@contextlib.contextmanager
def atomic_output(path: str, *, replace: bool = True) -> Iterator[str]:
    """
    Yields a new temporary path next to ``path`` for a writer that takes a file name
    (``torch.save``, ``LazyConfig.save``, safetensors); when the block ends without an
    exception the file is flushed and published at ``path`` (see :func:`publish`), otherwise it
    is removed and ``path`` is untouched.
    """
    temporary = temporary_path(path, ".partial")
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        publish(temporary, path, replace=replace)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def write_bytes_atomic(path: str, data: bytes, *, replace: bool) -> None:
    """Writes ``data`` to ``path`` with :func:`atomic_file`."""
    with atomic_file(path, "wb", replace=replace) as f:
        f.write(data)


def temporary_directory(path: str) -> str:
    """Creates an empty folder with an unpredictable name next to ``path`` and the mode of a
    new folder (``mkdtemp`` gives 0700); the caller fills it and renames it to ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    os.chmod(temporary, new_file_mode(directory=True))
    return temporary
