"""The PaLM decoder (Chowdhery et al., 2022) for character-level language modelling.

One block: a single bias-free LayerNorm feeds, in parallel, multi-query attention and a SwiGLU
feed-forward; both come out of one fused input projection and are added back to the residual.
Rotary position embeddings on queries and keys, no biases anywhere, an input embedding tied to
the output head with logits scaled by 1/sqrt(dim), and a z-loss on the log-partition function.

The same code path serves training (a whole window at once) and cached generation: attention
always looks keys up by their absolute position, so a key/value cache is just another source of
keys. Inputs may carry any number of leading batch dimensions.

Mixed precision: matmuls and attention run in the compute dtype (`compute_dtype`: bfloat16 on GPUs
by default); parameters, the residual stream, norms, softmax and logits stay float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mingpt_palm.config import ModelConfig, UserError

# Fan-in (LeCun) init for every projection: variance 1/fan_in keeps activations O(1) at any width.
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# PaLM initialises the embedding with unit variance: no norm sits between it and the first block,
# and the tied head divides logits by sqrt(dim) instead.
embed_init = nn.initializers.normal(stddev=1.0)

REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype matmuls run in: `auto` is bfloat16 on GPUs (their tensor cores), float32 elsewhere
    (CPUs have no fast bfloat16 matmul and would only lose precision)."""
    if cfg.dtype == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    return jnp.dtype(cfg.dtype)


def attention_implementation(cfg: ModelConfig) -> str:
    """'cudnn' or 'xla' for the training/scoring forward pass; UserError for a cudnn request that
    cannot run here (cuDNN raises deep inside compilation otherwise)."""
    dtype = compute_dtype(cfg)
    why_not = None
    if jax.default_backend() != "gpu":
        why_not = f"it needs an NVIDIA GPU (this is {jax.default_backend()})"
    elif dtype not in (jnp.bfloat16, jnp.float16):
        why_not = f"it needs bfloat16 or float16 (compute dtype is {dtype.name}; pass --model.dtype bfloat16)"
    elif cfg.dim_head % 8 or cfg.dim_head > _cudnn_max_head():
        why_not = f"it needs --model.dim-head a multiple of 8 and at most {_cudnn_max_head()} on this GPU"
    if cfg.attention == "cudnn" and why_not:
        raise UserError(f"--model.attention cudnn cannot run here: {why_not}; use --model.attention xla or auto")
    if cfg.attention == "auto":
        return "xla" if why_not else "cudnn"
    return cfg.attention


def _cudnn_max_head() -> int:
    cc = getattr(jax.devices()[0], "compute_capability", "8.0")
    return 256 if float(cc) >= 9.0 else 128


def rotary_tables(positions: jax.Array, dim_head: int):
    """(cos, sin) [T, dim_head] for rotate-half rotary embeddings, computed once per forward pass."""
    half = dim_head // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, half]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotary(x: jax.Array, tables) -> jax.Array:
    """Rotate pairs of features (rotate-half layout) of x [..., T, H, D]: each half i is paired with
    i + D/2 and turned by angle position * freq_i.

    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is a signed permutation applied
    as a D x D matmul: exact (one nonzero per column), and on CPUs far cheaper than the concatenate
    that splitting and re-joining the halves costs in the forward and again in the backward pass.
    """
    cos, sin = tables[0][:, None, :], tables[1][:, None, :]  # broadcast over heads
    d = x.shape[-1]
    half = d // 2
    perm = jnp.zeros((d, d), jnp.float32)
    perm = perm.at[jnp.arange(half) + half, jnp.arange(half)].set(-1.0).at[jnp.arange(half), jnp.arange(half) + half].set(1.0)
    xf = x.astype(jnp.float32)
    rotated = jnp.matmul(xf, perm, precision=jax.lax.Precision.HIGHEST)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attend(q, k, v, positions, key_positions, seq_len: int, implementation: str, contiguous: bool):
    """Multi-query attention: q [..., T, H, D], one key/value head k, v [..., S, D] -> [..., T, H, D].

    A query attends to keys at positions p with 0 <= query - p < seq_len (causal, and never wider
    than the training context). `contiguous`: keys are the queries' own positions 0..T-1, so the
    mask is plain causal (with a sliding window past seq_len), which fused kernels compute without
    materialising it. Otherwise (a cache) the mask is built from the positions. The single key head
    is passed as K = 1: jax groups the query heads over it without copying it per head, and its
    XLA path accumulates scores and softmax in float32 whatever the compute dtype.
    """
    lead, (t, h, d), s = q.shape[:-3], q.shape[-3:], k.shape[-2]
    q4, k4, v4 = q.reshape(-1, t, h, d), k.reshape(-1, s, 1, d), v.reshape(-1, s, 1, d)
    if contiguous:
        window = (seq_len - 1, 0) if t > seq_len else None
        out = jax.nn.dot_product_attention(q4, k4, v4, is_causal=True, local_window_size=window,
                                           implementation=implementation if window is None else "xla")
    else:
        delta = positions[:, None] - key_positions[None, :]
        allowed = (key_positions[None, :] >= 0) & (delta >= 0) & (delta < seq_len)
        out = jax.nn.dot_product_attention(q4, k4, v4, mask=allowed[None, None], implementation="xla")
    return out.reshape(*lead, t, h, d)


