"""The training loop: build -> maybe restore -> step -> log -> eval -> checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
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

from mingpt_palm import data, evaluate, parallel, sampling
from mingpt_palm.config import TrainConfig, UserError, to_dict, validate_train
from mingpt_palm.experiment import Experiment, TensorBoardWriter, warn
from mingpt_palm.model import PaLM, cross_entropy, param_count
from mingpt_palm.optim import make_optimizer


class TrainingStopped(Exception):
    """The run cannot continue (e.g. too many non-finite steps); exit code 1."""


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
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
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


def init_params(model, cfg: TrainConfig):
    return model.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, cfg.model.seq_len), jnp.int32))["params"]


def init_state(model, tx, cfg: TrainConfig) -> TrainState:
    params = init_params(model, cfg)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0))


def config_differences(saved, given, prefix: str) -> list[str]:
    a, b = to_dict(saved), to_dict(given)
    return [f"{prefix}.{k}: {a[k]!r} saved vs {b[k]!r} given" for k in a if a[k] != b.get(k)]


def resume_command(name: str) -> str:
    """The command line that continues this run: the user's arguments plus the restore flags."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--experiment-name", "--experiment_name"):
            skip = True
        elif not a.startswith(("--experiment-name=", "--experiment_name=", "--restore-checkpoint")):
            args.append(a)
    return shlex.join(["python", "train_char.py", *args, "--experiment-name", name, "--restore-checkpoint"])


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


