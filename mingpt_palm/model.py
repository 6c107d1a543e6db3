"""The PaLM decoder (Chowdhery et al., 2022) for character-level language modelling.

One block: a single bias-free LayerNorm feeds, in parallel, multi-query attention and a SwiGLU
feed-forward; both come out of one fused input projection and are added back to the residual.
Rotary position embeddings on queries and keys, no biases anywhere, an input embedding tied to
the output head with logits scaled by 1/sqrt(dim), and a z-loss on the log-partition function.

The same code path serves training (a whole window at once) and cached generation: attention
always looks keys up by their absolute position, so a key/value cache is just another source of
keys. Inputs may carry any number of leading batch dimensions.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mingpt_palm.config import ModelConfig

# Fan-in (LeCun) init for every projection: variance 1/fan_in keeps activations O(1) at any width.
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# PaLM initialises the embedding with unit variance: no norm sits between it and the first block,
# and the tied head divides logits by sqrt(dim) instead.
embed_init = nn.initializers.normal(stddev=1.0)


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate pairs of features (rotate-half layout) of x [..., T, H, D] by angles pos * freq."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, half]
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]  # broadcast over heads
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def init_cache(cfg: ModelConfig, batch_shape: tuple[int, ...], dtype=jnp.float32) -> dict:
    """An empty key/value cache holding seq_len positions.

    Multi-query attention stores one key and one value head per layer, so the cache is
    2 * depth * seq_len * dim_head numbers per sequence, `heads` times smaller than multi-head.
    Slot i holds position `pos[i]` (-1 = empty); positions are written at slot pos % seq_len,
    so generation past seq_len overwrites the oldest position (a sliding window).
    """
    shape = (*batch_shape, cfg.seq_len, cfg.dim_head)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.depth)]
    return {"pos": jnp.full((cfg.seq_len,), -1, jnp.int32), "layers": layers}


class ParallelBlock(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_positions, cache=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        h = nn.LayerNorm(use_bias=False, dtype=jnp.float32, name="norm")(x)
        ff_inner = cfg.ff_mult * cfg.dim
        q_width = cfg.heads * cfg.dim_head
        fused = nn.Dense(
            q_width + 2 * cfg.dim_head + 2 * ff_inner,
            use_bias=False,
            kernel_init=dense_init,
            dtype=dtype,
            name="fused_proj",
        )(h)
        q, k, v, gate, up = jnp.split(
            fused,
            [q_width, q_width + cfg.dim_head, q_width + 2 * cfg.dim_head, q_width + 2 * cfg.dim_head + ff_inner],
            axis=-1,
        )
        q = q.reshape(*q.shape[:-1], cfg.heads, cfg.dim_head)
        q = rotary(q, positions)
        k = rotary(k[..., None, :], positions)[..., 0, :]

        new_cache = None
        if cache is not None:
            # Write this call's keys/values at their slots, then attend over the whole cache.
            slots = positions % cfg.seq_len
            k = cache["k"].at[..., slots, :].set(k.astype(cache["k"].dtype))
            v = cache["v"].at[..., slots, :].set(v.astype(cache["v"].dtype))
            new_cache = {"k": k, "v": v}

        # Causal, and never further back than seq_len - 1: the widest context seen in training.
        delta = positions[:, None] - key_positions[None, :]
        allowed = (key_positions[None, :] >= 0) & (delta >= 0) & (delta < cfg.seq_len)
        scores = jnp.einsum("...thd,...sd->...hts", q, k.astype(dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(cfg.dim_head)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attn = jnp.einsum("...hts,...sd->...thd", weights, v.astype(dtype))
        attn = attn.reshape(*attn.shape[:-2], q_width)

        attn_out = nn.Dense(cfg.dim, use_bias=False, kernel_init=dense_init, dtype=dtype, name="attn_out")(attn)
        ff_out = nn.Dense(cfg.dim, use_bias=False, kernel_init=dense_init, dtype=dtype, name="ff_out")(
            nn.swish(gate) * up
        )
        return x + (attn_out + ff_out).astype(x.dtype), new_cache


class PaLM(nn.Module):
    """tokens [..., T] -> logits [..., T, num_tokens] (float32), updated cache (or None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None):
        cfg = self.cfg
        if positions is None:
            positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
        embed = nn.Embed(cfg.num_tokens, cfg.dim, embedding_init=embed_init, name="embed")
        x = embed(tokens).astype(jnp.float32)

        if cache is None:
            key_positions, new_cache = positions, None
        else:
            key_positions = cache["pos"].at[positions % cfg.seq_len].set(positions)
            new_cache = {"pos": key_positions, "layers": []}
        for i in range(cfg.depth):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = ParallelBlock(cfg, name=f"block_{i}")(x, positions, key_positions, layer_cache)
            if cache is not None:
                new_cache["layers"].append(layer_cache)

        x = nn.LayerNorm(use_bias=False, dtype=jnp.float32, name="final_norm")(x)
        logits = embed.attend(x) / math.sqrt(cfg.dim)
        return logits.astype(jnp.float32), new_cache


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


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
