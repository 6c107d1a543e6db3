"""What both scripts do with a failure: one line on stderr, a meaningful exit code, no traceback.

2: bad input (UserError), nothing changed. 1: the run could not go on (TrainingStopped, out of memory,
a file-system error). 130: Ctrl-C.
"""

from __future__ import annotations

import os
import re
import sys
import threading

from mingpt_palm import interrupts
from mingpt_palm.config import TrainingStopped, UserError


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if "mingpt_palm.parallel" in sys.modules:  # else no job was ever joined
        sys.modules["mingpt_palm.parallel"].report_failure(message)  # a waiting peer then stops at once
    return code


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


def _thread_excepthook(args) -> None:
    """A full disk also fails the TensorBoard writer's thread; the main thread reports it in one line."""
    from mingpt_palm.experiment import is_disk_full

    if not is_disk_full(args.exc_value):
        threading.__excepthook__(args)


def run(fn, *args, interrupted: str, exit_at_once: bool = False) -> int:
    """fn(*args) -> exit code, with every expected failure turned into one line.

    exit_at_once: on Ctrl-C leave without waiting for XLA to finish what it is computing (evaluation
    has nothing in flight worth waiting for).
    """
    threading.excepthook = _thread_excepthook
    try:
        code = fn(*args)
        interrupts.release()  # a Ctrl-C held through a run that never started the backend (--print-params)
        return code
    except UserError as e:
        return fail(str(e), 2)
    except TrainingStopped as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        code = fail(interrupted, 130)
        if exit_at_once:
            sys.stdout.flush()
            os._exit(code)
        return code
    except Exception as e:
        if (oom := out_of_memory(e)) is not None:
            return fail(oom, 1)
        if isinstance(e, OSError):
            return fail(f"{e.strerror or type(e).__name__}: {e.filename or e}", 1)
        raise
