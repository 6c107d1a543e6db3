"""The training loop: build -> maybe restore -> step -> log -> eval -> checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import socket
import sys
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mingpt_palm import config as config_lib
from mingpt_palm import data, evaluate, parallel, sampling
from mingpt_palm.config import TrainConfig, TrainingStopped, UserError, validate_train
from mingpt_palm.experiment import Experiment, TensorBoardWriter, is_disk_full, warn
from mingpt_palm.model import PaLM, cross_entropy, param_count
from mingpt_palm.optim import lr_schedule, make_optimizer

__all__ = ["TrainState", "TrainingStopped", "init_params", "init_state", "train", "train_step"]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken so far (= index of the next batch)
    params: Any
    opt_state: Any
    skipped: jax.Array  # steps whose loss or gradient was non-finite and were not applied


def train_step(state: TrainState, tokens, stop, *, model, tx, schedule, z_loss):
    """One data-parallel step on this device's slice [B, L+1]; returns (state, metrics).

    `stop` is this process's "a signal asked me to stop"; the step returns whether any process
    asked, so that all processes stop after the same step (one stopping alone would leave the
    others waiting in the next all-reduce forever).
    """

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:], z_loss)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads, metrics = parallel.pmean((grads, {k: metrics[k] for k in ("loss", "bpc", "z_loss")}))
    grad_norm = optax.tree_utils.tree_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite loss and gradient can still give non-finite weights (an overflowing update): the
    # result is checked too, so that no step can poison the parameters.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & all_finite((params, opt_state))
    # A non-finite step changes nothing but the counters: params and Adam moments stay as they were.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    metrics.update(grad_norm=grad_norm, lr=schedule(state.step - state.skipped), finite=finite,
                   stop=parallel.pany(stop))
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    return new_state, metrics


def all_finite(tree) -> jax.Array:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))


def init_params(model, cfg: TrainConfig):
    return model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, cfg.model.seq_len), jnp.int32))["params"]


def init_state(model, tx, cfg: TrainConfig) -> TrainState:
    params = init_params(model, cfg)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0))


def steps_for_epochs(epochs: float, train_bytes: int, seq_len: int, batch_size: int) -> int:
    """Optimizer steps for `epochs` passes: an epoch is train_bytes / seq_len windows of seq_len targets."""
    return max(1, math.ceil(epochs * train_bytes / seq_len / batch_size))


def resume_command(cfg: TrainConfig) -> str:
    """The command that continues this run: the saved config supplies every other setting."""
    args = ["python", "train_char.py", "--experiment-name", cfg.experiment_name, "--restore-checkpoint"]
    if cfg.experiments_dir != TrainConfig.experiments_dir:
        args[2:2] = ["--experiments-dir", cfg.experiments_dir]
    return shlex.join(args)


def eval_command(cfg: TrainConfig) -> str:
    args = ["python", "eval_char.py", "--experiment-name", cfg.experiment_name]
    if cfg.experiments_dir != TrainConfig.experiments_dir:
        args += ["--experiments-dir", cfg.experiments_dir]
    return shlex.join(args)


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to finish the step, checkpoint and exit; a second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
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


# --- setup: everything that can fail on bad input happens before anything is written -------------

@dataclasses.dataclass
class Run:
    cfg: TrainConfig  # as it will be saved: name, max_steps, corpus path and vocabulary size resolved
    exp: Experiment
    corpus: data.Corpus
    fingerprint: dict
    vocab: data.Vocab
    model: PaLM
    tx: Any
    schedule: Any
    decayed: list
    state: TrainState  # on the host (restored or freshly initialised)
    start: int
    saved: TrainConfig | None  # the settings of the run being continued (None for a new run)
    notes: list  # start-up lines particular to this start (resumes: what changed and what it means)
    stepped: bool = False  # a step has finished: from now on the directory is worth keeping


def _open_experiment(cfg: TrainConfig, resuming: bool) -> Experiment:
    """Name, existence and (when continuing) the lock, before a single byte of the corpus is read."""
    name = cfg.experiment_name
    if name is None:
        if resuming:
            raise UserError("--restore-checkpoint needs --experiment-name (which experiment to continue)")
        if jax.process_count() > 1:  # each process would stamp its own time
            raise UserError("a multi-process run needs --experiment-name (the same on every process)")
        name = f"{Path(cfg.dataset_path).stem}_{datetime.now():%Y-%m-%d-%H%M%S}"
    exp = Experiment(cfg.experiments_dir, name, keep=cfg.keep_checkpoints, unique=cfg.experiment_name is None)
    if resuming:
        exp.check_existing()
        if not exp.checkpoint_steps():
            raise UserError(f"--restore-checkpoint: {exp.checkpoint_dir} holds no checkpoint to continue from "
                            f"(the run stopped before its first save); delete {exp.path} to start it over")
        if jax.process_index() == 0:
            # Before orbax looks at the checkpoints: it would delete a live run's save in progress.
            exp.lock.acquire(shlex.join(sys.argv))
    elif cfg.experiment_name is not None:
        exp.check_new()
    return exp


def _load_data(cfg: TrainConfig, exp: Experiment, saved: TrainConfig | None):
    """(corpus, fingerprint, vocab); a continued run gets exactly the corpus and vocabulary it had."""
    recorded = exp.read_corpus() if saved else None
    corpus = data.load_corpus(cfg.dataset_path, cfg.data, progress=cfg.progress and jax.process_index() == 0,
                              expect=recorded, owner=str(exp.path))
    seq_len = cfg.model.seq_len
    fractions = "" if corpus.registered and corpus.registered.split_bytes else (
        f", smaller --data.val-fraction/--data.test-fraction (now {cfg.data.val_fraction} + "
        f"{cfg.data.test_fraction} of the file)")
    data.require_windows(corpus.train, "train", seq_len, corpus.path,
                         f"use a smaller --block-size{fractions} or a bigger corpus")
    if cfg.eval_interval:
        val_hint = "" if fractions == "" else ", a larger --data.val-fraction"
        data.require_windows(corpus.val, "val", seq_len, corpus.path,
                             f"use a smaller --block-size{val_hint}, --eval-interval 0, or a bigger corpus")
    vocab = exp.read_vocab(saved.model.num_tokens) if saved else data.Vocab.build(cfg.data.vocab, corpus.train)
    return corpus, recorded or data.fingerprint(corpus.path), vocab


def _resolve(cfg: TrainConfig, saved: TrainConfig | None, exp: Experiment, corpus, vocab) -> TrainConfig:
    """The settings as they will be saved, checked against the saved ones when continuing."""
    epochs = cfg.max_epochs
    if saved is not None and cfg.max_steps != saved.max_steps and cfg.max_epochs == saved.max_epochs:
        epochs = None  # --max-steps given now wins over the --max-epochs of the original command
    max_steps = cfg.max_steps
    if epochs is not None:
        max_steps = steps_for_epochs(epochs, len(corpus.train), cfg.model.seq_len, cfg.batch_size)
        if max_steps > config_lib.STEP_LIMIT:
            raise UserError(f"--max-epochs {epochs} means {max_steps:,} steps, more than the 2**31 - 1 a run can take")
    # A file path is stored absolute so that eval_char.py finds the corpus from any directory.
    dataset = cfg.dataset_path if corpus.registered else str(corpus.path.resolve())
    out = dataclasses.replace(cfg, experiment_name=exp.name, max_steps=max_steps, max_epochs=epochs,
                              dataset_path=dataset, restore_checkpoint=False, restore_step=None,
                              model=dataclasses.replace(cfg.model, num_tokens=vocab.size))
    if saved is not None:
        # The corpus is checked by content (corpus.json): a moved file with the same bytes is the same corpus.
        by_content = exp.corpus_path.exists()
        refused = [d for d in config_lib.differences(saved, out, config_lib.is_run_defining)
                   if not (d[0] == "dataset_path" and by_content)]
        if refused:
            listing = "; ".join(f"{path}: {a!r} saved vs {b!r} given" for path, a, b in refused)
            raise UserError(f"cannot continue {exp.path} with different settings ({listing}); they would silently "
                            "change what the run computes: leave them out to continue with the saved ones, or "
                            "start a new experiment")
    return out


def _resume_notes(run_cfg: TrainConfig, saved: TrainConfig, state, meta: dict) -> list[str]:
    notes = []
    start, applied = int(state.step), int(state.step) - int(state.skipped)
    if run_cfg.max_steps != saved.max_steps:
        before = float(lr_schedule(saved.optim, saved.max_steps)(applied))
        after = float(lr_schedule(run_cfg.optim, run_cfg.max_steps)(applied))
        notes.append(f"schedule: re-planned from step {start} for {run_cfg.max_steps:,} steps instead of "
                     f"{saved.max_steps:,}; learning rate of the next step {before:.4g} -> {after:.4g}")
    if saved.dataset_path != run_cfg.dataset_path:
        notes.append(f"corpus: {run_cfg.dataset_path} (moved from {saved.dataset_path}; same size and sha256)")
    n_dev = jax.device_count()
    if meta.get("devices") not in (None, n_dev):
        notes.append(f"devices: {n_dev} now, {meta['devices']} when step {start} was saved: the data order is "
                     "unchanged (a batch depends only on seed and step), but gradients are summed in another "
                     "order, so numbers agree with an uninterrupted run to float rounding, not bit for bit")
    return notes


def prepare(cfg: TrainConfig) -> Run:
    """Check and build everything a run needs. Writes nothing, except that a continued run takes its
    lock and moves aside checkpoints it must not continue from (damaged, or newer than --restore-step)."""
    resuming = cfg.restore_checkpoint or cfg.restore_step is not None
    exp = _open_experiment(cfg, resuming)
    try:
        saved = exp.read_config() if resuming else None
        corpus, fingerprint, vocab = _load_data(cfg, exp, saved)
        run_cfg = _resolve(cfg, saved, exp, corpus, vocab)
        parallel.check_batch(run_cfg.batch_size)
        model = PaLM(run_cfg.model)
        tx, schedule, decayed = make_optimizer(run_cfg.optim, run_cfg.max_steps,
                                               jax.eval_shape(partial(init_params, model, run_cfg)))
        make_state = partial(init_state, model, tx, run_cfg)
        notes = []
        if resuming:
            # Only process 0 moves damaged or superseded checkpoints; the others just read.
            main = jax.process_index() == 0
            state, meta, _ = exp.restore(jax.eval_shape(make_state), cfg.restore_step, read_only=not main)
            if cfg.restore_step is not None and main:
                exp.supersede_newer(cfg.restore_step)
            notes = _resume_notes(run_cfg, saved, state, meta)
        else:
            # Wait on every leaf: reading one output (the step) of a computation whose other output could
            # not be allocated hangs forever on the CPU backend, while waiting on that output raises
            # RESOURCE_EXHAUSTED (jax 0.10).
            state = jax.block_until_ready(jax.jit(make_state)())
        start = int(state.step)
        if start >= run_cfg.max_steps:
            raise UserError(f"{exp.path} is at step {start}, and --max-steps is {run_cfg.max_steps}: nothing to "
                            f"train; pass a larger --max-steps to continue")
        return Run(run_cfg, exp, corpus, fingerprint, vocab, model, tx, schedule, decayed, state, start, saved, notes)
    except BaseException:
        exp.lock.release(started=False)
        raise


def _agree(run: Run) -> None:
    """Every process must run the same settings on the same corpus from the same step (a mismatch would
    hang in the first all-reduce, or silently train a different model on each)."""
    mine = {"config": config_lib.to_dict(run.cfg), "corpus_sha256": run.fingerprint["sha256"], "start": run.start}
    for pid, payload in parallel.agree("settings", json.dumps(mine), run.cfg.distributed_timeout):
        theirs = json.loads(payload)
        diffs = [f"{path}: {a!r} here vs {b!r} on process {pid}" for path, a, b in config_lib.differences(
            run.cfg, config_lib.from_dict(TrainConfig, theirs["config"]))]
        diffs += [f"{k}: {mine[k]!r} here vs {theirs[k]!r} on process {pid}" for k in ("corpus_sha256", "start")
                  if mine[k] != theirs[k]]
        if diffs:
            raise UserError(f"process {jax.process_index()} and process {pid} were started with different settings "
                            f"({'; '.join(diffs[:6])}); start every process with the same arguments")


def _record_start(run: Run) -> None:
    """Process 0 writes the experiment's records: config.json (current settings), one history line."""
    exp, cfg = run.exp, run.cfg
    if run.saved is None:
        exp.create(shlex.join(sys.argv))
        cfg = run.cfg = dataclasses.replace(cfg, experiment_name=exp.name)  # a default name may have moved on
        exp.write_corpus(run.fingerprint)
        exp.write_vocab(run.vocab)
    changed = {path: [a, b] for path, a, b in config_lib.differences(run.saved, cfg)} if run.saved else {}
    exp.write_config(cfg)
    exp.append_history({
        "event": "resume" if run.saved else "new", "time": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "step": run.start,
        "host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.argv),
        "devices": jax.device_count(), "processes": jax.process_count(), "changed": changed,
        "config": config_lib.to_dict(cfg),
    })