def init_cache(cfg: ModelConfig, batch_shape: tuple[int, ...], dtype=None) -> dict:
    """An empty key/value cache holding seq_len positions, in the compute dtype by default.

    Multi-query attention stores one key and one value head per layer, so the cache is
    2 * depth * seq_len * dim_head numbers per sequence, `heads` times smaller than multi-head.
    Slot i holds position `pos[i]` (-1 = empty); positions are written at slot pos % seq_len,
    so generation past seq_len overwrites the oldest position (a sliding window).
    """
    dtype = compute_dtype(cfg) if dtype is None else dtype
    shape = (*batch_shape, cfg.seq_len, cfg.dim_head)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.depth)]
    return {"pos": jnp.full((cfg.seq_len,), -1, jnp.int32), "layers": layers}


class ParallelBlock(nn.Module):
    cfg: ModelConfig
    implementation: str = "xla"  # for the contiguous (training) case; see `attend`

    @nn.compact
    def __call__(self, x, positions, tables, key_positions, cache=None, contiguous=True):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        h = nn.LayerNorm(use_bias=False, dtype=jnp.float32, name="norm")(x)
        ff_inner = cfg.ff_mult * cfg.dim
        q_width = cfg.heads * cfg.dim_head
        # One fused kernel (PaLM's layout, and the checkpoint's), multiplied in two column slices:
        # slicing the [dim, width] weights instead of the [tokens, width] activations spares the
        # backward pass a concatenate of the whole activation gradient.
        kernel = self.param("fused_proj", lambda key, shape: {"kernel": dense_init(key, shape)},
                            (cfg.dim, q_width + 2 * cfg.dim_head + 2 * ff_inner))["kernel"]
        h = h.astype(dtype)
        qkv = h @ kernel[:, : q_width + 2 * cfg.dim_head].astype(dtype)
        ff = h @ kernel[:, q_width + 2 * cfg.dim_head :].astype(dtype)
        q, k, v = jnp.split(qkv, [q_width, q_width + cfg.dim_head], axis=-1)
        gate, up = jnp.split(ff, 2, axis=-1)
        q = q.reshape(*q.shape[:-1], cfg.heads, cfg.dim_head)
        q = rotary(q, tables)
        k = rotary(k[..., None, :], tables)[..., 0, :]

        new_cache = None
        if cache is not None:
            # Write this call's keys/values at their slots, then attend over the whole cache.
            slots = positions % cfg.seq_len
            k = cache["k"].at[..., slots, :].set(k.astype(cache["k"].dtype))
            v = cache["v"].at[..., slots, :].set(v.astype(cache["v"].dtype))
            new_cache = {"k": k, "v": v}

        attn = attend(q, k.astype(dtype), v.astype(dtype), positions, key_positions, cfg.seq_len,
                      self.implementation, contiguous and cache is None)
        attn = attn.reshape(*attn.shape[:-2], q_width)

        attn_out = nn.Dense(cfg.dim, use_bias=False, kernel_init=dense_init, dtype=dtype, name="attn_out")(attn)
        ff_out = nn.Dense(cfg.dim, use_bias=False, kernel_init=dense_init, dtype=dtype, name="ff_out")(
            nn.swish(gate) * up
        )
        return x + (attn_out + ff_out).astype(x.dtype), new_cache


class PaLM(nn.Module):
    """tokens [..., T] -> logits [..., T, num_tokens] (float32), updated cache (or None).

    `positions` default to 0..T-1 (a training window); given, or with a cache, they place the
    tokens anywhere in a longer stream.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None):
        cfg = self.cfg
        contiguous = positions is None
        if positions is None:
            positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
        embed = nn.Embed(cfg.num_tokens, cfg.dim, embedding_init=embed_init, name="embed")
        x = embed(tokens).astype(jnp.float32)

        if cache is None:
            key_positions, new_cache = positions, None
        else:
            key_positions = cache["pos"].at[positions % cfg.seq_len].set(positions)
            new_cache = {"pos": key_positions, "layers": []}
        implementation = attention_implementation(cfg)
        # Remat applies to training and scoring; a cached decoding step has nothing worth recomputing.
        block = ParallelBlock
        if cfg.remat != "none" and cache is None:
            block = nn.remat(ParallelBlock, policy=REMAT_POLICIES[cfg.remat], static_argnums=(6,))
        tables = rotary_tables(positions, cfg.dim_head)
        for i in range(cfg.depth):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = block(cfg, implementation, name=f"block_{i}")(
                x, positions, tables, key_positions, layer_cache, contiguous)
            if cache is not None:
                new_cache["layers"].append(layer_cache)

        x = nn.LayerNorm(use_bias=False, dtype=jnp.float32, name="final_norm")(x)
        # The tied head in the compute dtype, accumulated and returned in float32: bfloat16 logits
        # would carry ~3 significant digits into the loss.
        dtype = compute_dtype(cfg)
        logits = jnp.einsum("...d,vd->...v", x.astype(dtype), embed.embedding.astype(dtype),
                            preferred_element_type=jnp.float32)
        return logits / math.sqrt(cfg.dim), new_cache


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
