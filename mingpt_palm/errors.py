"""The errors the scripts turn into one line and an exit code (cli.py): the bottom of the package.

2: bad input (UserError), nothing changed. 1: the run could not go on (TrainingStopped, out of memory,
a file-system error). 130: Ctrl-C.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input from the user: the scripts print the message as one line and exit with code 2."""


class TrainingStopped(Exception):
    """The run cannot continue (non-finite steps, a full disk, a dead peer): one line, exit code 1."""


_FS_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "a file grew past the file-size limit",
    errno.ENAMETOOLONG: "a name is too long for the file system",
    errno.ENOTDIR: "a part of the path is not a directory",
}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fs_error(doing: str, e: OSError) -> UserError:
    """One line for a file-system failure: what we were doing, why it failed, on which path."""
    reason = _FS_REASONS.get(e.errno, e.strerror or type(e).__name__)
    where = f" ({e.filename})" if e.filename and str(e.filename) not in doing else ""
    return UserError(f"{doing}: {reason}{where}")


def is_disk_full(e: BaseException) -> bool:
    """True if e, or anything it was raised from, says the disk is full (orbax wraps OSError in its own
    errors, and tensorstore reports it only in its message)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if any(s in str(e) for s in ("No space left on device", "Disk quota exceeded", "File too large")):
            return True
        e = e.__cause__ or e.__context__
    return False