def _announce(run: Run) -> None:
    cfg, n_dev = run.cfg, jax.device_count()
    print(f"devices: {n_dev} x {jax.devices()[0].platform} ({jax.process_count()} process(es)); global batch "
          f"{cfg.batch_size} = {cfg.batch_size // n_dev} per device x {n_dev}; "
          f"{cfg.batch_size * cfg.model.seq_len:,} tokens/step")
    print(f"model: {param_count(run.state.params):,} parameters (dim {cfg.model.dim}, depth {cfg.model.depth}, "
          f"heads {cfg.model.heads}x{cfg.model.dim_head}, seq_len {cfg.model.seq_len}, {cfg.model.dtype}); "
          f"vocab {run.vocab.kind} ({run.vocab.size})")
    c = run.corpus
    print(f"data: {c.path}: train {len(c.train):,} / val {len(c.val):,} / test {len(c.test):,} bytes")
    print(f"weight decay on {len(run.decayed)} kernels: {', '.join(run.decayed)}")
    for note in run.notes:
        print(note)
    start_note = f"restored from step {run.start}" if run.saved else "new"
    print(f"experiment: {run.exp.path} ({start_note}); steps {run.start} -> {cfg.max_steps}")


def train(cfg: TrainConfig) -> int:
    """Run (or continue) one experiment; returns the process exit code."""
    parallel.initialize_distributed(cfg.distributed_timeout)
    validate_train(cfg)
    run = prepare(cfg)
    is_main = jax.process_index() == 0
    try:
        _agree(run)
        if is_main:
            _record_start(run)
        parallel.barrier("experiment directory ready", cfg.distributed_timeout)
        if is_main:
            _announce(run)
        return Trainer(run).loop()
    except BaseException:
        if is_main and not run.stepped:
            run.exp.discard()  # removes only a directory this run created; puts the lock file back
        raise
    finally:
        run.exp.lock.release()