def train(cfg: TrainConfig) -> int:
    """Run (or continue) one experiment; returns the process exit code."""
    parallel.initialize_distributed()
    validate_train(cfg)
    is_main = jax.process_index() == 0
    name = cfg.experiment_name
    if name is None:
        if cfg.restore_checkpoint:
            raise UserError("--restore-checkpoint needs --experiment-name (which experiment to continue)")
        if jax.process_count() > 1:  # each process would stamp its own time
            raise UserError("a multi-process run needs --experiment-name (the same on every process)")
        name = f"{Path(cfg.dataset_path).stem}_{datetime.now():%Y-%m-%d-%H%M%S}"
    exp = Experiment(cfg.experiments_dir, name, keep=cfg.keep_checkpoints)
    if cfg.restore_checkpoint:
        exp.check_existing()
        if not exp.checkpoint_steps():
            raise UserError(f"--restore-checkpoint: {exp.checkpoint_dir} holds no checkpoint to continue from "
                            f"(the run stopped before its first save); delete {exp.path} to start it over")
    else:
        exp.check_new()
    parallel.sync("experiment directory checked")  # before process 0 creates it

    corpus = data.load_corpus(cfg.dataset_path, cfg.data, progress=cfg.progress and is_main)
    seq_len = cfg.model.seq_len
    data.require_windows(corpus.train, "train", seq_len, corpus.path)
    if cfg.eval_interval:
        data.require_windows(corpus.val, "val", seq_len, corpus.path)
    vocab = data.Vocab.load(exp.vocab_path) if cfg.restore_checkpoint else data.Vocab.build(cfg.data.vocab, corpus.train)
    local_batch = parallel.check_batch(cfg.batch_size)
    max_steps = cfg.max_steps
    if cfg.max_epochs is not None:
        max_steps = max(1, math.ceil(cfg.max_epochs * len(corpus.train) / seq_len / cfg.batch_size))
    # A file path is stored absolute so that eval_char.py finds the corpus from any directory.
    dataset = cfg.dataset_path if corpus.registered else str(corpus.path.resolve())
    cfg = dataclasses.replace(cfg, experiment_name=name, max_steps=max_steps, dataset_path=dataset,
                              model=dataclasses.replace(cfg.model, num_tokens=vocab.size))
    if cfg.restore_checkpoint:
        saved = exp.read_config()
        diffs = config_differences(saved.model, cfg.model, "model")
        if saved.data.vocab != cfg.data.vocab:
            diffs.append(f"data.vocab: {saved.data.vocab!r} saved vs {cfg.data.vocab!r} given")
        if diffs:
            raise UserError(f"cannot restore {exp.path}: the model differs from the saved one ({'; '.join(diffs)})")

    model = PaLM(cfg.model)
    tx, schedule, decayed = make_optimizer(cfg.optim, max_steps, jax.eval_shape(partial(init_params, model, cfg)))
    make_state = partial(init_state, model, tx, cfg)
    if cfg.restore_checkpoint:
        state, _, restored_step = exp.restore(jax.eval_shape(make_state))
        start_note = f"restored from step {restored_step}"
    else:
        state = jax.jit(make_state)()
        if is_main:
            exp.write_config(cfg)
            vocab.save(exp.vocab_path)
        start_note = "new"
    if cfg.restore_checkpoint and is_main:
        exp.write_config(cfg)  # the model is identical; step counts and intervals may have changed
    start = int(state.step)

    n_dev, n_proc = jax.device_count(), jax.process_count()
    tokens_per_step = cfg.batch_size * seq_len
    if is_main:
        print(f"devices: {n_dev} x {jax.devices()[0].platform} ({n_proc} process(es)); global batch "
              f"{cfg.batch_size} = {cfg.batch_size // n_dev} per device x {n_dev}; {tokens_per_step:,} tokens/step")
        print(f"model: {param_count(state.params):,} parameters (dim {cfg.model.dim}, depth {cfg.model.depth}, "
              f"heads {cfg.model.heads}x{cfg.model.dim_head}, seq_len {seq_len}, {cfg.model.dtype}); "
              f"vocab {vocab.kind} ({vocab.size})")
        print(f"data: {corpus.path}: train {len(corpus.train):,} / val {len(corpus.val):,} / "
              f"test {len(corpus.test):,} bytes")
        print(f"weight decay on {len(decayed)} kernels: {', '.join(decayed)}")
        print(f"experiment: {exp.path} ({start_note}); steps {start} -> {max_steps}")

    p_step = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=cfg.model.z_loss),
                           donate_state=True)
    p_eval = evaluate.make_eval_step(model)
    val_tokens = np.concatenate([
        vocab.encode(data.get_batch(corpus.val, cfg.seed, i, cfg.batch_size, seq_len, jax.process_index(),
                                    n_proc, data.EVAL_STREAM))
        for i in range(cfg.eval_batches)
    ]) if cfg.eval_interval else None
    prompt = vocab.encode(np.frombuffer(data.default_prompt(corpus.val, cfg.seed), np.uint8))

    writer = TensorBoardWriter(exp.tb_dir) if is_main else None
    rstate = parallel.replicate(state)
    del state
    bar = tqdm(total=max_steps, initial=start, disable=not (cfg.progress and is_main), dynamic_ncols=True)
    bad_in_row, last_saved, last_evaluated = 0, start, -1
    window_start, window_steps = time.perf_counter(), 0

    def run_eval(step: int) -> None:
        nonlocal last_evaluated, window_start
        last_evaluated = step
        began = time.perf_counter()
        rparams = rstate.params
        result = evaluate.score(p_eval, rparams, val_tokens, np.ones(val_tokens[:, 1:].shape, np.float32),
                                local_batch)
        if writer:
            writer.scalars(step, {"val/loss": result["loss"], "val/bpc": result["bpc"]})
            if cfg.sample_length:
                ids = sampling.generate(parallel.unreplicate(rparams), cfg.model, prompt, cfg.sample_length,
                                        jax.random.PRNGKey(step), temperature=0.8)
                text = (vocab.decode(prompt) + vocab.decode(ids[0])).decode("utf-8", errors="replace")
                writer.text(step, "samples/val_prompt", "    " + text.replace("\n", "\n    "))
            writer.flush()
        bar.write(f"step {step}: val loss {result['loss']:.4f}, val bpc {result['bpc']:.4f}")
        window_start += time.perf_counter() - began  # tokens/s counts training time only

    def handle(step: int, metrics) -> None:
        """Host-side bookkeeping for a finished step (read one step late, see the loop)."""
        nonlocal bad_in_row, skipped_total, window_start, window_steps, stop_agreed
        m = {k: v[0].item() for k, v in jax.device_get(metrics).items()}
        stop_agreed = stop_agreed or m["stop"]
        window_steps += 1
        bad_in_row = 0 if m["finite"] else bad_in_row + 1
        skipped_total += not m["finite"]
        give_up = bad_in_row >= cfg.max_nonfinite_steps
        if not m["finite"]:
            warn(f"step {step}: non-finite loss or gradient (loss {m['loss']}, grad norm {m['grad_norm']}); "
                 f"update skipped ({bad_in_row} in a row)")
        bar.update(1)
        # The step that ends the run is logged too, so the curves show the skips that stopped it.
        if step % cfg.log_interval == 0 or step == max_steps or give_up:
            elapsed = time.perf_counter() - window_start
            tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
            if writer:
                writer.scalars(step, {
                    "train/loss": m["loss"], "train/bpc": m["bpc"], "train/z_loss": m["z_loss"],
                    "train/learning_rate": m["lr"], "train/grad_norm": m["grad_norm"],
                    "train/tokens_per_second": tok_s, "train/skipped_steps": skipped_total,
                })
            window_start, window_steps = time.perf_counter(), 0
        if give_up:
            saved = (f"checkpoint step {last_saved} in {exp.checkpoint_dir} holds the last good parameters"
                     if last_saved else f"no checkpoint had been saved yet in {exp.checkpoint_dir}")
            raise TrainingStopped(
                f"{bad_in_row} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                f"stopped. Skipped steps never change the parameters: {saved}. Try a lower "
                "--optim.learning-rate or --model.dtype float32, then resume with --restore-checkpoint"
            )

    skipped_total = int(parallel.unreplicate(rstate.skipped))
    stop_agreed = False
    pending = None  # (step, metrics) dispatched but not yet read on the host

    def drain() -> None:
        nonlocal pending
        if pending is not None:
            handle(*pending)
            pending = None
    stop = _StopRequest()
    try:
        with stop:
            for step in range(start, max_steps):
                batch = data.get_batch(corpus.train, cfg.seed, step, cfg.batch_size, seq_len,
                                       jax.process_index(), n_proc)
                asked = np.full(jax.local_device_count(), stop.signum is not None)
                rstate, metrics = p_step(rstate, parallel.shard(vocab.encode(batch)), asked)
                # Exactly one step in flight: read the previous step's metrics only after dispatching
                # this one. Free-running dispatch hangs XLA's CPU all-reduce (DESIGN.md).
                drain()
                pending = (step + 1, metrics)
                done = step + 1
                if cfg.eval_interval and done % cfg.eval_interval == 0:
                    drain()
                    run_eval(done)
                if done % cfg.checkpoint_interval == 0 or done == max_steps or stop_agreed:
                    drain()
                    exp.save(done, parallel.unreplicate(rstate), {"step": done, "seed": cfg.seed,
                                                                 "tokens_seen": done * tokens_per_step})
                    last_saved = done
                    if writer:  # a killed run's curves then reach at least its last checkpoint
                        writer.flush()
                if stop_agreed:
                    break
            drain()
            final = int(parallel.unreplicate(rstate.step))
            if cfg.eval_interval and last_evaluated != final and not stop_agreed:
                run_eval(final)
            exp.wait()
    finally:
        bar.close()
        exp.close()
        if writer:
            writer.close()

    if stop_agreed:
        by = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
        print(f"stopped by {by} at step {final}; checkpoint saved in "
              f"{exp.checkpoint_dir}. Resume with:\n  {resume_command(name)}", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGTERM)
    if is_main:
        print(f"done: {final} steps; checkpoint step {last_saved} in {exp.checkpoint_dir}; "
              f"evaluate with: python eval_char.py --experiment-name {name}")
    return 0
