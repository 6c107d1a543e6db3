import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mingpt_palm.config import ModelConfig
from mingpt_palm.loss import cross_entropy
from mingpt_palm.model import VARIANTS, PaLM, init_cache, kv_heads, relative_positions

CFG = ModelConfig(seq_len=16, dim=32, depth=2, heads=4, dim_head=8)
# Every variant, and gpt with sinusoidal positions (the other absolute scheme).
ALL = [dataclasses.replace(CFG, variant=v) for v in VARIANTS] + [
    dataclasses.replace(CFG, variant="gpt", position="sinusoidal")]
RELATIVE = [cfg for cfg in ALL if relative_positions(cfg)]


def _id(cfg):
    return cfg.variant + ("" if cfg.position == "auto" else f"-{cfg.position}")


each_variant = pytest.mark.parametrize("cfg", ALL, ids=_id)
each_relative = pytest.mark.parametrize("cfg", RELATIVE, ids=_id)


def _params(cfg=CFG):
    """Initial parameters, but for T5's bias table: it starts at zero (the model starts position-blind),
    and every test here would then run without a position bias. It gets N(0, 1) values instead, so that
    causality, the cache and relative positions are tested with the bias in play."""
    params = PaLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    if "rel_bias" in params:
        table = params["rel_bias"]["table"]
        params = {**params, "rel_bias": {"table": jax.random.normal(jax.random.PRNGKey(9), table.shape, table.dtype)}}
    return params


@partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, positions=None, cache=None):
    """model.apply, compiled once per shape: op-by-op dispatch of the same forward is several times
    slower on these CPUs, and the cache tests below call it once per token."""
    return PaLM(cfg).apply({"params": params}, tokens, positions, cache)


def _bump(tokens, t):
    """tokens with the token at position t (every row) replaced by another one."""
    return tokens.at[..., t].set((tokens[..., t] + 1) % 256)


@each_variant
def test_causality(cfg):
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 256)
    base, _ = _apply(cfg, params, tokens)
    for t in (0, 5, 14):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 256)
        logits, _ = _apply(cfg, params, changed)
        np.testing.assert_array_equal(logits[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(logits[:, t + 1 :], base[:, t + 1 :])


@each_variant
def test_rows_of_a_batch_are_independent(cfg):
    """Changing one sequence of a batch leaves every other sequence's logits bit for bit unchanged:
    a norm, mask or attention contraction over the wrong axis would mix sequences."""
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (4, 16), 0, 256)
    base, _ = _apply(cfg, params, tokens)
    changed = tokens.at[2].set((tokens[2] + 1) % 256)  # same shapes: one compilation, same kernels
    logits, _ = _apply(cfg, params, changed)
    for row in (0, 1, 3):
        np.testing.assert_array_equal(logits[row], base[row])
    assert not np.allclose(logits[2], base[2])


@each_variant
def test_leading_batch_dims(cfg):
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 3, 16), 0, 256)
    logits, _ = _apply(cfg, params, tokens)
    assert logits.shape == (2, 3, 16, 256)
    flat, _ = _apply(cfg, params, tokens.reshape(6, 16))
    np.testing.assert_allclose(logits.reshape(6, 16, 256), flat, atol=1e-5)
    single, _ = _apply(cfg, params, tokens[1, 2])
    assert single.shape == (16, 256)
    np.testing.assert_allclose(single, logits[1, 2], atol=1e-5)


def test_palm_structure_and_init():
    params = _params()
    block = params["block_0"]
    # fused projection: q (heads x dim_head) + one k head + one v head + two SwiGLU halves
    assert block["fused_proj"]["kernel"].shape == (32, 4 * 8 + 8 + 8 + 2 * 4 * 32)
    assert set(block) == {"norm", "fused_proj", "attn_out", "ff_out"}
    assert set(block["norm"]) == {"scale"}  # no bias anywhere
    assert all(path[-1].key in ("kernel", "scale", "embedding") for path, _ in
               jax.tree_util.tree_leaves_with_path(params))
    # every layer has its own key: same-shaped kernels differ
    assert not np.allclose(params["block_0"]["fused_proj"]["kernel"], params["block_1"]["fused_proj"]["kernel"])
    # fan-in init: std ~ 1/sqrt(fan_in); embedding ~ N(0, 1)
    k = np.asarray(params["block_0"]["ff_out"]["kernel"])
    assert abs(k.std() * np.sqrt(k.shape[0]) - 1) < 0.15
    assert abs(np.asarray(params["embed"]["embedding"]).std() - 1) < 0.1


def test_cross_entropy_and_z_loss():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    targets = jnp.array([[0, 2]])
    total, m = cross_entropy(logits, targets, z_loss=1e-4)
    lse = jax.nn.logsumexp(logits, -1)
    ce = np.mean(np.asarray(lse) - np.array([2.0, 0.0]))
    np.testing.assert_allclose(m["loss"], ce, rtol=1e-6)
    np.testing.assert_allclose(m["bpc"], ce / np.log(2), rtol=1e-6)
    np.testing.assert_allclose(total, ce + 1e-4 * np.mean(np.asarray(lse) ** 2), rtol=1e-6)


