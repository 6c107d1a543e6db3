"""The training loop: set up (setup.py) -> step -> periodic work (log, evaluate, save) -> report.

The loop keeps the devices fed: batches are cut on a background thread and go to the devices as
bytes (encoded there; sentencepiece batches are cut from token ids encoded once), several steps are
in flight on accelerators (exactly one on CPUs, whose all-reduce can hang when steps are dispatched
back to back: DESIGN.md), the host reads one small status vector of each step from one device and
the full metrics only of the steps it logs, and a checkpoint is copied on the device and written
from a background thread while training goes on.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import sys
import threading
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mingpt_palm import checkpoints, data, evaluate, interrupts, parallel, sampling, setup
from mingpt_palm.config import TrainConfig, TrainingStopped, validate_train
from mingpt_palm.experiment import TensorBoardWriter, is_disk_full, warn
from mingpt_palm.step import STATUS, Control, train_step

__all__ = ["TrainingStopped", "train"]


def train(cfg: TrainConfig) -> int:
    """Run (or continue) one experiment; returns the process exit code."""
    parallel.initialize_distributed(cfg.distributed_timeout, cfg.peer_timeout)
    jax.devices()  # the backend starts while a Ctrl-C is still held (train_char.py)
    interrupts.release()
    validate_train(cfg)
    run = setup.prepare(cfg)
    is_main = jax.process_index() == 0
    try:
        setup.agree_across_processes(run)
        if is_main and run.mode in ("new", "finetune"):
            setup.record_new(run)
        parallel.barrier("experiment directory ready", cfg.distributed_timeout)
        if is_main:
            setup.announce(run)
        return Trainer(run).loop()
    except BaseException:
        if is_main and not run.stepped:
            run.exp.discard()  # removes only a directory this run created; puts the lock file back
        raise
    finally:
        run.exp.lock.release()


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the step, checkpoint and exit; a second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            # A signal the process started with ignored stays ignored: a shell without job control
            # starts `python train_char.py &` so, to keep the terminal's Ctrl-C for the foreground.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            # Exit here rather than raise KeyboardInterrupt: raised inside an orbax save, it is logged
            # with a traceback and strands orbax's threads, which then hold the interpreter open.
            # A save cut short leaves only a *.orbax-checkpoint-tmp directory, never restored.
            print("error: aborted by a second Ctrl-C without saving the current step; checkpoints "
                  "already on disk are complete and intact", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Prefetcher:
    """Cuts the batches of the coming steps on a background thread, `ahead` of the loop."""

    def __init__(self, make_batch, start: int, stop: int, ahead: int = 2):
        self._make, self._steps = make_batch, iter(range(start, stop))
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="batches")

    def _fill(self) -> None:
        for step in self._steps:
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # handed to the loop, which raises it where it would have happened
                item = (step, None, e)
            while not self._done.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._done.is_set() or item[2] is not None:
                return

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def get(self, step: int):
        got, batch, error = self._queue.get()
        if error is not None:
            raise error
        assert got == step, (got, step)
        return batch

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class HostCopy:
    """jax.device_get of a tree on a background thread; result() waits and raises what it raised."""

    def __init__(self, tree):
        self._out, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(tree,), daemon=True, name="host-copy")
        self._thread.start()

    def _run(self, tree) -> None:
        try:
            self._out = jax.device_get(tree)
        except BaseException as e:  # raised on the main thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


class Throughput:
    """Steps and training seconds since the last report. Windows run from the moment one step's result is
    read to the moment another's is (the host's own work in between overlaps the devices' next step).
    Time inside `timed()` is not training time; the trainer enters it only with no step in flight, so
    that nothing it subtracts overlapped device work."""

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


class Trainer:
    """The step loop and its periodic work (log, evaluate, save)."""

    def __init__(self, run: setup.Run):
        self.run = run
        cfg = self.cfg = run.cfg
        self.exp = run.exp
        self.is_main = jax.process_index() == 0
        self.n_proc = jax.process_count()
        self.accum = cfg.grad_accum_steps
        self.tokens_per_step = cfg.batch_size * cfg.model.seq_len
        self.local_batch = parallel.check_batch(cfg.batch_size, self.accum)
        self.depth = parallel.steps_in_flight()
        self.p_eval = evaluate.make_eval_step(run.model)
        vocab, val = run.vocab, run.corpus.val
        self.val_tokens = np.concatenate([
            vocab.table[data.get_batch(run.splits.val, cfg.seed, i, cfg.batch_size, cfg.model.seq_len,
                                       jax.process_index(), self.n_proc, data.EVAL_STREAM)]
            for i in range(cfg.eval_batches)
        ]) if cfg.eval_interval else None
        self.prompt = vocab.encode(np.frombuffer(data.default_prompt(val, cfg.seed), np.uint8))
        self.writer: TensorBoardWriter | None = None  # made by began(), once the first step has run
        self.saver = checkpoints.Saver(self.exp.checkpoint_dir, cfg.keep_checkpoints)
        # A bar on a terminal; otherwise one line per --log-interval steps, which logs can be grepped for.
        self.bar_on = cfg.progress and self.is_main and sys.stdout.isatty()
        self.bar = tqdm(total=cfg.max_steps, initial=run.start, disable=not self.bar_on, dynamic_ncols=True)
        self.skipped_total = int(run.state.skipped)
        self.rstate, self.control = parallel.replicate(run.state), parallel.replicate(Control.start())
        run.state = None  # the replicated copy is the only one from here on
        self.p_step = self.make_step()
        self.pending: collections.deque = collections.deque()  # (step, metrics) dispatched, not yet read
        self.last_saved, self.last_evaluated, self.halted, self.stop_agreed = run.start, -1, False, False
        self.copy: HostCopy | None = None  # a checkpoint on its way to the host
        self.to_write: tuple | None = None  # (step, meta) of that checkpoint
        self.throughput = Throughput()

    def make_step(self):
        """The pmapped step. It compiles at its first call; that step's time is reported apart and left
        out of tokens/s. (Compiling ahead with .lower().compile() would not take a multi-process job's
        per-process arrays.)"""
        run, cfg = self.run, self.cfg
        return parallel.pmap(partial(train_step, model=run.model, tx=run.tx, schedule=run.schedule,
                                     z_loss=cfg.model.z_loss, table=jnp.asarray(run.vocab.table),
                                     max_nonfinite=cfg.max_nonfinite_steps, seed=cfg.seed), donate_state=True)

    def make_batch(self, step: int) -> np.ndarray:
        cfg = self.cfg
        raw = data.get_batch(self.run.splits.train, cfg.seed, step, cfg.batch_size, cfg.model.seq_len,
                             jax.process_index(), self.n_proc)
        return parallel.shard_micro_batches(raw, self.accum)

    def batch_bytes(self, step: int) -> int:
        """The bytes of text the targets of step `step`'s whole batch (every process's share) cover."""
        cfg = self.cfg
        tokens = data.get_batch(self.run.splits.train, cfg.seed, step, cfg.batch_size, cfg.model.seq_len)
        return int(np.sum(self.run.vocab.byte_lengths[tokens[:, 1:]], dtype=np.int64))

    @staticmethod
    def stop_flags(asked: bool) -> np.ndarray:
        return np.full(jax.local_device_count(), asked)

    def say(self, line: str) -> None:
        if self.is_main:
            self.bar.write(line) if self.bar_on else print(line, flush=True)

    # --- the loop ----------------------------------------------------------------------------------

    def loop(self) -> int:
        cfg, stop = self.cfg, _StopRequest()
        try:
            with stop, parallel.PeerWatch(cfg.peer_timeout, self.peer_lost), \
                    Prefetcher(self.make_batch, self.run.start, cfg.max_steps) as batches:
                self.first_dispatch = time.perf_counter()
                for step in range(self.run.start, cfg.max_steps):
                    self.rstate, self.control, metrics = self.p_step(
                        self.rstate, self.control, batches.get(step), self.stop_flags(stop.signum is not None))
                    self.pending.append((step + 1, metrics))
                    # The first step (compiling) is read before the second goes out: what starts the run
                    # (began) then runs with nothing in flight, and the steady windows start after it.
                    self.complete(keep=self.depth if step > self.run.start else 0)
                    self.start_write()
                    done = step + 1
                    periodic = (cfg.eval_interval and done % cfg.eval_interval == 0) or \
                        done % cfg.checkpoint_interval == 0 or done == cfg.max_steps
                    if periodic and not self.halted:
                        self.complete(keep=0)  # the host must know that every step up to `done` was taken
                    if self.halted:
                        break
                    if periodic:
                        self.periodic(done)
                self.complete(keep=0)
                final = int(parallel.unreplicate(self.rstate.step))
                if self.stop_agreed and self.last_saved != final:
                    self.save(final)
                elif cfg.eval_interval and self.last_evaluated != final and not self.stop_agreed:
                    self.evaluate(final)
                self.finish_saves()
        finally:
            self.close()
        return self.report(stop, final)

    def periodic(self, done: int) -> None:
        if self.cfg.eval_interval and done % self.cfg.eval_interval == 0:
            self.evaluate(done)
        if done % self.cfg.checkpoint_interval == 0 or done == self.cfg.max_steps:
            self.save(done)

    def complete(self, keep: int) -> None:
        """Read the finished steps until at most `keep` are in flight."""
        while len(self.pending) > keep:
            self.step_done(*self.pending.popleft())

    def step_done(self, step: int, metrics) -> None:
        """Host-side bookkeeping for a finished step: its status always, its metrics when it is logged."""
        jax.block_until_ready(metrics["status"])  # every local device: a pending all-reduce is over
        self.read_at = time.perf_counter()
        s = dict(zip(STATUS, parallel.unreplicate(metrics["status"]).tolist()))
        self.run.stepped = True
        if self.halted:
            return  # dispatched after the step that halted the run: it changed nothing
        cfg = self.cfg
        self.halted = bool(s["halted"])
        self.stop_agreed = bool(s["stop"])
        give_up = self.halted and not self.stop_agreed
        if step == self.run.start + 1:
            self.began()
            cache = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
            self.say(f"first step: {time.perf_counter() - self.first_dispatch:.1f} s, compiling the train step"
                     f"{' (or loading it from the compilation cache)' if cache else ''} included (left out of tokens/s)")
            self.throughput.reset(time.perf_counter())  # nothing is in flight yet (loop): began() is not training
        else:
            self.throughput.steps += 1
        self.skipped_total += not s["finite"]
        if not s["finite"]:
            warn(f"step {step}: non-finite loss, gradient or update (loss {s['loss']}, grad norm {s['grad_norm']}); "
                 f"update skipped ({int(s['bad_in_row'])} in a row)")
        self.bar.update(1)
        # The step that ends the run is logged too, so the curves show the skips that stopped it.
        if step % cfg.log_interval == 0 or step == cfg.max_steps or give_up:
            self.log(step, metrics)
        if give_up:
            saved = (f"checkpoint step {self.last_saved} in {self.exp.checkpoint_dir} holds the last good parameters"
                     if self.last_saved else f"no checkpoint had been saved yet in {self.exp.checkpoint_dir}")
            raise TrainingStopped(
                f"{int(s['bad_in_row'])} consecutive steps had a non-finite loss, gradient or update (last at step "
                f"{step}); stopped. Skipped steps never change the parameters: {saved}. Try a lower "
                "--optim.learning-rate or --model.dtype float32, then resume with --restore-checkpoint"
            )

    def began(self) -> None:
        """The first step has run: the run is under way, and only now does it change its experiment. A
        continued run moves aside what it must and writes its records (a refused or failed start leaves
        the experiment as it was); the logs open after that (a run started over replaces the old ones)."""
        if self.run.mode in ("resume", "restart"):
            if self.is_main:
                setup.record_continued(self.run)
            parallel.barrier("continued run recorded", self.cfg.distributed_timeout)
        if self.is_main:
            self.writer = TensorBoardWriter(self.exp.tb_dir)

    def peer_lost(self, reason: str) -> None:
        """PeerWatch's verdict (on its thread): this process cannot go on without the other. One line, exit 1;
        the main thread may be stuck in a collective with the dead process, so nothing waits for it."""
        complete = self.exp.checkpoint_steps()
        last = f"step {complete[-1]} in {self.exp.checkpoint_dir}" if complete else "none yet"
        print(f"error: {reason}; this process (process {jax.process_index()}) stops too. The last complete checkpoint "
              f"is {last}; restart every process of the job with: {setup.resume_command(self.cfg)}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    # --- periodic work -------------------------------------------------------------------------------

    def log(self, step: int, metrics) -> None:
        m = {k: v.item() for k, v in parallel.unreplicate({k: metrics[k] for k in (
            "loss", "bpc", "z_loss", "lr", "grad_norm")}).items()}
        if self.run.vocab.kind == "sentencepiece":  # the step's bpc is per token; per byte is what compares
            m["bits_per_token"], m["bpc"] = m["bpc"], m["bpc"] * self.tokens_per_step / self.batch_bytes(step - 1)
        steps, seconds = self.throughput.steps, self.throughput.seconds(until=self.read_at)
        # No steady-state figure yet when the window holds only the first (compiling) step.
        tok_s = steps * self.tokens_per_step / max(seconds, 1e-9) if steps else None
        speed = f"{tok_s:,.0f} tokens/s, {1e3 * seconds / steps:.1f} ms/step" if tok_s is not None else "first step"
        if self.bar_on:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s or 0:,.0f}")
        else:
            skipped = f", {self.skipped_total} skipped" if self.skipped_total else ""
            self.say(f"step {step}/{self.cfg.max_steps}: loss {m['loss']:.4f}, lr {m['lr']:.3e}, {speed}{skipped}")
        if self.writer:
            scalars = {
                "train/loss": m["loss"], "train/bpc": m["bpc"], "train/z_loss": m["z_loss"],
                "train/learning_rate": m["lr"], "train/grad_norm": m["grad_norm"],
                "train/skipped_steps": self.skipped_total, "train/tokens_seen": step * self.tokens_per_step,
            }
            if "bits_per_token" in m:
                scalars["train/bits_per_token"] = m["bits_per_token"]
            if tok_s is not None:
                scalars["train/tokens_per_second"] = tok_s
            self.writer.scalars(step, scalars)
        self.throughput.reset(self.read_at)

    @contextlib.contextmanager
    def off_the_clock(self):
        """Periodic work (evaluation, saving), timed out of tokens/s. The steps in flight are finished first:
        time during which the devices compute is training time, and taking it out would inflate tokens/s."""
        self.complete(keep=0)
        with self.throughput.timed():
            yield

    def evaluate(self, step: int) -> None:
        with self.off_the_clock():
            self.last_evaluated = step
            rparams = self.rstate.params
            # Windows of one micro-batch at a time: a device that fits training fits its evaluation.
            result = evaluate.score(self.p_eval, rparams, self.val_tokens,
                                    np.ones(self.val_tokens[:, 1:].shape, np.float32), self.local_batch // self.accum,
                                    self.run.vocab.byte_lengths)
            if self.writer:
                # val/bpc is bits per byte for every tokenizer (for byte and char ids the same as per token).
                self.writer.scalars(step, {"val/loss": result["loss"], "val/bpc": result["bits_per_byte"],
                                           "val/bits_per_token": result["bits_per_token"]})
                if self.cfg.sample_length:
                    ids = sampling.generate(parallel.first_replica(rparams), self.cfg.model, self.prompt,
                                            self.cfg.sample_length, jax.random.PRNGKey(step), temperature=0.8)
                    vocab = self.run.vocab
                    text = (vocab.decode(self.prompt) + vocab.decode(ids[0])).decode("utf-8", errors="replace")
                    self.writer.text(step, "samples/val_prompt", "    " + text.replace("\n", "\n    "))
                self.writer.flush()
            sentencepiece = self.run.vocab.kind == "sentencepiece"
            per_token = f" ({result['bits_per_token']:.4f} bits per token)" if sentencepiece else ""
            self.say(f"step {step}: val loss {result['loss']:.4f}, val bpc {result['bits_per_byte']:.4f}{per_token}")

    def save(self, step: int) -> None:
        """Checkpoint this step without holding up training for the copy to the host: the state is copied
        on the device (the next step may overwrite donated buffers), brought to the host on a background
        thread, and handed to orbax (which writes asynchronously) on the main thread once it is there:
        orbax's own threads and event loop belong to the main thread. The previous save must have finished
        first, so that a failure is blamed on the step that failed."""
        with self.off_the_clock():
            self.finish_saves()
            snapshot = jax.tree.map(jnp.copy, parallel.first_replica(self.rstate))
            meta = {"step": step, "seed": self.cfg.seed, "tokens_seen": step * self.tokens_per_step,
                    "devices": jax.device_count(), "processes": self.n_proc}
            self.last_saved = step
            if self.writer:  # a killed run's curves then reach at least its last checkpoint
                with self.stopping_on_a_full_disk(step):
                    self.writer.flush()
            self.copy = HostCopy(snapshot)
            self.to_write = (step, meta)
            if self.n_proc > 1:  # all processes of a job must reach orbax's save together: no waiting game
                self.start_write(wait=True)

    def start_write(self, wait: bool = False) -> None:
        """Hand a checkpoint whose host copy is complete to orbax (`wait`: block for the copy)."""
        if self.to_write is None or not (wait or self.copy.done()):
            return
        # Handed over only once the drain (which may find the run halted, and raise) is through: close()
        # then still writes a checkpoint taken just before the step that stopped the run.
        with self.off_the_clock():
            step, meta = self.to_write
            self.to_write = None
            with self.stopping_on_a_full_disk(step):
                self.saver.save(step, self.copy.result(), meta)
            self.copy = None

    def finish_saves(self) -> None:
        self.start_write(wait=True)
        with self.stopping_on_a_full_disk(self.last_saved):
            self.saver.wait()

    @contextlib.contextmanager
    def stopping_on_a_full_disk(self, step: int):
        """A full disk stops the run with one line that says what survived; anything else passes through."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            complete = self.exp.checkpoint_steps()
            last = f"step {complete[-1]}" if complete else "none"
            raise TrainingStopped(
                f"the disk is full: checkpoint step {step} could not be written to {self.exp.checkpoint_dir}; the "
                f"last complete checkpoint is {last}. Free some space, then resume with: "
                f"{setup.resume_command(self.cfg)}"
            ) from None

    def close(self) -> None:
        self.bar.close()
        # A checkpoint already taken is written even when the run fails right after it (a non-finite
        # streak's last step, say): the stop message names it as the last good one.
        with contextlib.suppress(Exception):
            self.start_write(wait=True)
        with contextlib.suppress(Exception):  # after a failed save orbax raises its error again here
            self.saver.close()
        if self.writer:
            with contextlib.suppress(Exception):
                self.writer.close()

    def report(self, stop: _StopRequest, final: int) -> int:
        if self.stop_agreed:
            if self.is_main:
                by = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
                print(f"stopped by {by} at step {final}; checkpoint saved in {self.exp.checkpoint_dir}. Resume "
                      f"with:\n  {setup.resume_command(self.cfg)}", file=sys.stderr)
            return 128 + (stop.signum or signal.SIGTERM)
        if self.is_main:
            print(f"done: {final} steps; checkpoint step {self.last_saved} in {self.exp.checkpoint_dir}; "
                  f"evaluate with: {setup.eval_command(self.cfg)}")
        return 0
