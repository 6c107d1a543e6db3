"""Ctrl-C before training starts: raised only where it cannot be lost or crash the process.

Raised at an arbitrary moment of start-up, a KeyboardInterrupt lands inside the initialisation of a C
extension (an ImportError, an abort or a segfault, each with a traceback), or inside code that swallows
it (jax's garbage-collection callback, its plugin discovery), and the run then goes on and exits 0.
Measured on train_char.py with Ctrl-C 0.2-1.7 s after the start: 12 of 36 ended one of those ways.

So the scripts `hold()` SIGINT from their first line: it is only recorded while the libraries load and
the backend starts. `release()`, called once the backend is up, raises a recorded one there, and from
then on a Ctrl-C raises KeyboardInterrupt at once unless it arrives inside an import or a gc callback,
where it is sent again 20 ms later. The scripts turn the KeyboardInterrupt into one line (cli.run); the
training loop then installs its own handler (train._StopRequest).
"""

from __future__ import annotations

import gc
import os
import signal
import threading

_held: list[int] = []


def _hold(signum, frame) -> None:
    _held.append(signum)


def _unsafe(frame) -> bool:
    """Inside an import (a C extension may be initialising) or a gc callback (which swallows exceptions)."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame) -> None:
    if _unsafe(frame):
        again = threading.Timer(0.02, os.kill, (os.getpid(), signum))
        again.daemon = True  # a process that ends within the 20 ms is not kept waiting for it
        again.start()
        return
    raise KeyboardInterrupt


def hold() -> None:
    """Record Ctrl-C instead of raising it; only over Python's own handler (an ignored SIGINT stays so)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _hold)


def release() -> None:
    """Ctrl-C raises again (outside imports and gc callbacks); one that came while held is raised now."""
    if signal.getsignal(signal.SIGINT) is _hold:
        signal.signal(signal.SIGINT, _interrupt)
    if _held:
        _held.clear()
        raise KeyboardInterrupt