@each_variant
def test_cached_logits_equal_full_forward(cfg):
    """Prompt in one pass, then one token at a time through the cache, against one full forward.

    Tolerance 1e-5 absolute: float32 logits of order 1 computed by differently shaped matmuls
    (1 query row vs 16) differ by rounding only, ~1e-6 here.
    """
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (3, 16), 0, 256)
    full, _ = _apply(cfg, params, tokens)
    cache = init_cache(cfg, (3,))
    logits, cache = _apply(cfg, params, tokens[:, :6], jnp.arange(6), cache)
    outs = [logits]
    for t in range(6, 16):
        logits, cache = _apply(cfg, params, tokens[:, t : t + 1], jnp.arange(t, t + 1), cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


@each_relative
def test_cache_slides_past_seq_len_exactly_like_the_full_forward(cfg):
    """3 x seq_len tokens fed one at a time through the cache, against ONE full forward over all of
    them. The attention mask admits only keys with 0 <= query - key < seq_len, so a full forward
    over more than seq_len positions is the sliding-window model, and the cache (seq_len slots,
    overwritten oldest first) must reproduce it at every position: in the first window, while it
    fills, and for two more windows after it starts overwriting.

    Tolerance 1e-5 absolute, as in test_cached_logits_equal_full_forward (measured ~2e-6 on logits
    up to ~5). A cache that kept one position too few or too many, wrote the wrong slot, or read
    an overwritten one changes logits by ~1e-2 or more.
    """
    params = _params(cfg)
    n = 3 * cfg.seq_len
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, n), 0, 256)
    full, _ = _apply(cfg, params, tokens)
    cache = init_cache(cfg, (2,))
    outs = []
    for t in range(n):
        logits, cache = _apply(cfg, params, tokens[:, t : t + 1], jnp.arange(t, t + 1), cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


@each_relative
def test_attention_window_is_exactly_seq_len(cfg):
    """In a full forward over 3 x seq_len tokens, one block's logits at position t depend on tokens
    t - seq_len + 1 .. t and on nothing earlier (bit for bit): the window training and cached
    generation share. Through `depth` blocks the reach compounds: each key was computed from its
    own window, so position t sees back to t - depth * (seq_len - 1) and no further.

    "Changes" means by more than 1e-4 (measured 1e-2 to 0.3): far above float32 rounding, which is
    0 here anyway, since the other positions' inputs are bit for bit the same.
    """
    base_cfg, n = cfg, 3 * cfg.seq_len
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, n), 0, 256)
    for depth in (1, 2):
        cfg = dataclasses.replace(base_cfg, depth=depth)
        params = _params(cfg)
        base, _ = _apply(cfg, params, tokens)
        reach = depth * (cfg.seq_len - 1)  # the farthest token back that position t can see
        for t in (reach + 1, n - 1):
            inside, _ = _apply(cfg, params, _bump(tokens, t - reach))
            outside, _ = _apply(cfg, params, _bump(tokens, t - reach - 1))
            assert np.abs(inside[:, t] - base[:, t]).max() > 1e-4, (depth, t)
            np.testing.assert_array_equal(outside[:, t], base[:, t], err_msg=f"depth {depth}, t {t}")


@each_relative
def test_logits_depend_only_on_relative_positions(cfg):
    """Rotary embeddings, ALiBi and T5's bias make attention scores a function of query - key alone: the
    same tokens at positions offset..offset + T - 1 give the same logits for any offset.

    Tolerance 1e-4 absolute: the angles position * frequency are float32, so at positions near
    1000 they carry rounding errors up to ~1000 * 6e-8 = 6e-5 rad, which moves logits of order 5
    by at most that order (measured 4e-6). Rotating q and k by different positions, or a wrong
    rotation (one that is not orthogonal, mixing the wrong pairs), moves them by 1e-2 or more.

    A model blind to positions would pass that trivially, so the distances must matter too: the same
    8 tokens spread out (positions 0, 2, .., 14, every key still within seq_len, the causal mask the
    same) give other logits at every position that sees another token. A scheme that is not applied
    (rotary returning its input, no ALiBi or T5 bias, or a T5 bias of query - key clipped to one
    bucket), or positions ignored altogether, leaves them equal (0 difference); the measured
    differences are 0.1 to 2.4, the bound 1e-2. Position 0 sees only itself, at distance 0 either way.
    """
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(7), (2, cfg.seq_len), 0, 256)
    positions = jnp.arange(cfg.seq_len)
    base, _ = _apply(cfg, params, tokens, positions)
    for offset in (37, 1000):
        shifted, _ = _apply(cfg, params, tokens, positions + offset)
        np.testing.assert_allclose(shifted, base, atol=1e-4, rtol=0, err_msg=f"offset {offset}")

    short = tokens[:, :8]
    close, _ = _apply(cfg, params, short, positions[:8])
    spread, _ = _apply(cfg, params, short, 2 * positions[:8])
    np.testing.assert_allclose(spread[:, 0], close[:, 0], atol=1e-4, rtol=0)
    moved = np.abs(np.asarray(spread - close)).max(axis=(0, 2))  # per position
    assert (moved[1:] > 1e-2).all(), moved


@each_variant
def test_cache_is_small(cfg):
    cache = init_cache(cfg, (1,))
    per_layer = cache["layers"][0]["k"].size + cache["layers"][0]["v"].size
    # One key head and one value head (multi-query), or one per query head (gpt's multi-head).
    assert per_layer == 2 * cfg.seq_len * cfg.dim_head * (cfg.heads if cfg.variant == "gpt" else 1)
    assert kv_heads(cfg) == (cfg.heads if cfg.variant == "gpt" else 1)
