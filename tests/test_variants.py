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
