"""
Part files: the durable record of a run sharded over workers, from which it resumes (the
labeller's: ``python -m grounding_dino.label``).

Next to ``--output labels.json`` lives ``labels.json.parts/``:

* ``run.json``: what decides the labels (classes, config digest, weights digest, thresholds,
  image root). A later run with the same ``--output`` must match it, or it stops with an
  error naming the differences (a mix of two class lists in one dataset is never made).
* ``part-<rank>.jsonl``: one JSON line per finished image, appended by the worker of that
  global rank, flushed and fsynced after every batch. A label line is ``{"file_name",
  "width", "height", "boxes" (xywh), "classes", "scores"[, "segmentations" (COCO RLEs, with
  a mask stage)]}``, an error line ``{"error",
  "file_name", "path"}``, and before every batch an attempt line ``{"attempt": [[file_name,
  path], ...]}``: the images a worker is about to decode and label. An image with more attempt
  lines than results was in a batch when its worker died (a crash, the OOM killer): counting
  attempts lets a rerun give up on an image that kills the labeller every time.

A ``kill -9`` can only cut the last line of a file short; readers drop such a tail (it was not
acknowledged by an fsync) and the next writer of the file truncates it before appending, under
the file's lock.
"""

import errno
import fcntl
import json
import os
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

from .atomic import atomic_file

__all__ = [
    "parts_dir",
    "check_run",
    "repair_tails",
    "read_parts",
    "PartsState",
    "PartWriter",
    "ERROR_PREFIX",
    "ATTEMPT_PREFIX",
]

RUN_FILE = "run.json"
ERROR_PREFIX = '{"error":'
ATTEMPT_PREFIX = '{"attempt":'


def parts_dir(output: str) -> str:
    """The part-file folder of ``--output``: ``<output>.parts``."""
    return os.path.abspath(output) + ".parts"


def part_files(folder: str) -> List[str]:
    """The part files of a run folder, sorted."""
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.startswith("part-") and n.endswith(".jsonl"))
    return [os.path.join(folder, n) for n in names]


def check_run(output: str, run: Dict) -> bool:
    """
    Creates ``<output>.parts/run.json`` for a new run, or checks that an existing run
    matches ``run``.

    Returns:
        True when resuming an existing run.

    Raises:
        FileExistsError: ``output`` exists but no run of this tool made it.
        ValueError: the existing run differs (class list, config, weights, thresholds, root).
    """
    folder = parts_dir(output)
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        if os.path.exists(output):
            raise FileExistsError(
                f"--output {output} exists and no labelling run wrote it (there is no "
                f"{path}); it is not overwritten: choose another --output"
            )
        os.makedirs(folder, exist_ok=True)
        _write_atomic(path, json.dumps(run, indent=1, sort_keys=True))
        return False
    with open(path) as f:
        previous = json.load(f)
    differences = [
        f"  {key}: was {previous.get(key)!r}, now {run.get(key)!r}"
        for key in sorted(set(previous) | set(run))
        if previous.get(key) != run.get(key)
    ]
    if differences:
        raise ValueError(
            f"--output {output} belongs to a run with other settings ({path}):\n"
            + "\n".join(differences)
            + f"\nUse another --output, or delete {output} and {folder} to start over."
        )
    return True


def _write_atomic(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _complete_length(path: str) -> Tuple[int, int]:
    """(length up to the last newline, file size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1, size
            end = start
    return 0, size


def _try_lock(file) -> bool:
    """Takes ``file``'s exclusive ``flock`` without waiting. False: another process holds it.
    File systems without ``flock`` (some network mounts) count as unlocked."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
    return True


def repair_tails(folder: str) -> int:
    """
    Truncates every part file after its last complete line (what a ``kill -9`` in the
    middle of a write leaves), each under its lock: a file another worker holds (on this or
    another machine) is being appended to and is left alone. Returns how many files were cut.
    """
    cut = 0
    for path in part_files(folder):
        with open(path, "r+b") as f:
            if not _try_lock(f):
                continue
            length, size = _complete_length(path)
            if length < size:
                f.truncate(length)
                cut += 1
    return cut


def iter_records(folder: str) -> Iterator[Dict]:
    """The complete lines of every part file, parsed (an unterminated last line is skipped)."""
    for path in part_files(folder):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # cut short by a kill: never acknowledged
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: corrupt part-file line: {error}") from None


class PartsState(NamedTuple):
    """What the part files of a run hold, by ``file_name``.

    Attributes:
        labelled: the label record of every labelled image (the first one).
        failed: for every image without a label that has an error line: its last error
            record plus ``"attempts"``.
        unfinished: for every image with attempt lines only (its worker died with it in a
            batch, or is at work on it now): ``{"file_name", "path", "attempts"}``.

    An image's attempts are its attempt lines, or its error lines where there are more (files
    written before attempt lines existed).
    """

    labelled: Dict[str, Dict]
    failed: Dict[str, Dict]
    unfinished: Dict[str, Dict]


def read_parts(folder: str) -> PartsState:
    """Reads every part file of ``folder`` (see :class:`PartsState`). Files of older versions,
    without attempt lines, count one attempt per error line."""
    labelled, errors, attempts, paths = {}, {}, {}, {}
    error_counts: Dict[str, int] = {}
    for record in iter_records(folder):
        if "attempt" in record:
            for name, path in record["attempt"]:
                attempts[name] = attempts.get(name, 0) + 1
                paths[name] = path
            continue
        name = record["file_name"]
        if "error" in record:
            errors[name] = record
            error_counts[name] = error_counts.get(name, 0) + 1
        else:
            labelled.setdefault(name, record)
    failed, unfinished = {}, {}
    for name in (set(errors) | set(attempts)) - set(labelled):
        tried = max(attempts.get(name, 0), error_counts.get(name, 0))
        if name in errors:
            failed[name] = {**errors[name], "attempts": tried}
        else:
            unfinished[name] = {"file_name": name, "path": paths[name], "attempts": tried}
    return PartsState(labelled, failed, unfinished)


class PartWriter:
    """
    Appends finished images to ``part-<rank>.jsonl``: one ``write`` per batch, then flush
    and ``fsync``, so what a crash leaves is every batch before it. The file is locked
    (``flock``) while open: two runs writing the same part file is an error. A process forked
    while the lock is held shares it: it must close :meth:`fileno` (see
    :func:`grounding_dino.io.processes.forget_fds`), or a ``kill -9`` of this process would
    leave the file locked for as long as that child lives.
    """

    def __init__(self, folder: str, rank: int):
        self.path = os.path.join(folder, f"part-{rank:05d}.jsonl")
        self._file = open(self.path, "a")
        if not _try_lock(self._file):
            self._file.close()
            raise RuntimeError(
                f"{self.path} is being written by another labelling run of the same "
                "--output; wait for it to finish or stop it"
            )
        length, size = _complete_length(self.path)
        if length < size:
            self._file.truncate(length)

    def fileno(self) -> int:
        """The locked descriptor (children forked from this process must close it)."""
        return self._file.fileno()

    def mark_attempt(self, items: Sequence[Tuple[str, str]]) -> None:
        """
        Records that the ``(path, file_name)`` pairs are about to be decoded and labelled
        (flushed, not fsynced: it must survive the death of this process, not of the
        machine).
        """
        if not items:
            return
        pairs = [[name, path] for path, name in items]
        self._file.write(json.dumps({"attempt": pairs}, separators=(",", ":")) + "\n")
        self._file.flush()

    def append(self, records: List[Dict]) -> None:
        if not records:
            return
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
