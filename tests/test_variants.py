"""The family: palm-lite (ALiBi), lamda (T5 bias, GeGLU), gpt (learned positions, dropout), trained,
resumed and compared through the same scripts as palm, and the parts checked against hand values.

Per-variant model properties (causality, leading dims, cache == recompute within and past seq_len)
are parametrised in tests/test_model.py and tests/test_sampling.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, leaves, load_state, read_scalars, run_cli
from mingpt_palm import layers
from mingpt_palm.config import ModelConfig
from mingpt_palm.model import VARIANTS, PaLM
from mingpt_palm.optim import decay_mask


def test_alibi_slopes_by_hand():
    """Press et al.: 8 heads 2^-1 .. 2^-8; 6 heads: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every
    other 8-head slope, 2^-1 and 2^-3."""
    np.testing.assert_array_equal(layers.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
    np.testing.assert_array_equal(layers.alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
    bias = layers.alibi_bias(jnp.arange(4), jnp.arange(4), 8)
    assert bias.shape == (8, 4, 4)
    assert float(bias[0, 3, 0]) == -0.5 * 3 and float(bias[7, 2, 1]) == -(2.0 ** -8)
    np.testing.assert_array_equal(np.diagonal(bias, axis1=1, axis2=2), 0)


def test_t5_buckets_by_hand():
    """32 causal buckets, max distance 128: 0-15 exact, then 16 + floor(16 * ln(d/16) / ln 8), capped at 31
    (worked out by hand: 18 -> 16 (0.91), 19 -> 17 (1.32), 21 -> 18 (2.09), 98 -> 29 (13.95),
    99 -> 30 (14.02), 112 -> 30 (14.97), 113 -> 31 (15.04))."""
    distance = jnp.array([0, 1, 15, 16, 18, 19, 20, 21, 98, 99, 112, 113, 128, 5000, -3])
    expected = [0, 1, 15, 16, 16, 17, 17, 18, 29, 30, 30, 31, 31, 31, 0]
    np.testing.assert_array_equal(layers.t5_bucket(distance), expected)
    # The gradient through the table is finite everywhere (no log(0) leaks into it).
    table = jnp.ones((32, 2))
    g = jax.grad(lambda t: t[layers.t5_bucket(distance)].sum())(table)
    assert np.isfinite(g).all()


def _hand_rotary(x, positions):
    """Rotary embeddings (Su et al. 2021) written out in float64 complex numbers: feature i and feature
    i + D/2 are the real and imaginary parts of one number, turned by position * 10000^(-i / (D/2))."""
    half = x.shape[-1] // 2
    angles = np.asarray(positions, np.float64)[:, None] * 10000.0 ** (-np.arange(half) / half)  # [T, D/2]
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)[:, None, :]  # over heads
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rotary_by_hand():
    """layers.rotary against the complex rotation above; and one value worked out by hand: a unit
    vector on feature 0 (D = 4, frequencies 1 and 1/100) at position 2 becomes (cos 2, 0, sin 2, 0).
    rtol 1e-5: float32 angles of positions up to 1000 (~6e-5 rad off). Returning x unrotated, pairing
    neighbours (2i, 2i+1) instead of halves, or another base is off by O(1)."""
    positions = np.array([0, 1, 2, 7, 100, 1000])
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 6, 3, 8)))
    got = layers.rotary(jnp.asarray(x), layers.rotary_tables(jnp.asarray(positions), 8))
    np.testing.assert_allclose(got, _hand_rotary(x.astype(np.float64), positions), atol=1e-4, rtol=0)
    unit = jnp.zeros((1, 1, 4)).at[0, 0, 0].set(1.0)
    np.testing.assert_allclose(layers.rotary(unit, layers.rotary_tables(jnp.array([2]), 4))[0, 0],
                               [np.cos(2.0), 0.0, np.sin(2.0), 0.0], atol=1e-6)


# gpt-alibi: several key/value heads, so the bias reaches jax.nn.dot_product_attention's own bias argument
# (palm-lite and lamda, with one key head in float32, take layers._attend_xla's folded path instead).
SCHEMES = {"rotary": ("rotary", "palm"), "alibi": ("alibi", "palm-lite"), "t5": ("t5", "lamda"),
           "gpt-alibi": ("alibi", "gpt")}


@pytest.mark.parametrize("case", SCHEMES)
def test_positions_enter_attention_as_computed_by_hand(case, monkeypatch):
    """The whole model's logits against the same model whose attention is replaced by a float64 reference
    that computes the position term itself, by hand, from the positions the test gave (with gaps, so
    that distances are not indices): rotary turns q and k (the model's own rotation switched off),
    ALiBi adds -slope_h * (query - key) with 4 heads' slopes 2^-2, 2^-4, 2^-6, 2^-8 (Press et al.), T5
    adds table[query - key, h] (distances below 16 have a bucket each) from a table of N(0, 1) values
    (at init it is zero: no bias at all). atol 1e-4 on logits up to ~5 (float32 against float64,
    measured 1e-6).

    A scheme the model does not apply, an ALiBi bias of the wrong sign, slopes or head order, a T5
    distance of key - query (every allowed key then falls into bucket 0, a constant that softmax
    ignores), a bias transposed or positions ignored (0..T-1 assumed) are each off by 1e-2 or more;
    the reference without its position term is checked to be that far off too (measured 1.2 to 2.2)."""
    scheme, variant = SCHEMES[case]
    cfg = ModelConfig(variant=variant, position=scheme, seq_len=16, dim=32, depth=2, heads=4, dim_head=8,
                      dtype="float32")
    model = PaLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    if scheme == "t5":
        assert not np.asarray(params["rel_bias"]["table"]).any()  # zero at init: position-blind
        params = {**params, "rel_bias": {"table": jax.random.normal(jax.random.PRNGKey(1), (32, 4))}}
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 256)
    positions = np.array([3, 4, 6, 7, 11, 12, 13, 17])  # every distance below seq_len: nothing masked by it
    distance = positions[:, None] - positions[None, :]  # [T, S], query - key
    slopes = np.array([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    table = np.asarray(params["rel_bias"]["table"], np.float64) if scheme == "t5" else None

    def hand_attend(q, k, v, *_, with_positions=True, **__):
        q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))  # [B, T, H, D]; k, v [B, S, K, D]
        if scheme == "rotary" and with_positions:
            q, k = _hand_rotary(q, positions), _hand_rotary(k, positions)
        k, v = np.repeat(k, 4 // k.shape[-2], axis=-2), np.repeat(v, 4 // v.shape[-2], axis=-2)
        scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
        if scheme == "alibi" and with_positions:
            scores = scores - slopes[:, None, None] * distance
        if scheme == "t5" and with_positions:
            scores = scores + np.transpose(table[np.maximum(distance, 0)], (2, 0, 1))
        scores = np.where(distance >= 0, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return jnp.asarray(np.einsum("bhts,bshd->bthd", weights, v), jnp.float32)

    ours, _ = model.apply({"params": params}, tokens, jnp.asarray(positions))
    monkeypatch.setattr(layers, "rotary", lambda x, tables: x)
    monkeypatch.setattr(layers, "attend", hand_attend)
    reference, _ = model.apply({"params": params}, tokens, jnp.asarray(positions))
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    monkeypatch.setattr(layers, "attend", lambda *a, **k: hand_attend(*a, with_positions=False, **k))
    blind, _ = model.apply({"params": params}, tokens, jnp.asarray(positions))
    assert np.abs(np.asarray(blind - reference)).max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_decay_only_on_kernels(variant):
    """No bias, norm scale, embedding, position table or T5 bias table is decayed; every matmul kernel is."""
    cfg = ModelConfig(variant=variant, seq_len=16, dim=32, depth=2, heads=4, dim_head=8)
    params = jax.eval_shape(lambda: PaLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
    _, decayed = decay_mask(params)
    names = ["/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    kept = set(names) - set(decayed)
    assert all(n.endswith("/kernel") or n.endswith("fused_proj/kernel") for n in decayed)
    assert all(n.split("/")[-1] in ("bias", "scale", "embedding", "table") for n in kept), kept
    per_block = {"palm": 3, "palm-lite": 3, "lamda": 4, "gpt": 4}[variant]  # fused or qkv, [ff_in], attn_out, ff_out
    assert len(decayed) == per_block * cfg.depth
    assert ("pos_embed/embedding" in kept) == (variant == "gpt") and ("rel_bias/table" in kept) == (variant == "lamda")
    assert any(n.endswith("/bias") for n in kept) == (variant == "gpt")


def test_dropout_masks_depend_on_seed_step_and_sequence_not_on_devices():
    """The keys of a sequence are a function of (seed, step, its row in the global batch): 4 devices
    of 2 rows, 1 device of 8 rows and 2 micro-batches of 4 give every row the same key."""
    from mingpt_palm import parallel
    from mingpt_palm.step import dropout_keys

    def keys(devices, k, b, seed=0, step=3):
        fn = jax.pmap(lambda _: dropout_keys(seed, step, (k, b)), axis_name=parallel.AXIS, devices=jax.devices()[:devices])
        return np.asarray(fn(jnp.zeros(devices))).reshape(devices * k * b, -1)

    one = keys(1, 1, 8)
    np.testing.assert_array_equal(keys(4, 1, 2), one)
    np.testing.assert_array_equal(keys(2, 2, 2), one)
    assert len({tuple(r) for r in one}) == 8  # a key of its own for each sequence
    assert not np.array_equal(keys(1, 1, 8, step=4), one) and not np.array_equal(keys(1, 1, 8, seed=1), one)


def test_dropout_only_in_training():
    cfg = ModelConfig(variant="gpt", dropout=0.5, seq_len=16, dim=32, depth=2, heads=4, dim_head=8)
    model, tokens = PaLM(cfg), jnp.arange(32).reshape(2, 16)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    a, _ = model.apply({"params": params}, tokens)
    b, _ = PaLM(dataclasses.replace(cfg, dropout=0.0)).apply({"params": params}, tokens)
    np.testing.assert_array_equal(a, b)  # evaluation and sampling: no dropout at all
    train = lambda key: model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": key})[0]  # noqa: E731
    assert not np.allclose(train(jax.random.PRNGKey(1)), a)
    np.testing.assert_array_equal(train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(1)))


FAMILY = {"palm-lite": [], "lamda": [], "gpt": ["--model.dropout", 0.1]}


@pytest.mark.parametrize("variant", FAMILY)
def test_variant_trains_resumes_bit_exact_and_matches_one_device(variant, shakespeare, tmp_path):
    """Through train_char.py, as palm is tested: 12 steps on 4 devices lower the loss; a resume from
    step 6 gives the uninterrupted run's parameters bit for bit (gpt with dropout: the masks come back
    from (seed, step)); 1 device agrees with 4 to float32 rounding over 12 Adam steps (atol 2e-5,
    tests/test_train_cli.py's parity argument); eval_char.py loads the checkpoint and scores it."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", 12,
            "--eval-interval", 0, "--log-interval", 1, "--checkpoint-interval", 6, "--keep-checkpoints", 5,
            "--model.variant", variant, *FAMILY[variant]]
    proc = run_cli("train_char.py", *args, "--experiment-name", "four", devices=4)
    assert f"model: {variant}," in proc.stdout
    # The printed mask: kernels decayed; biases, norms, the embedding and position tables not.
    decayed = next(line for line in proc.stdout.splitlines() if line.startswith("weight decay on "))
    kept = next(line for line in proc.stdout.splitlines() if line.startswith("no weight decay on "))
    assert all(name.endswith("/kernel") for name in decayed.split(": ", 1)[1].split(", ")), decayed
    assert "embed/embedding" in kept and "final_norm/scale" in kept and "kernel" not in kept, kept
    assert ("pos_embed/embedding" in kept) == (variant == "gpt") and ("rel_bias/table" in kept) == (variant == "lamda")
    run_cli("train_char.py", *args, "--experiment-name", "one", devices=1)
    losses = [v for _, v in read_scalars(tmp_path / "four" / "tb")["train/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses  # ~5.5 -> ~3.3 measured

    import shutil
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "four", tmp_path / "cut" / "four")
    run_cli("train_char.py", "--experiments-dir", tmp_path / "cut", "--experiment-name", "four", "--restore-step", 6,
            devices=4)
    full, resumed, one = (load_state(d / "four" if d != tmp_path / "one" else d) for d in
                          (tmp_path, tmp_path / "cut", tmp_path / "one"))
    for a, b in zip(leaves(full), leaves(resumed), strict=True):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(leaves((full["params"], full["opt_state"])), leaves((one["params"], one["opt_state"])), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)

    proc = run_cli("eval_char.py", "--experiments-dir", tmp_path, "--experiment-name", "four", "--sample-steps", 20)
    import json

    report = json.loads((tmp_path / "four" / "eval" / "val.json").read_text())
    assert report["checkpoint_step"] == 12 and 0 < report["bits_per_byte"] < 8, report
