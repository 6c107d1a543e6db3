"""The loss: next-token cross-entropy and PaLM's z-loss, one definition shared by training and scoring."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
    """Per-position negative log-likelihood of `targets`, and logsumexp(logits) (the z-loss needs it).

    The one definition of the loss that training (cross_entropy) and scoring (evaluate) share.
    Returns (nll [...], lse [...]) for logits [..., V] and integer targets [...].
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, lse


def cross_entropy(logits, targets, z_loss: float, weights=None):
    """Mean next-token loss over weighted positions.

    Returns (loss to minimise = cross-entropy + z-loss, metrics). `weights` (0/1) masks padding;
    the metrics also carry the summed loss and count, so callers can aggregate exactly.
    """
    nll, lse = token_nll(logits, targets)
    if weights is None:
        weights = jnp.ones_like(nll)
    count = jnp.sum(weights)
    nll_sum = jnp.sum(nll * weights)
    ce = nll_sum / jnp.maximum(count, 1.0)
    z = z_loss * jnp.sum(lse**2 * weights) / jnp.maximum(count, 1.0)
    metrics = {"loss": ce, "z_loss": z, "bpc": ce / math.log(2), "nll_sum": nll_sum, "count": count}
    return ce + z, metrics