# --- the loop --------------------------------------------------------------------------------------

class Trainer:
    """The step loop and its periodic work (log, evaluate, save); metrics are read one step late."""

    def __init__(self, run: Run):
        self.run = run
        cfg = self.cfg = run.cfg
        self.exp = run.exp
        self.is_main = jax.process_index() == 0
        self.n_proc = jax.process_count()
        self.tokens_per_step = cfg.batch_size * cfg.model.seq_len
        self.local_batch = parallel.check_batch(cfg.batch_size)
        self.p_step = parallel.pmap(partial(train_step, model=run.model, tx=run.tx, schedule=run.schedule,
                                            z_loss=cfg.model.z_loss), donate_state=True)
        self.p_eval = evaluate.make_eval_step(run.model)
        vocab, val = run.vocab, run.corpus.val
        self.val_tokens = np.concatenate([
            vocab.encode(data.get_batch(val, cfg.seed, i, cfg.batch_size, cfg.model.seq_len, jax.process_index(),
                                        self.n_proc, data.EVAL_STREAM))
            for i in range(cfg.eval_batches)
        ]) if cfg.eval_interval else None
        self.prompt = vocab.encode(np.frombuffer(data.default_prompt(val, cfg.seed), np.uint8))
        self.writer = TensorBoardWriter(self.exp.tb_dir) if self.is_main else None
        # A bar on a terminal; otherwise one line per --log-interval steps, which logs can be grepped for.
        self.bar_on = cfg.progress and self.is_main and sys.stdout.isatty()
        self.bar = tqdm(total=cfg.max_steps, initial=run.start, disable=not self.bar_on, dynamic_ncols=True)
        self.rstate = parallel.replicate(run.state)
        run.state = None  # the replicated copy is the only one from here on
        self.skipped_total = int(parallel.unreplicate(self.rstate.skipped))
        self.bad_in_row, self.last_saved, self.last_evaluated = 0, run.start, -1
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.stop_agreed, self.pending = False, None

    def say(self, line: str) -> None:
        if self.is_main:
            self.bar.write(line) if self.bar_on else print(line, flush=True)

    def loop(self) -> int:
        cfg, stop = self.cfg, _StopRequest()
        seq_len, final = cfg.model.seq_len, self.run.start
        try:
            with stop:
                for step in range(self.run.start, cfg.max_steps):
                    batch = data.get_batch(self.run.corpus.train, cfg.seed, step, cfg.batch_size, seq_len,
                                           jax.process_index(), self.n_proc)
                    asked = np.full(jax.local_device_count(), stop.signum is not None)
                    self.rstate, metrics = self.p_step(self.rstate, parallel.shard(self.run.vocab.encode(batch)),
                                                       asked)
                    # Exactly one step in flight: read the previous step's metrics only after dispatching
                    # this one. Free-running dispatch hangs XLA's CPU all-reduce (DESIGN.md).
                    self.drain()
                    self.pending = (step + 1, metrics)
                    done = step + 1
                    if cfg.eval_interval and done % cfg.eval_interval == 0:
                        self.drain()
                        self.evaluate(done)
                    if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps or self.stop_agreed:
                        self.drain()
                        self.save(done)
                    if self.stop_agreed:
                        break
                self.drain()
                final = int(parallel.unreplicate(self.rstate.step))
                if cfg.eval_interval and self.last_evaluated != final and not self.stop_agreed:
                    self.evaluate(final)
                self.finish_saves()
        finally:
            self.bar.close()
            with contextlib.suppress(Exception):  # after a failed save orbax raises its error again here
                self.exp.close()
            if self.writer:
                with contextlib.suppress(Exception):
                    self.writer.close()
        return self.report(stop, final)

    def drain(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.step_done(*pending)

    def step_done(self, step: int, metrics) -> None:
        """Host-side bookkeeping for a finished step (read one step late, see the loop)."""
        cfg = self.cfg
        m = {k: v[0].item() for k, v in jax.device_get(metrics).items()}
        self.run.stepped = True
        self.stop_agreed = self.stop_agreed or m["stop"]
        self.window_steps += 1
        self.bad_in_row = 0 if m["finite"] else self.bad_in_row + 1
        self.skipped_total += not m["finite"]
        give_up = self.bad_in_row >= cfg.max_nonfinite_steps
        if not m["finite"]:
            warn(f"step {step}: non-finite loss, gradient or update (loss {m['loss']}, grad norm {m['grad_norm']}); "
                 f"update skipped ({self.bad_in_row} in a row)")
        self.bar.update(1)
        # The step that ends the run is logged too, so the curves show the skips that stopped it.
        if step % cfg.log_interval == 0 or step == cfg.max_steps or give_up:
            self.log(step, m)
        if give_up:
            saved = (f"checkpoint step {self.last_saved} in {self.exp.checkpoint_dir} holds the last good parameters"
                     if self.last_saved else f"no checkpoint had been saved yet in {self.exp.checkpoint_dir}")
            raise TrainingStopped(
                f"{self.bad_in_row} consecutive steps had a non-finite loss, gradient or update (last at step {step});"
                f" stopped. Skipped steps never change the parameters: {saved}. Try a lower --optim.learning-rate or "
                "--model.dtype float32, then resume with --restore-checkpoint"
            )

    def log(self, step: int, m: dict) -> None:
        elapsed = time.perf_counter() - self.window_start
        tok_s = self.window_steps * self.tokens_per_step / max(elapsed, 1e-9)
        ms = 1e3 * elapsed / max(self.window_steps, 1)
        if self.bar_on:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
        else:
            skipped = f", {self.skipped_total} skipped" if self.skipped_total else ""
            self.say(f"step {step}/{self.cfg.max_steps}: loss {m['loss']:.4f}, lr {m['lr']:.3e}, "
                     f"{tok_s:,.0f} tokens/s, {ms:.1f} ms/step{skipped}")
        if self.writer:
            self.writer.scalars(step, {
                "train/loss": m["loss"], "train/bpc": m["bpc"], "train/z_loss": m["z_loss"],
                "train/learning_rate": m["lr"], "train/grad_norm": m["grad_norm"],
                "train/tokens_per_second": tok_s, "train/skipped_steps": self.skipped_total,
                "train/tokens_seen": step * self.tokens_per_step,
            })
        self.window_start, self.window_steps = time.perf_counter(), 0

    def evaluate(self, step: int) -> None:
        began = time.perf_counter()
        self.last_evaluated = step
        rparams = self.rstate.params
        result = evaluate.score(self.p_eval, rparams, self.val_tokens,
                                np.ones(self.val_tokens[:, 1:].shape, np.float32), self.local_batch)
        if self.writer:
            self.writer.scalars(step, {"val/loss": result["loss"], "val/bpc": result["bpc"]})
            if self.cfg.sample_length:
                ids = sampling.generate(parallel.unreplicate(rparams), self.cfg.model, self.prompt,
                                        self.cfg.sample_length, jax.random.PRNGKey(step), temperature=0.8)
                vocab = self.run.vocab
                text = (vocab.decode(self.prompt) + vocab.decode(ids[0])).decode("utf-8", errors="replace")
                self.writer.text(step, "samples/val_prompt", "    " + text.replace("\n", "\n    "))
            self.writer.flush()
        self.say(f"step {step}: val loss {result['loss']:.4f}, val bpc {result['bpc']:.4f}")
        self.window_start += time.perf_counter() - began  # tokens/s counts training time only

    def save(self, step: int) -> None:
        """Start an asynchronous save of this step, after the previous one has finished (so that a
        failure is blamed on the step that failed)."""
        began = time.perf_counter()
        self.finish_saves()
        meta = {"step": step, "seed": self.cfg.seed, "tokens_seen": step * self.tokens_per_step,
                "devices": jax.device_count(), "processes": self.n_proc}
        with self.stopping_on_a_full_disk(step):
            self.exp.save(step, parallel.unreplicate(self.rstate), meta)
        self.last_saved = step
        if self.writer:  # a killed run's curves then reach at least its last checkpoint
            with self.stopping_on_a_full_disk(step):
                self.writer.flush()
        self.window_start += time.perf_counter() - began

    def finish_saves(self) -> None:
        with self.stopping_on_a_full_disk(self.last_saved):
            self.exp.wait()

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
                f"last complete checkpoint is {last}. Free some space, then resume with: {resume_command(self.cfg)}"
            ) from None

    def report(self, stop: _StopRequest, final: int) -> int:
        if self.stop_agreed:
            if self.is_main:
                by = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
                print(f"stopped by {by} at step {final}; checkpoint saved in {self.exp.checkpoint_dir}. Resume "
                      f"with:\n  {resume_command(self.cfg)}", file=sys.stderr)
            return 128 + (stop.signum or signal.SIGTERM)
        if self.is_main:
            print(f"done: {final} steps; checkpoint step {self.last_saved} in {self.exp.checkpoint_dir}; "
                  f"evaluate with: {eval_command(self.cfg)}")
        return 0
