"""The decoder of every variant, assembled from the parts in `layers.py`.

palm (Chowdhery et al. 2022, section 2): one bias-free LayerNorm feeds, in parallel, multi-query
attention and a SwiGLU feed-forward out of one fused input projection; rotary positions; no biases;
input embedding tied to the output head with logits scaled by 1/sqrt(dim); z-loss.
palm-lite (lucidrains/PaLM-jax, palm_jax/palm_lite.py): the same block with RMSNorm, one single-head
projection used as both keys and values, and ALiBi instead of rotary.
lamda (Thoppilan et al. 2022; conceptofmind/LaMDA-rlhf-pytorch, lamda_pytorch.py): sequential pre-norm
blocks, multi-query attention, T5 relative position bias, GeGLU.
gpt (Radford et al. 2019; nanoGPT model.py): sequential pre-LayerNorm blocks with biases, multi-head
attention, a GELU MLP, learned absolute positions, dropout, GPT-2's init.

The same code path serves training (a whole window at once) and cached generation: attention
always looks keys up by their absolute position, so a key/value cache is just another source of
keys. Inputs may carry any number of leading batch dimensions.

Mixed precision: matmuls and attention run in the compute dtype (`compute_dtype`: bfloat16 on GPUs
by default); parameters, the residual stream, norms, softmax and logits stay float32.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mingpt_palm import layers
from mingpt_palm.config import ModelConfig, position_scheme
from mingpt_palm.errors import UserError

# Fan-in (LeCun) init for every projection: variance 1/fan_in keeps activations O(1) at any width.
dense_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# PaLM initialises the embedding with unit variance: no norm sits between it and the first block,
# and the tied head divides logits by sqrt(dim) instead.
embed_init = nn.initializers.normal(stddev=1.0)
# GPT-2's: every weight N(0, 0.02), the projections back into the residual stream shrunk by
# 1/sqrt(2 * depth) (two per block) so that the stream's variance does not grow with depth.
gpt2_init = nn.initializers.normal(stddev=0.02)

REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a variant is made of."""

    arrangement: str  # parallel: x + attn(n(x)) + ff(n(x)); sequential: x += attn(n1(x)); x += ff(n2(x))
    norm: str  # layernorm | layernorm_bias | rmsnorm
    kv: str  # multi-query (one key and one value head) | shared (one head, keys = values) | multi-head
    ff: str  # swiglu | geglu | gelu
    bias: bool  # biases on every dense projection
    gpt2_init: bool  # GPT-2's init and untempered logits, else fan-in init and logits / sqrt(dim)


VARIANTS = {
    "palm": Parts("parallel", "layernorm", "multi-query", "swiglu", bias=False, gpt2_init=False),
    "palm-lite": Parts("parallel", "rmsnorm", "shared", "swiglu", bias=False, gpt2_init=False),
    "lamda": Parts("sequential", "layernorm", "multi-query", "geglu", bias=False, gpt2_init=False),
    "gpt": Parts("sequential", "layernorm_bias", "multi-head", "gelu", bias=True, gpt2_init=True),
}


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.heads if VARIANTS[cfg.variant].kv == "multi-head" else 1


def max_context(cfg: ModelConfig) -> int | None:
    """The longest window the position scheme can score: learned absolute positions have a table of
    seq_len rows; every other scheme computes any position (whether it was trained for it is another
    matter: ALiBi and T5 extrapolate, rotary and sinusoidal degrade)."""
    return cfg.seq_len if position_scheme(cfg) == "learned" else None


