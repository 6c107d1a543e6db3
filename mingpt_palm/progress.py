"""How far a long evaluation job has come, on stderr (stdout keeps the samples and the report)."""

from __future__ import annotations

import sys
import time

import jax
from tqdm import tqdm

# Without a terminal (a log file, a pipe) a line this often: enough to see the job moving, few enough to read.
LINE_INTERVAL_S = 30.0


class Progress:
    """A tqdm bar when stderr is a terminal, else a line `what: N of M unit (p%)` every LINE_INTERVAL_S;
    nothing on processes other than 0 (one report per job). Call it with each increment; use it as a
    context manager, so that an interrupted bar is cleared before the error line."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.on = jax.process_index() == 0
        self.last = time.monotonic()
        self.bar = None
        if self.on and sys.stderr.isatty():
            # Counts scaled (12.3M) only where they are long: tqdm would show 20 as 20.0.
            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", unit_scale=total >= 100_000,
                            dynamic_ncols=True, leave=False, file=sys.stderr)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.on and time.monotonic() - self.last >= LINE_INTERVAL_S:
            self.last = time.monotonic()
            share = 100 * self.done / max(self.total, 1)
            print(f"{self.what}: {self.done:,} of {self.total:,} {self.unit} ({share:.0f}%)", file=sys.stderr,
                  flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
