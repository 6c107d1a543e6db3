"""The training loop: start (start.py) -> step -> periodic work (evaluate, save) -> report.

Steps in flight. The host dispatches a step and reads the one before it, so the devices never wait for
the host: several steps are in flight on accelerators, exactly one on CPUs (whose all-reduce can hang
when steps are dispatched back to back; docs/design.md). Batches are cut on a background thread and go
to the devices as bytes; the host reads one small status vector of each step and the full metrics only
of the steps it logs. Because steps are in flight when the host learns anything, stopping is decided on
the devices: once a stop is agreed (a signal to any process) or too many non-finite steps come in a row,
the step halts the run itself, and the steps already dispatched change nothing. The loop then breaks
at the first halted step it reads. Periodic work waits for the steps in flight first (`idle`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm import data, distributed, errors, evaluate, parallel, records, settings, start
from mingpt_palm.checkpoints import Checkpointer
from mingpt_palm.config import TrainConfig
from mingpt_palm.settings import validate_train
from mingpt_palm.errors import TrainingStopped
from mingpt_palm.logs import Logger, warn
from mingpt_palm.step import STATUS, Control, train_step


def train(cfg: TrainConfig) -> int:
    """Run (or continue) one experiment; returns the process exit code."""
    distributed.initialize(cfg.distributed_timeout, cfg.peer_timeout)
    jax.devices()
    errors.sigint_raises()  # the backend is up: Ctrl-C raises again (errors.sigint_ends_the_process)
    validate_train(cfg)
    run = start.begin(cfg)
    main, trainer = jax.process_index() == 0, None
    try:
        records.agree(run)
        if main and run.mode in ("new", "finetune"):
            run = records.record_new(run)
        distributed.barrier("experiment directory ready", cfg.distributed_timeout)
        if main:
            records.announce(run)
        trainer = Trainer(run)
        return trainer.loop()
    except BaseException:
        if main and not (trainer and trainer.stepped):
            run.exp.discard()  # removes only a directory this run created
        raise
    finally:
        run.exp.lock.release()


class Trainer:
    """One run's loop (steps in flight and the on-device halt: the module's first paragraph) and its periodic work."""

    def __init__(self, run: start.Run):
        self.run, cfg, self.exp, self.layout = run, run.cfg, run.exp, run.layout
        self.accum, self.depth = cfg.grad_accum_steps, parallel.steps_in_flight()
        self.local_batch = parallel.check_batch(cfg.batch_size, self.accum)
        self.log = Logger(start=run.start, total=cfg.max_steps, tokens_per_step=cfg.batch_size * cfg.model.seq_len,
                          bar=cfg.progress, tb_dir=self.exp.tb_dir)
        self.checkpoints = Checkpointer(
            self.exp.checkpoint_dir, interval=cfg.checkpoint_interval, keep=cfg.keep_checkpoints,
            last_step=cfg.max_steps, start=run.start, seed=cfg.seed, tokens_per_step=cfg.batch_size * cfg.model.seq_len,
            idle=self.idle, before_save=self.log.flush, layout=self.layout,
            resume_command=self.exp.command("train_char.py", "--restore-checkpoint"))
        self.validation = evaluate.Validation(run, micro_batch=self.local_batch // self.accum) \
            if cfg.eval_interval else None
        self.state, self.control = self.layout.place_state(run.state), self.layout.place(Control.start())
        self.p_step = self.layout.compile(partial(
            train_step, model=run.built.model, tx=run.built.tx, schedule=run.built.schedule, z_loss=cfg.model.z_loss,
            table=jnp.asarray(run.vocab.table), byte_lengths=jnp.asarray(run.vocab.byte_lengths),
            max_nonfinite=cfg.max_nonfinite_steps, seed=cfg.seed, layout=self.layout))
        self.pending: list = []  # (step, status, metrics) dispatched, not yet read
        self.stepped = self.halted = self.stop_agreed = False
        self.last_evaluated, self.read_at = -1, time.perf_counter()

    def make_batch(self, step: int) -> np.ndarray:
        cfg = self.run.cfg
        raw = data.batch(self.run.splits.train, cfg.seed, step, cfg.batch_size, cfg.model.seq_len)
        return self.layout.batch(raw, self.accum)

    def loop(self) -> int:
        cfg = self.run.cfg
        # The watch outlives the checkpointer's close: a save still waits for every process there.
        with distributed.PeerWatch(cfg.peer_timeout, partial(peer_lost, self.exp)) as peers:
            try:
                with errors.StopRequest() as stop, \
                        data.Prefetcher(self.make_batch, self.run.start, cfg.max_steps) as batches:
                    final = self.steps(stop, batches)
            except Exception as e:
                if not isinstance(e, (errors.UserError, TrainingStopped)):  # those say what stopped the run
                    peers.settle()  # a collective broken by a dead process: the death is the news, not the error
                raise
            finally:
                self.checkpoints.close()
                self.log.close()
        return self.report(stop.signum, final)

    def steps(self, stop: errors.StopRequest, batches: data.Prefetcher) -> int:
        """Train up to max_steps or until the run halts; returns the step the state has reached."""
        cfg = self.run.cfg
        self.dispatched_at = time.perf_counter()
        for step in range(self.run.start, cfg.max_steps):
            stopping = self.layout.stop_flags(stop.signum is not None)
            self.state, self.control, status, metrics = self.p_step(
                self.state, self.control, batches.get(step), stopping)
            self.pending.append((step + 1, status, metrics))
            # The first step (compiling) is read before the second goes out: what starts the run
            # (began) then runs with nothing in flight, and the steady windows start after it.
            self.complete(keep=self.depth if step > self.run.start else 0)
            done = step + 1
            evaluate_now = cfg.eval_interval and done % cfg.eval_interval == 0
            if (evaluate_now or self.checkpoints.due(done)) and not self.halted:
                self.complete(keep=0)  # the host must know that every step up to `done` was taken
            if self.halted:
                break
            if evaluate_now:
                self.evaluate(done)
            self.checkpoints.on_step(done, self.state)
        self.complete(keep=0)
        final = int(self.layout.read(self.state.step))
        if self.stop_agreed and self.checkpoints.last_saved != final:
            self.checkpoints.save(final, self.state)
        elif cfg.eval_interval and self.last_evaluated != final and not self.stop_agreed:
            self.evaluate(final)
        self.checkpoints.finish()
        return final

    def complete(self, keep: int) -> None:
        """Read the finished steps until at most `keep` are in flight."""
        while len(self.pending) > keep:
            self.step_done(*self.pending.pop(0))

    def step_done(self, step: int, status, metrics) -> None:
        """Host-side bookkeeping for a finished step: its status always, its metrics when it is logged."""
        jax.block_until_ready(status)  # every local device: a pending all-reduce is over
        self.read_at = time.perf_counter()
        s = dict(zip(STATUS, self.layout.read(status).tolist()))
        self.stepped = True
        if self.halted:
            return  # dispatched after the step that halted the run: it changed nothing
        cfg = self.run.cfg
        self.halted, self.stop_agreed = bool(s["halted"]), bool(s["stop"])
        give_up = self.halted and not self.stop_agreed
        if step == self.run.start + 1:
            self.began()
            self.log.first_step(self.read_at - self.dispatched_at, time.perf_counter())
        else:
            self.log.stepped()
        if not s["finite"]:
            warn(f"step {step}: non-finite loss, gradient or update (loss {s['loss']}, grad norm {s['grad_norm']}); "
                 f"update skipped ({int(s['bad_in_row'])} in a row)")
        # The step that ends the run is logged too, so the curves show the skips that stopped it.
        if step % cfg.log_interval == 0 or step == cfg.max_steps or give_up:
            self.log.log(step, {k: v.item() for k, v in self.layout.read(metrics).items()}, self.read_at)
        if give_up:
            last = self.checkpoints.last_saved
            saved = (f"checkpoint step {last} in {self.exp.checkpoint_dir} holds the last good parameters" if last
                     else f"no checkpoint had been saved yet in {self.exp.checkpoint_dir}")
            raise TrainingStopped(
                f"{int(s['bad_in_row'])} consecutive steps had a non-finite loss, gradient or update (last at step "
                f"{step}); stopped. Skipped steps never change the parameters: {saved}. Try a lower "
                "--optim.learning-rate or --model.dtype float32, then resume with --restore-checkpoint")

    def began(self) -> None:
        """The first step has run: only now does the run change its experiment. A continued run moves aside
        what it must and writes its records (a refused or failed start leaves the experiment as it was); the
        logs open after that (a run started over replaces the old ones)."""
        if self.run.mode in ("resume", "restart"):
            if jax.process_index() == 0:
                records.record_continued(self.run)
            distributed.barrier("continued run recorded", self.run.cfg.distributed_timeout)
        self.log.open(settings.flatten(self.run.cfg), metrics=["val/loss", "val/bpc", "train/loss"])

    @contextlib.contextmanager
    def idle(self):
        """Periodic work (evaluation, saving), timed out of tokens/s. The steps in flight are finished first:
        time during which the devices compute is training time, and taking it out would inflate tokens/s."""
        self.complete(keep=0)
        with self.log.timed():
            yield

    def evaluate(self, step: int) -> None:
        with self.idle():
            self.last_evaluated = step
            self.validation(self.state.params, step, self.log)

    def report(self, signum, final: int) -> int:
        main = jax.process_index() == 0
        if self.stop_agreed:
            if main:
                by = signal.Signals(signum).name if signum else "a signal to another process"
                print(f"stopped by {by} at step {final}; checkpoint saved in {self.exp.checkpoint_dir}. Resume "
                      f"with:\n  {self.exp.command('train_char.py', '--restore-checkpoint')}", file=sys.stderr)
            return 128 + (signum or signal.SIGTERM)
        if main:
            print(f"done: {final} steps; checkpoint step {self.checkpoints.last_saved} in {self.exp.checkpoint_dir}; "
                  f"evaluate with: {self.exp.command('eval_char.py')}")
        return 0


def peer_lost(exp, reason: str) -> None:
    """PeerWatch's verdict (on its thread): this process cannot go on without the other. One line, exit 1;
    the main thread may be stuck in a collective with the dead process, so nothing waits for it."""
    complete = exp.checkpoint_steps()
    last = f"step {complete[-1]} in {exp.checkpoint_dir}" if complete else "none yet"
    again = exp.command("train_char.py", "--restore-checkpoint")
    print(f"error: {reason}; this process (process {jax.process_index()}) stops too. The last complete checkpoint "
          f"is {last}; restart every process of the job with: {again}", file=sys.stderr, flush=True)
    errors.exit_now(1)
