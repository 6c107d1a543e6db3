"""One training run per experiment at a time. If this is your first read through, skip this file.

An exclusive `flock` on <experiment>/run.lock, held by a training run for as long as it lives: a second
run or a resume of the same experiment is refused, naming the holder, and the kernel releases the lock
of a process that dies, however it dies, so a stale file never blocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime
from pathlib import Path

from mingpt_palm.errors import UserError, fs_error


class RunLock:
    """The lock of one experiment directory. The file names the holder (pid, host, start time, command) once
    its run is under way (`record`): a refused or failed start changes nothing."""

    def __init__(self, directory: Path):
        self.directory, self.path, self._fd = directory, directory / "run.lock", None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise fs_error(f"cannot open {self.path} to lock the experiment", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"experiment {self.directory} is in use by another training run ({self.holder()}); wait "
                            "for it to finish or stop it, or choose another --experiment-name") from None
        self._fd = fd

    def record(self, command: str) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
                  "command": command}
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            raise fs_error(f"cannot write {self.path}", e) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays, naming the last holder
            self._fd = None

    def holder(self) -> str | None:
        """Who holds the lock now ("pid 12 on host h, started ..."), or None when no live run does."""
        if self._fd is not None:
            return None  # this process holds it
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            try:
                r = json.loads(os.read(fd, 1 << 16))
                here = r["host"] == socket.gethostname()
                if here and not Path(f"/proc/{r['pid']}").exists():  # the record is an earlier run's
                    raise ValueError
                return f"pid {r['pid']} on host {r['host']}, started {r['started']}"
            except (ValueError, KeyError, TypeError):
                return "a run that is still starting"
        finally:
            os.close(fd)
