"""Exact scoring: summed negative log-likelihood over windows, spread over the devices as the layout says
(parallel.py: every local device under dp; the sharded parameters' mesh under fsdp)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm import data, distributed, parallel, sampling
from mingpt_palm.loss import token_nll


def make_eval_step(model, context: int | None = None, layout=parallel.DP):
    """(params, tokens, weights) -> per-window summed NLL, compiled by the layout (dp: pmapped over
    [D, B, ...]; fsdp: jitted over the global [B, ...]).

    `context`: passed to the model for windows longer than its seq_len, so that every query attends
    over its whole window rather than the training length's sliding window; None keeps the model's
    default (the same call as training's, for windows of at most seq_len).
    Per-window sums (not a psum) come back to the host, which adds them in window order in
    float64: the total then does not depend on how windows were spread over devices.
    """
    extra = {} if context is None else {"context": context}

    def eval_step(params, tokens, weights):
        logits, _ = model.apply({"params": params}, tokens[..., :-1], **extra)
        nll, _ = token_nll(logits, tokens[..., 1:])  # the training loss's own code, not a copy
        return jnp.sum(nll * weights, axis=-1)

    return layout.eval_step(eval_step)


def score(p_eval, rparams, tokens: np.ndarray, weights, batch_size: int, byte_lengths: np.ndarray | None = None,
          progress=None, layout=parallel.DP) -> dict:
    """Score windows tokens [W, L+1] (int ids) with 0/1 weights [W, L]; batches of batch_size windows.

    `weights` is an array or anything whose row slices are arrays (data.SpanWeights); only one batch
    of windows is materialised at a time, so tokens may be a strided view of a long split.
    `byte_lengths` [vocab]: the corpus bytes each token id stands for (None: one each). `progress`, if
    given, is called with the number of windows of each batch once it is scored.
    Returns loss (nats per scored token), bits_per_token, bits_per_byte (summed loss over the bytes
    the scored targets cover), tokens and bytes scored, over the windows of all
    processes (each process passes its own).
    """
    n = len(tokens)
    sums, count, nbytes = [], 0.0, 0
    for start in range(0, n, batch_size):
        t, w = tokens[start : start + batch_size], np.asarray(weights[start : start + batch_size], np.float32)
        count += float(np.sum(w, dtype=np.float64))
        nbytes += int(np.sum(byte_lengths[t[:, 1:]][w > 0], dtype=np.int64)) if byte_lengths is not None else 0
        if len(t) < batch_size:  # pad with zero-weight windows so every batch has one shape (one compilation)
            t = np.concatenate([t, np.zeros((batch_size - len(t), t.shape[1]), t.dtype)])
            w = np.concatenate([w, np.zeros((batch_size - len(w), w.shape[1]), w.dtype)])
        out = p_eval(rparams, *layout.eval_inputs(t, w))
        sums.append(layout.eval_rows(out).astype(np.float64))  # Ctrl-C is noticed between batches too
        if progress is not None:
            progress(min(batch_size, n - start))
    nbytes = nbytes if byte_lengths is not None else count
    # Each process scored its own windows: add the totals of all of them.
    total, count, nbytes = distributed.sum_over_processes(
        np.array([np.sum(np.concatenate(sums)[:n]) if sums else 0.0, count, nbytes], np.float64))
    loss = total / max(count, 1)
    bits_per_byte = total / max(nbytes, 1) / math.log(2)  # this order: today's bpc, to the bit, for bytes
    return {"loss": loss, "bits_per_token": loss / math.log(2), "bits_per_byte": bits_per_byte,
            "tokens": int(count), "bytes": int(nbytes)}


class Validation:
    """Training's periodic evaluation: the loss on fixed validation windows (the same at every evaluation,
    each process scoring its share), scored one micro-batch at a time (a device that fits training fits
    its evaluation), and a text sample into TensorBoard."""

    def __init__(self, run, micro_batch: int):
        cfg, vocab = run.cfg, run.vocab
        self.cfg, self.vocab, self.micro_batch, self.layout = cfg, vocab, micro_batch, run.layout
        self.p_eval = make_eval_step(run.built.model, layout=run.layout)
        self.tokens = np.concatenate([
            vocab.table[data.batch(run.splits.val, cfg.seed, i, cfg.batch_size, cfg.model.seq_len, data.EVAL_STREAM)]
            for i in range(cfg.eval_batches)])
        self.weights = np.ones(self.tokens[:, 1:].shape, np.float32)
        self.prompt = vocab.encode(np.frombuffer(data.default_prompt(run.corpus.val, cfg.seed), np.uint8))

    def __call__(self, rparams, step: int, log) -> None:
        result = score(self.p_eval, rparams, self.tokens, self.weights, self.micro_batch, self.vocab.byte_lengths,
                       layout=self.layout)
        # val/bpc is bits per byte for every vocabulary (for byte and char ids the same as per token).
        log.scalars(step, {"val/loss": result["loss"], "val/bpc": result["bits_per_byte"],
                           "val/bits_per_token": result["bits_per_token"]})
        # Sharded parameters: every process takes part in the sampling; only the main one writes it down.
        if self.cfg.sample_length and (log.writer or (self.layout.collective_sampling and jax.process_count() > 1)):
            ids = sampling.generate(self.layout.one_copy(rparams), self.cfg.model, self.prompt,
                                    self.cfg.sample_length, jax.random.PRNGKey(step), temperature=0.8)
            text = (self.vocab.decode(self.prompt) + self.vocab.decode(ids[0])).decode("utf-8", errors="replace")
            log.text(step, "samples/val_prompt", "    " + text.replace("\n", "\n    "))
        log.flush()
        per_token = (f" ({result['bits_per_token']:.4f} bits per token)"
                     if result["bits_per_token"] != result["bits_per_byte"] else "")
        log.say(f"step {step}: val loss {result['loss']:.4f}, val bpc {result['bits_per_byte']:.4f}{per_token}")
