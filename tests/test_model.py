import jax
import jax.numpy as jnp
import numpy as np

from mingpt_palm.config import ModelConfig
from mingpt_palm.model import PaLM, cross_entropy, init_cache

CFG = ModelConfig(seq_len=16, dim=32, depth=2, heads=4, dim_head=8)


def _params(cfg=CFG):
    return PaLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]


def test_causality():
    params, model = _params(), PaLM(CFG)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 256)
    base, _ = model.apply({"params": params}, tokens)
    for t in (0, 5, 14):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 256)
        logits, _ = model.apply({"params": params}, changed)
        np.testing.assert_array_equal(logits[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(logits[:, t + 1 :], base[:, t + 1 :])


def test_leading_batch_dims():
    params, model = _params(), PaLM(CFG)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 3, 16), 0, 256)
    logits, _ = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 3, 16, 256)
    flat, _ = model.apply({"params": params}, tokens.reshape(6, 16))
    np.testing.assert_allclose(logits.reshape(6, 16, 256), flat, atol=1e-5)
    single, _ = model.apply({"params": params}, tokens[1, 2])
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


def test_cached_logits_equal_full_forward():
    """Prompt in one pass, then one token at a time through the cache, against one full forward.

    Tolerance 1e-5 absolute: float32 logits of order 1 computed by differently shaped matmuls
    (1 query row vs 16) differ by rounding only, ~1e-6 here.
    """
    params, model = _params(), PaLM(CFG)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (3, 16), 0, 256)
    full, _ = model.apply({"params": params}, tokens)
    cache = init_cache(CFG, (3,))
    logits, cache = model.apply({"params": params}, tokens[:, :6], jnp.arange(6), cache)
    outs = [logits]
    for t in range(6, 16):
        logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], jnp.arange(t, t + 1), cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


def test_cache_is_small():
    cache = init_cache(CFG, (1,))
    per_layer = cache["layers"][0]["k"].size + cache["layers"][0]["v"].size
    assert per_layer == 2 * CFG.seq_len * CFG.dim_head  # one key head, one value head (multi-query)
