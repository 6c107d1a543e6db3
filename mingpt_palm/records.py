"""What a starting run declares, once start.py has built it: to the other processes of its job (`agree`:
the same settings, corpus, vocabulary and step everywhere), to its experiment (`record_new` before the
first step of a new one, `record_continued` once the first step of a continued one has run), and to its
user (`announce`: the start-up lines).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import socket
import sys
from datetime import datetime

import jax

from mingpt_palm import distributed, settings
from mingpt_palm.config import position_scheme
from mingpt_palm.errors import UserError
from mingpt_palm.model import attention_implementation, compute_dtype, param_count
from mingpt_palm.optim import not_decayed
from mingpt_palm.start import Run


def agree(run: Run) -> None:
    """Every process must run the same settings on the same corpus from the same step (a mismatch would
    hang in the first all-reduce, or silently train a different model on each)."""
    mine = {"config": settings.to_json(run.cfg), "corpus_sha256": run.fingerprint["sha256"], "start": run.start,
            "tokenizer": run.vocab.fingerprint(), "mode": run.mode}
    for pid, payload in distributed.agree("settings", json.dumps(mine), run.cfg.distributed_timeout):
        theirs = json.loads(payload)
        diffs = [f"{path}: {a!r} here vs {b!r} on process {pid}"
                 for path, a, b in settings.differences(run.cfg, settings.from_json(theirs["config"]))]
        diffs += [f"{k}: {mine[k]!r} here vs {theirs[k]!r} on process {pid}"
                  for k in ("corpus_sha256", "start", "tokenizer", "mode") if mine[k] != theirs[k]]
        if diffs:
            raise UserError(f"process {jax.process_index()} and process {pid} were started with different settings "
                            f"({'; '.join(diffs[:6])}); start every process with the same arguments")


def _history(run: Run, event: str, **extra) -> dict:
    # What the run computes or how it is run; not how it is displayed (--no-progress applies to one run).
    changed = {path: [a, b] for path, a, b in settings.differences(run.recorded, run.cfg)
               if path != "progress"} if run.recorded else {}
    return {"event": event, "time": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "step": run.start,
            "host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.argv),
            "devices": jax.device_count(), "processes": jax.process_count(), "changed": changed, **extra,
            "config": settings.to_json(run.cfg)}


def record_new(run: Run) -> Run:
    """Process 0, before the first step of a new experiment: its directory and records (a run that fails
    before its first step removes it again, so that the same command can run again)."""
    exp = run.exp
    exp.create(shlex.join(sys.argv))
    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, experiment_name=exp.name))  # a suffix ("-2")
    exp.write_corpus(run.fingerprint)
    exp.write_vocab(run.vocab)
    for raw, ids in run.splits.to_cache:
        exp.write_tokens(run.vocab, raw, ids)
    exp.write_config(run.cfg)
    exp.append_history(_history(run, "new", **({"init_from": run.init} if run.init else {})))
    return run


def record_continued(run: Run) -> None:
    """Process 0, once the first step of a resumed or restarted run has run: only now does the run change its
    experiment (moves checkpoints aside, replaces the logs of an attempt started over, writes config.json and
    a history record), so that a refused or failed start leaves it as it was."""
    exp = run.exp
    exp.lock.record(shlex.join(sys.argv))
    moved = exp.set_aside(run.set_aside.get("damaged", []), run.set_aside.get("superseded", []))
    if run.mode == "restart":
        shutil.rmtree(exp.tb_dir, ignore_errors=True)
    for raw, ids in run.splits.to_cache:
        exp.write_tokens(run.vocab, raw, ids)
    exp.write_config(run.cfg)
    exp.append_history(_history(run, run.mode, **({"moved": moved} if moved else {})))


def announce(run: Run) -> None:
    cfg, n_dev, k, m = run.cfg, jax.device_count(), run.cfg.grad_accum_steps, run.cfg.model
    split = (f"{cfg.batch_size // n_dev} per device x {n_dev}" if k == 1 else
             f"{k} micro-batches of {cfg.batch_size // n_dev // k} per device x {n_dev} devices, accumulated")
    print(f"devices: {n_dev} x {jax.devices()[0].platform} ({jax.process_count()} process(es)); global batch "
          f"{cfg.batch_size} = {split}; {cfg.batch_size * m.seq_len:,} tokens/step; --parallel {cfg.parallel} "
          f"({'state sharded over the devices' if cfg.parallel == 'fsdp' else 'state replicated on each device'})")
    why = (" (training computes dropped-out weights itself: no fused kernel drops them)" if m.dropout else
           " (score bias: cuDNN's bias path is opt-in, --model.attention cudnn)"
           if position_scheme(m) in ("alibi", "t5") and m.attention == "auto" and jax.default_backend() == "gpu" else "")
    print(f"model: {m.variant}, {param_count(run.state.params):,} parameters (dim {m.dim}, depth {m.depth}, heads "
          f"{m.heads}x{m.dim_head}, seq_len {m.seq_len}, {position_scheme(m)} positions"
          f"{f', dropout {m.dropout}' if m.dropout else ''}); compute {compute_dtype(m).name}, attention "
          f"{attention_implementation(m)}{why}, remat {m.remat}; vocab {run.vocab.kind} ({run.vocab.size})")
    c = run.corpus
    print(f"data: {c.path}: train {len(c.train):,} / val {len(c.val):,} / test {len(c.test):,} bytes")
    if line := run.vocab.describe(len(run.splits.train), len(c.train)):
        print(line)
    print(f"weight decay on {len(run.built.decayed)} kernels: {', '.join(run.built.decayed)}")
    kept = not_decayed(run.state.params)
    print(f"no weight decay on {len(kept)} biases, norm scales, embeddings and position tables: {', '.join(kept)}")
    for note in run.notes:
        print(note)
    begun = {"new": "new", "finetune": "new", "restart": "started over"}.get(run.mode, f"restored from step {run.start}")
    print(f"experiment: {run.exp.path} ({begun}); steps {run.start} -> {cfg.max_steps}")