def relative_positions(cfg: ModelConfig) -> bool:
    """True when scores depend only on distances (rotary, ALiBi, T5): a cache can then slide past
    seq_len. Absolute positions (learned, sinusoidal) enter every key and value, so a window that
    moves must be recomputed."""
    return position_scheme(cfg) in ("rotary", "alibi", "t5")


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype matmuls run in: `auto` is bfloat16 on GPUs (their tensor cores), float32 elsewhere
    (CPUs have no fast bfloat16 matmul and would only lose precision)."""
    if cfg.dtype == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    return jnp.dtype(cfg.dtype)


def attention_implementation(cfg: ModelConfig) -> str:
    """'cudnn' or 'xla' for the training/scoring forward pass (layers.choose_attention); UserError for a
    cudnn request that cannot run here."""
    return layers.choose_attention(cfg.attention, compute_dtype(cfg), cfg.dim_head,
                                   biased=position_scheme(cfg) in ("alibi", "t5"))


def init_cache(cfg: ModelConfig, batch_shape: tuple[int, ...], dtype=None) -> dict:
    """An empty key/value cache holding seq_len positions, in the compute dtype by default.

    Multi-query attention stores one key and one value head per layer, so the cache is
    2 * depth * seq_len * dim_head numbers per sequence, `heads` times smaller than multi-head (gpt).
    Slot i holds position `pos[i]` (-1 = empty); positions are written at slot pos % seq_len,
    so generation past seq_len overwrites the oldest position (a sliding window).
    """
    dtype = compute_dtype(cfg) if dtype is None else dtype
    shape = (*batch_shape, cfg.seq_len, kv_heads(cfg), cfg.dim_head)
    layers_ = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.depth)]
    return {"pos": jnp.full((cfg.seq_len,), -1, jnp.int32), "layers": layers_}


def _dense(cfg: ModelConfig, features: int, name: str, residual: bool = False) -> nn.Dense:
    parts = VARIANTS[cfg.variant]
    init = dense_init
    if parts.gpt2_init:
        init = nn.initializers.normal(0.02 / math.sqrt(2 * cfg.depth)) if residual else gpt2_init
    return nn.Dense(features, use_bias=parts.bias, kernel_init=init, dtype=compute_dtype(cfg), name=name)


def _dropout(cfg: ModelConfig, deterministic: bool):
    """A dropout callable, or None when nothing is dropped (then no random numbers are drawn at all)."""
    return None if deterministic or cfg.dropout == 0 else nn.Dropout(cfg.dropout, deterministic=False)


@flax.struct.dataclass
class AttnContext:
    """Where a block's tokens sit and what their attention may see, computed once per forward pass and
    handed to every block (lm1b's TransformerConfig, "to minimize kwarg plumbing"). The fields after
    `bias` are static, so that remat and jit treat them as constants."""

    positions: jax.Array  # [T] each query's absolute position
    key_positions: jax.Array  # [S] each key slot's position (-1: an empty cache slot)
    rope: tuple | None  # rotary (cos, sin) tables, or None
    bias: jax.Array | None  # [H, T, S] added to the scores (ALiBi, T5), or None
    contiguous: bool = flax.struct.field(pytree_node=False)  # keys are the queries' own 0..T-1: plain causal
    context: int = flax.struct.field(pytree_node=False)  # how far back a query may look
    deterministic: bool = flax.struct.field(pytree_node=False)  # no dropout (evaluation, sampling)


def _attention(cfg, q, k, v, ctx: AttnContext, cache, drop):
    """Rotary (if any), the cache write, and attention of q [..., T, H, D] over k, v [..., T, K, D].
    Returns (attention output [..., T, H * D], the layer's updated cache or None)."""
    if ctx.rope is not None:
        q, k = layers.rotary(q, ctx.rope), layers.rotary(k, ctx.rope)
    new_cache = None
    if cache is not None:
        # Write this call's keys/values at their slots, then attend over the whole cache.
        slots = ctx.positions % cfg.seq_len
        k = cache["k"].at[..., slots, :, :].set(k.astype(cache["k"].dtype))
        v = cache["v"].at[..., slots, :, :].set(v.astype(cache["v"].dtype))
        new_cache = {"k": k, "v": v}
    dtype = compute_dtype(cfg)
    out = layers.attend(q, k.astype(dtype), v.astype(dtype), ctx.positions, ctx.key_positions, context=ctx.context,
                        implementation=attention_implementation(cfg), contiguous=ctx.contiguous and cache is None,
                        bias=ctx.bias, dropout=drop)
    return out.reshape(*out.shape[:-2], cfg.heads * cfg.dim_head), new_cache


def _split_heads(cfg, q, kv):
    """q [..., T, H*D] -> [..., T, H, D]; kv [..., T, K*D] -> [..., T, K, D]."""
    return (q.reshape(*q.shape[:-1], cfg.heads, cfg.dim_head),
            kv.reshape(*kv.shape[:-1], kv.shape[-1] // cfg.dim_head, cfg.dim_head))


class ParallelBlock(nn.Module):
    """x + attn(norm(x)) + ff(norm(x)): palm and palm-lite. Parameter names are the original PaLM
    checkpoints' (block_i/norm, fused_proj, attn_out, ff_out), so old experiments load unchanged."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, ctx: AttnContext, cache=None):
        cfg, parts = self.cfg, VARIANTS[self.cfg.variant]
        dtype = compute_dtype(cfg)
        h = layers.norm(parts.norm, "norm")(x).astype(dtype)
        ff_inner, q_width = cfg.ff_mult * cfg.dim, cfg.heads * cfg.dim_head
        kv_width = cfg.dim_head if parts.kv == "shared" else 2 * cfg.dim_head
        # One fused kernel (PaLM's layout, and the checkpoint's), multiplied in two column slices:
        # slicing the [dim, width] weights instead of the [tokens, width] activations spares the
        # backward pass a concatenate of the whole activation gradient.
        kernel = self.param("fused_proj", lambda key, shape: {"kernel": dense_init(key, shape)},
                            (cfg.dim, q_width + kv_width + 2 * ff_inner))["kernel"]
        qkv = h @ kernel[:, : q_width + kv_width].astype(dtype)
        ff = h @ kernel[:, q_width + kv_width :].astype(dtype)
        q, kv = _split_heads(cfg, qkv[..., :q_width], qkv[..., q_width:])
        k, v = (kv, kv) if parts.kv == "shared" else (kv[..., :1, :], kv[..., 1:, :])
        drop = _dropout(cfg, ctx.deterministic)
        attn, new_cache = _attention(cfg, q, k, v, ctx, cache, drop)
        gate, up = jnp.split(ff, 2, axis=-1)
        out = _dense(cfg, cfg.dim, "attn_out", residual=True)(attn) + _dense(cfg, cfg.dim, "ff_out", residual=True)(
            layers.gated(parts.ff, gate, up))
        out = out.astype(x.dtype)
        return x + (drop(out) if drop else out), new_cache


class SequentialBlock(nn.Module):
    """x += attn(norm1(x)); x += ff(norm2(x)): lamda and gpt (pre-norm, as GPT-2 and T5)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, ctx: AttnContext, cache=None):
        cfg, parts = self.cfg, VARIANTS[self.cfg.variant]
        dtype = compute_dtype(cfg)
        drop = _dropout(cfg, ctx.deterministic)
        q_width, kv_width = cfg.heads * cfg.dim_head, 2 * kv_heads(cfg) * cfg.dim_head
        h = layers.norm(parts.norm, "attn_norm")(x).astype(dtype)
        qkv = _dense(cfg, q_width + kv_width, "qkv")(h)
        q, kv = _split_heads(cfg, qkv[..., :q_width], qkv[..., q_width:])
        k, v = jnp.split(kv, 2, axis=-2)
        attn, new_cache = _attention(cfg, q, k, v, ctx, cache, drop)
        out = _dense(cfg, cfg.dim, "attn_out", residual=True)(attn).astype(x.dtype)
        x = x + (drop(out) if drop else out)
        h = layers.norm(parts.norm, "ff_norm")(x).astype(dtype)
        if parts.ff == "gelu":  # GPT-2's MLP uses the tanh approximation of GELU
            inner = nn.gelu(_dense(cfg, cfg.ff_mult * cfg.dim, "ff_in")(h), approximate=True)
        else:
            inner = layers.gated(parts.ff, *jnp.split(_dense(cfg, 2 * cfg.ff_mult * cfg.dim, "ff_in")(h), 2, axis=-1))
        out = _dense(cfg, cfg.dim, "ff_out", residual=True)(inner).astype(x.dtype)
        return x + (drop(out) if drop else out), new_cache


class PaLM(nn.Module):
    """tokens [..., T] -> logits [..., T, num_tokens] (float32), updated cache (or None). The model of
    every variant (`cfg.variant`), named for the family the project grew from.

    `positions` default to 0..T-1 (a training window); given, or with a cache, they place the
    tokens anywhere in a longer stream. `context`: how far back a query may look (default seq_len;
    a window longer than that slides). `deterministic=False` turns dropout on (training only); it
    then needs a "dropout" rng.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, context=None, deterministic=True):
        cfg, parts, scheme = self.cfg, VARIANTS[self.cfg.variant], position_scheme(self.cfg)
        contiguous = positions is None
        if positions is None:
            positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
        if scheme == "learned" and contiguous and tokens.shape[-1] > cfg.seq_len:
            raise UserError(f"a window of {tokens.shape[-1]} tokens is longer than the {cfg.seq_len} learned "
                            "positions of this model; use at most seq_len, or a scheme that extends (alibi, t5)")
        embed = nn.Embed(cfg.num_tokens, cfg.dim, embedding_init=gpt2_init if parts.gpt2_init else embed_init,
                         name="embed")
        x = embed(tokens).astype(jnp.float32) + self._absolute_positions(positions, scheme)
        drop = _dropout(cfg, deterministic)
        x = layers.along_batch(drop(x) if drop else x)

        if cache is None:
            key_positions, new_cache = positions, None
        else:
            key_positions = cache["pos"].at[positions % cfg.seq_len].set(positions)
            new_cache = {"pos": key_positions, "layers": []}
        bias = None
        if scheme == "alibi":
            bias = layers.alibi_bias(positions, key_positions, cfg.heads)
        elif scheme == "t5":
            bias = layers.RelativeBias(cfg.heads, name="rel_bias")(positions, key_positions)
        ctx = AttnContext(positions=positions, key_positions=key_positions, bias=bias,
                          rope=layers.rotary_tables(positions, cfg.dim_head) if scheme == "rotary" else None,
                          contiguous=contiguous, context=context or cfg.seq_len, deterministic=deterministic)
        block = ParallelBlock if parts.arrangement == "parallel" else SequentialBlock
        # Remat applies to training and scoring; a cached decoding step has nothing worth recomputing.
        if cfg.remat != "none" and cache is None:
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat])
        for i in range(cfg.depth):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = block(cfg, name=f"block_{i}")(x, ctx, layer_cache)
            x = layers.along_batch(x)
            if cache is not None:
                new_cache["layers"].append(layer_cache)

        x = layers.norm(parts.norm, "final_norm")(x)
        # The tied head in the compute dtype, accumulated and returned in float32: bfloat16 logits
        # would carry ~3 significant digits into the loss.
        dtype = compute_dtype(cfg)
        logits = jnp.einsum("...d,vd->...v", x.astype(dtype), embed.embedding.astype(dtype),
                            preferred_element_type=jnp.float32)
        return (logits if parts.gpt2_init else logits / math.sqrt(cfg.dim)), new_cache

    def _absolute_positions(self, positions, scheme: str):
        if scheme == "learned":
            return nn.Embed(self.cfg.seq_len, self.cfg.dim, embedding_init=gpt2_init, name="pos_embed")(positions)
        if scheme == "sinusoidal":
            # Vaswani et al. give positions and tokens the same scale (sections 3.4-3.5: embeddings
            # times sqrt(d), unit sines); at GPT-2's 0.02 the raw table would drown every token, so
            # it is brought to the token embedding's init scale instead (a sine's RMS is 1/sqrt(2)).
            std = 0.02 if VARIANTS[self.cfg.variant].gpt2_init else 1.0
            return layers.sinusoidal(positions, self.cfg.dim) * (std * math.sqrt(2))
        return 0.0


def param_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
