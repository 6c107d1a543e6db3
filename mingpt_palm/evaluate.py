"""Exact scoring: summed negative log-likelihood over windows, spread over local devices."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mingpt_palm import parallel
from mingpt_palm.model import PaLM, token_nll


def make_eval_step(model: PaLM):
    """pmapped (params, tokens [D, B, L+1], weights [D, B, L]) -> per-window summed NLL [D, B].

    Per-window sums (not a psum) come back to the host, which adds them in window order in
    float64: the total then does not depend on how windows were spread over devices.
    """

    def eval_step(params, tokens, weights):
        logits, _ = model.apply({"params": params}, tokens[..., :-1])
        nll, _ = token_nll(logits, tokens[..., 1:])  # the training loss's own code, not a copy
        return jnp.sum(nll * weights, axis=-1)

    return parallel.pmap(eval_step)


def score(p_eval, rparams, tokens: np.ndarray, weights: np.ndarray, batch_size: int) -> dict:
    """Score windows tokens [W, L+1] (int ids) with weights [W, L]; batches of batch_size windows.

    Returns loss (nats per scored token), bpc and the number of tokens scored, over the windows
    of all processes (each process passes its own).
    """
    n = len(tokens)
    padded = -(-n // batch_size) * batch_size
    if padded != n:  # pad with zero-weight windows so every batch has one shape (one compilation)
        tokens = np.concatenate([tokens, np.zeros((padded - n, tokens.shape[1]), tokens.dtype)])
        weights = np.concatenate([weights, np.zeros((padded - n, weights.shape[1]), weights.dtype)])
    sums = []
    for start in range(0, padded, batch_size):
        out = p_eval(rparams, parallel.shard(tokens[start : start + batch_size]),
                     parallel.shard(weights[start : start + batch_size]))
        sums.append(parallel.fetch(out).astype(np.float64).reshape(-1))  # Ctrl-C is noticed between batches too
    # Each process scored its own windows: add the totals of all of them.
    total, count = parallel.sum_over_processes(np.array([np.sum(np.concatenate(sums)[:n]), np.sum(weights[:n])]))
    count = int(count)
    loss = total / max(count, 1)
    return {"loss": loss, "bpc": loss / math.log(2), "tokens": count}
