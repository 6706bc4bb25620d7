"""One progress bar over every worker, read from the part files they append to."""

import json
import os
import sys
import threading
from typing import Dict

from tqdm import tqdm

from .parts import ATTEMPT_PREFIX, ERROR_PREFIX, part_files

__all__ = ["PartsProgress"]


class PartsProgress:
    """
    A background thread that follows the part files of a run (every worker's, on this
    machine or, on a shared file system, on others) and shows images done, images/s and ETA
    in one bar, plus an ``ERROR`` line per image that failed. Workers need no channel to it:
    a line in a part file is an image done.

    Use as a context manager around the launch of the workers.
    """

    def __init__(
        self, folder: str, total: int, initial: int, interval: float = 0.5, desc: str = "images"
    ):
        """
        Args:
            folder: the run's part-file folder.
            total: images of the run, done or not.
            initial: images already done before this run.
            interval: seconds between two looks at the files.
            desc: the bar's title.
        """
        self.folder = folder
        self.interval = interval
        self.failed = 0
        # Lines present now were counted in ``initial`` (or are earlier errors): start after.
        self._offsets: Dict[str, int] = {p: os.path.getsize(p) for p in part_files(folder)}
        self._carry: Dict[str, bytes] = {}
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="img",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=interval,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="parts-progress", daemon=True)

    def _poll(self) -> None:
        done = 0
        for path in part_files(self.folder):
            offset = self._offsets.get(path, 0)
            size = os.path.getsize(path)
            if size <= offset:
                self._offsets[path] = min(offset, size)
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                data = self._carry.pop(path, b"") + f.read(size - offset)
            self._offsets[path] = size
            *lines, rest = data.split(b"\n")
            if rest:
                self._carry[path] = rest
            for line in lines:
                if line.startswith(ATTEMPT_PREFIX.encode()):
                    continue  # an image started, not done
                done += 1
                if line.startswith(ERROR_PREFIX.encode()):
                    self.failed += 1
                    record = json.loads(line)
                    self._bar.write(f"ERROR {record['path']}: {record['error']}", file=sys.stderr)
        if done:
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            self._bar.update(done)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> "PartsProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self._bar.close()
