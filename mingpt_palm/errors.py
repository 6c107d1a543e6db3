"""Guard rails at the edge; if this is your first read through, skip this file.

What the scripts do with a failure (one line on stderr, an exit code, no traceback), what a signal
does, and the process-wide hooks the scripts install (never an import). Exit codes: 2 bad input
(UserError: nothing changed), 1 the run could not go on (TrainingStopped, out of memory, a file-system
error), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import pkgutil
import re
import signal
import sys
import threading
import traceback
from pathlib import Path


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


def write_atomically(path: Path, data: str | bytes) -> None:
    """Whole or not at all: a temporary file beside `path`, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise fs_error(f"cannot write {path}", e) from None


def out_of_memory(e: BaseException) -> str | None:
    """XLA's RESOURCE_EXHAUSTED (device or host memory), as one line, or None for anything else."""
    text = " ".join(str(e).split())
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return None
    asked = re.search(r"allocat\w* (\d+) bytes", text)
    what = (f"XLA could not allocate {int(asked.group(1)) / 2**30:,.1f} GiB ({int(asked.group(1)):,} bytes)"
            if asked else text[:200])
    return (f"out of memory: {what}; lower --batch-size or --block-size, or use a smaller model "
            "(--model.dim, --model.depth)")


def fail(message: str, code: int, on_failure=None) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if on_failure is not None:  # a multi-process job's peers then stop at once (distributed.report_failure)
        on_failure(message)
    return code


def main(fn, *args, interrupted: str, on_failure=None, exit_at_once: bool = False) -> int:
    """fn(*args) -> exit code, with every expected failure turned into one line.

    exit_at_once: on Ctrl-C leave without waiting for XLA to finish what it is computing (evaluation
    has nothing in flight worth waiting for).
    """
    try:
        return fn(*args)
    except UserError as e:
        return fail(str(e), 2, on_failure)
    except TrainingStopped as e:
        return fail(str(e), 1, on_failure)
    except KeyboardInterrupt:
        code = fail(interrupted, 130, on_failure)
        if exit_at_once:
            exit_now(code)
        return code
    except Exception as e:
        if (oom := out_of_memory(e)) is not None:
            return fail(oom, 1, on_failure)
        if isinstance(e, OSError):
            return fail(f"{e.strerror or type(e).__name__}: {e.filename or e}", 1, on_failure)
        raise


_before_exit: list = []  # what must not be lost when a process leaves with exit_now


def before_exit(hook) -> None:
    """Run hook() in exit_now, before the process leaves without waiting for anything (what must not be lost)."""
    _before_exit.append(hook)


def exit_now(code: int) -> None:
    """Leave at once, waiting for no thread and no XLA computation (a collective with a dead peer, an orbax
    save cut short), after what must not be lost: the lines already printed."""
    sys.stdout.flush()
    for hook in _before_exit:
        try:
            hook()
        except Exception:  # leaving anyway
            pass
    os._exit(code)


# --- Ctrl-C ---------------------------------------------------------------------------------------

def script_start() -> None:
    """A script's first line: Ctrl-C ends the process until the backend is up (below), and on a machine without
    an NVIDIA GPU jax is kept from its CUDA plugin, which jax[cuda12] installs everywhere and which prints a
    10-line traceback before falling back to the CPU. JAX_PLATFORMS, when set, is left as it is."""
    sigint_ends_the_process()
    if "JAX_PLATFORMS" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
        try:
            import jax_plugins  # a namespace package: importing it loads no plugin
        except ImportError:
            return
        if any(name.startswith("xla_cuda") for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)):
            os.environ["JAX_PLATFORMS"] = "cpu"


def sigint_ends_the_process() -> None:
    """From a script's first line until its backend is up: a KeyboardInterrupt raised while C extensions
    load can crash the process or be swallowed by jax's gc callback (the run then trains on). The
    kernel's default ends it instead: nothing is written before then, and a dying process's locks go
    with it. An ignored SIGINT (a script's `python train_char.py &`) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def sigint_raises() -> None:
    """Once the backend is up: Ctrl-C raises KeyboardInterrupt again, which main() makes one line."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class StopRequest:
    """While the loop runs: SIGINT/SIGTERM ask it to finish the step, checkpoint and exit; a second SIGINT
    aborts at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored at start (`cmd &`): stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            # Exit here rather than raise KeyboardInterrupt: raised inside an orbax save, it is logged
            # with a traceback and strands orbax's threads, which then hold the interpreter open.
            # A save cut short leaves only a *.orbax-checkpoint-tmp directory, never restored.
            print("error: aborted by a second Ctrl-C without saving the current step; checkpoints "
                  "already on disk are complete and intact", file=sys.stderr, flush=True)
            exit_now(130)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- process-wide hooks, installed by the scripts -------------------------------------------------

class _DropDiskFull(logging.Filter):
    """orbax logs a full disk from its writer threads, traceback and all; the run reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
        return not is_disk_full(exc)


def _is_late_tensorstore_callback(unraisable) -> bool:
    """After a failed save (a full disk) tensorstore reports each unfinished write of that checkpoint into
    orbax's closed event loop: one "Event loop is closed" traceback per array, echoes of a save already
    reported."""
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and unraisable.object is None
            and any(f.name == "call_soon_threadsafe" and f.filename.endswith("base_events.py") for f in frames))


_installed = []


def install() -> None:
    """The scripts' hooks: a full disk is said once, in main()'s one line, not again by orbax's threads,
    tensorstore's callbacks or the TensorBoard writer's thread. Once per process (tests call main() often)."""
    if _installed:
        return
    _installed.append(True)
    logging.getLogger("absl").addFilter(_DropDiskFull())
    previous_unraisable = sys.unraisablehook

    def unraisable(u):
        if not _is_late_tensorstore_callback(u):
            previous_unraisable(u)

    def thread_exception(args):
        if not is_disk_full(args.exc_value):
            threading.__excepthook__(args)

    sys.unraisablehook, threading.excepthook = unraisable, thread_exception
