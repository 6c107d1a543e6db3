"""What a run tells its user: a progress bar or plain lines, TensorBoard scalars, text and settings.

As flax's lm1b does it: the train step returns a dict of scalars and `Logger.log` writes every key it
gets (to TensorBoard as train/<key>), so a new metric is one line in the step. tokens/s counts
training time only: work timed out with `with logger.timed():` is left out, and the loop enters it
with no step in flight (time the devices spend computing is never taken out). Only process 0 speaks,
and gloo's connection lines are kept off a multi-process job's stdout (`StdoutWithoutGloo`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from mingpt_palm import errors

# Without a terminal (a log file, a pipe) a progress line this often: enough to see a job move.
LINE_INTERVAL_S = 30.0


def is_main() -> bool:
    return jax.process_index() == 0  # every process would say the same


def warn(msg: str) -> None:
    if is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class TensorBoardWriter:
    """Scalars, text and hyperparameters written with the tensorboard package alone (no TensorFlow)."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))

    def _add(self, step: int, summary) -> None:
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, step: int, values: dict) -> None:
        self._add(step, summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]))

    def text(self, step: int, tag: str, text: str) -> None:
        self._add(step, text_pb(tag, text))

    def settings(self, flat: dict, metrics: list[str]) -> None:
        """The run's settings as text, and as hyperparameters so that runs compare in the HPARAMS tab."""
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()}
        self._add(0, hparams.hparams_config_pb([hparams.HParam(k) for k in values],
                                               [hparams.Metric(m) for m in metrics]))
        self._add(0, hparams.hparams_pb(values, start_time_secs=int(time.time())))
        table = "\n".join(f"    {k} = {v!r}" for k, v in values.items())
        self.text(0, "settings", table)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class Throughput:
    """Steps and training seconds since the last report. Windows run from the moment one step's result
    is read to the moment another's is (the host's own work in between overlaps the devices' next step);
    time inside `timed()` is subtracted."""

    def __init__(self):
        self._depth = 0
        self.reset(time.perf_counter())

    def reset(self, at: float) -> None:
        self.began, self.excluded, self.steps = at, 0.0, 0
        self._block_began = at  # a block under way counts into the new window from now on

    @contextlib.contextmanager
    def timed(self):
        """Nested blocks (a save that first finishes the previous one) count once, as the outermost."""
        if not self._depth:
            self._block_began = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self.excluded += time.perf_counter() - self._block_began

    def seconds(self, until: float) -> float:
        return until - self.began - self.excluded


class Logger:
    """A tqdm bar on a terminal, otherwise one line per logged step (which logs can be grepped for), and
    TensorBoard under tb_dir, opened by `open()` once the run is under way."""

    def __init__(self, *, start: int, total: int, tokens_per_step: int, bar: bool, tb_dir: Path):
        self.main, self.total, self.tokens_per_step, self.tb_dir = is_main(), total, tokens_per_step, tb_dir
        self.bar_on = bar and self.main and sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=start, disable=not self.bar_on, dynamic_ncols=True)
        self.writer: TensorBoardWriter | None = None
        self.throughput = Throughput()

    def open(self, settings: dict, metrics: list[str]) -> None:
        if self.main:
            self.writer = TensorBoardWriter(self.tb_dir)
            self.writer.settings(settings, metrics)

    def say(self, line: str) -> None:
        if self.main:
            self.bar.write(line) if self.bar_on else print(line, flush=True)

    def timed(self):
        return self.throughput.timed()

    def first_step(self, seconds: float, began_at: float) -> None:
        cache = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
        self.say(f"first step: {seconds:.1f} s, compiling the train step"
                 f"{' (or loading it from the compilation cache)' if cache else ''} included (left out of tokens/s)")
        self.bar.update(1)
        self.throughput.reset(began_at)

    def stepped(self) -> None:
        self.bar.update(1)
        self.throughput.steps += 1

    def log(self, step: int, metrics: dict, read_at: float) -> None:
        """Every scalar of `metrics` (a step's, on the host), with the throughput since the last log."""
        steps, seconds = self.throughput.steps, self.throughput.seconds(until=read_at)
        tok_s = steps * self.tokens_per_step / max(seconds, 1e-9) if steps else None  # None: only the first step
        if self.bar_on:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tok_s or 0:,.0f}")
        else:
            speed = f"{tok_s:,.0f} tokens/s, {1e3 * seconds / steps:.1f} ms/step" if tok_s else "first step"
            skipped = f", {metrics['skipped_steps']:.0f} skipped" if metrics.get("skipped_steps") else ""
            self.say(f"step {step}/{self.total}: loss {metrics['loss']:.4f}, lr {metrics['learning_rate']:.3e}, "
                     f"{speed}{skipped}")
        extra = {"tokens_seen": step * self.tokens_per_step} | ({"tokens_per_second": tok_s} if tok_s else {})
        self.scalars(step, {f"train/{k}": v for k, v in (metrics | extra).items()})
        self.throughput.reset(read_at)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer:
            self.writer.scalars(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer:
            self.writer.text(step, tag, text)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            with contextlib.suppress(Exception):  # a full disk is reported by the run already
                self.writer.close()


class Progress:
    """How far a long evaluation job has come, on stderr (stdout keeps the samples and the report): a
    tqdm bar when stderr is a terminal, else a line `what: N of M unit (p%)` every LINE_INTERVAL_S. Call
    it with each increment; as a context manager an interrupted bar is cleared before the error line."""

    def __init__(self, what: str, total: int, unit: str):
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.on, self.last, self.bar = is_main(), time.monotonic(), None
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

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


class StdoutWithoutGloo:
    """gloo (the CPU collectives of a multi-process job) announces each connection on stdout from C++ threads,
    "[Gloo] Rank 0 is connected to 1 peer ranks. ...", where the run's own lines and a user's pipes are: fd 1
    goes through a pipe, and a thread passes on every line but those (torn ones included)."""

    def __init__(self):
        sys.stdout.flush()
        self.real, (self.pipe, write_end) = os.dup(1), os.pipe()
        os.dup2(write_end, 1)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pass_on, daemon=True, name="stdout-without-gloo")
        self.thread.start()
        atexit.register(self.close)
        errors.before_exit(self.close)

    def _pass_on(self) -> None:
        rest = b""
        while chunk := os.read(self.pipe, 1 << 16):
            *lines, rest = (rest + chunk).split(b"\n")
            kept = [line + b"\n" for line in lines if b"[Gloo]" not in line and b"peer ranks" not in line]
            if kept:
                os.write(self.real, b"".join(kept))
        if rest:
            os.write(self.real, rest)

    def close(self) -> None:
        """Everything printed so far reaches the real stdout, which fd 1 is again."""
        if self.thread.is_alive():
            sys.stdout.flush()
            os.dup2(self.real, 1)  # the pipe's last write end closes: the thread reads to its end
            self.thread.join(timeout=5)
