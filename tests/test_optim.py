import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mingpt_palm.config import ModelConfig, OptimizerConfig
from mingpt_palm.model import PaLM
from mingpt_palm.optim import decay_mask, lr_schedule, make_optimizer, resolved_warmup


def _params():
    cfg = ModelConfig(seq_len=8, dim=16, depth=3, heads=2, dim_head=8)
    return PaLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


def _random_like(params, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(params)))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def test_decay_mask_names_exactly_the_dense_kernels():
    _, names = decay_mask(_params())
    expected = {f"block_{i}/{proj}/kernel" for i in range(3) for proj in ("fused_proj", "attn_out", "ff_out")}
    assert set(names) == expected and len(names) == len(expected)


def test_weight_decay_touches_only_kernels():
    params = _params()
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0)
    tx, _, _ = make_optimizer(cfg, 10, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        decayed = np.any(np.asarray(u) != 0)
        assert decayed == (path[-1].key == "kernel"), path


def test_schedule_values():
    """schedule(count) is the rate of update count + 1: optax passes its 0-based count, and train.py
    logs schedule(step - skipped) for the step being taken, the same number."""
    cfg = OptimizerConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=100)
    s = lr_schedule(cfg, max_steps=1100)
    # rel 1e-5: float32 evaluation of a linear ramp and a cosine; a schedule one update early or
    # late is off by 1% in the warmup (1/100) and far more at update 1.
    assert float(s(0)) == pytest.approx(1e-5, rel=1e-5)  # update 1 already learns: 1/100 of the peak
    assert float(s(49)) == pytest.approx(5e-4, rel=1e-5)  # update 50
    assert float(s(99)) == pytest.approx(1e-3, rel=1e-5)  # update 100 = warmup_steps: the peak
    # update 600, halfway through the cosine from update 100 to update 1100: midpoint of peak and floor
    assert float(s(599)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-5)
    assert float(s(1099)) == pytest.approx(1e-4, rel=1e-5)  # update max_steps: the floor
    assert float(s(5000)) == pytest.approx(1e-4, rel=1e-5)
    # No warmup: the peak from update 1, then the cosine (warmup 1 means the same thing).
    for warmup in (0, 1):
        s = lr_schedule(OptimizerConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=warmup), max_steps=11)
        assert float(s(0)) == pytest.approx(1e-3, rel=1e-6)
        assert float(s(5)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-5)  # update 6 of 1 -> 11
        assert float(s(10)) == pytest.approx(1e-4, rel=1e-5)


def test_a_short_run_gets_a_real_schedule_and_a_long_warmup_is_kept():
    """The warmup used to be cut to --max-steps: with the default 1000 every run of up to 1000 steps was
    all warmup and never decayed, --optim.warmup-steps 100000 --max-steps 5 trained at the peak, and a
    200-step run extended to 1000 went from 6e-4 at update 200 to 1.2e-4 at 201, then climbed again."""
    assert resolved_warmup(OptimizerConfig(), 200) == 10 and resolved_warmup(OptimizerConfig(), 100_000) == 1000
    s = lr_schedule(OptimizerConfig(), 200)
    assert float(s(9)) == pytest.approx(6e-4, rel=1e-5) and float(s(199)) == pytest.approx(6e-5, rel=1e-5)
    s = lr_schedule(OptimizerConfig(warmup_steps=100_000), 5)
    # 3e-8, as --help says. rel 2e-3: optax ramps as peak - peak * (1 - i / W) in float32, which cancels
    # down to a few significant digits this early in a long warmup; the cut warmup gave 6e-4 (20,000x).
    assert float(s(4)) == pytest.approx(6e-4 * 5 / 100_000, rel=2e-3)
    # A continued run keeps the warmup it started with (config.json records it): extended, the rate only decays.
    extended = lr_schedule(OptimizerConfig(warmup_steps=resolved_warmup(OptimizerConfig(), 200)), 1000)
    rates = [float(extended(c)) for c in range(199, 1000)]
    assert all(b <= a for a, b in zip(rates, rates[1:])) and rates[0] < 6e-4


def test_the_schedule_is_the_rate_optax_applies():
    """With b1 = b2 = 0, no decay and no clipping, Adam's step is lr * g / (|g| + eps): -lr for a
    gradient of ones. So each update moves a parameter by exactly the rate the schedule gives for
    its count, the number train.py logs."""
    params = {"w": jnp.zeros(3)}
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=4, weight_decay=0.0, grad_clip=0, b1=0.0, b2=0.0)
    tx, schedule, _ = make_optimizer(cfg, 10, params)
    state = tx.init(params)
    for count in range(6):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        # rel 1e-6: float32 products and the 1 / (1 + 1e-8) of Adam's eps; the rate of a
        # neighbouring count differs by 25% in the warmup and a few % in the cosine.
        np.testing.assert_allclose(updates["w"], -float(schedule(count)), rtol=1e-6)
        params = optax.apply_updates(params, updates)


def test_first_update_changes_every_parameter():
    """The default configuration (warmup 1000 steps) must learn from step 1: a warmup starting at
    0 made the first update a no-op. Every element must move. Adam's first step is lr * sign(g),
    lr = 6e-4 / 1000 = 6e-7 (less 0.1 * lr * |w| of decay on kernels, |w| < 0.6 here): more than
    half a float32 ulp of every initial weight (the embedding's largest, ~4.0, has an ulp of 4.8e-7),
    so each one changes."""
    params = _params()
    tx, _, _ = make_optimizer(OptimizerConfig(), 100_000, params)
    updates, _ = tx.update(_random_like(params, 1), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for path, before in jax.tree_util.tree_leaves_with_path(params):
        after = new
        for k in path:
            after = after[k.key]
        assert np.all(np.asarray(after) != np.asarray(before)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("clip, scale, clipped", [
    (1.0, 3.0, True),    # ||g|| = 3 c: scaled down to c
    (1.0, 0.5, False),   # ||g|| = c / 2: untouched
    (0.0, 3.0, False),   # grad_clip 0 disables clipping
])
def test_gradient_clipping_by_global_norm(clip, scale, clipped):
    """Adam's step is nearly invariant to the gradient's scale, so parameters would not show a
    broken clip; the first moment after one update, (1 - b1) * clipped g, does.

    Every leaf of g gets the same norm, below c, while the global norm is `scale` * c: clipping
    leaf by leaf (or by RMS) would leave g alone and fail the clipped case."""
    params = _params()
    g = _random_like(params, 2)
    n_leaves = len(jax.tree.leaves(g))
    target = scale * (clip or 1.0)
    g = jax.tree.map(lambda x: x * (target / np.sqrt(n_leaves) / jnp.linalg.norm(x)), g)
    norm = float(optax.tree_utils.tree_norm(g))
    assert norm == pytest.approx(target, rel=1e-5)
    assert all(float(jnp.linalg.norm(x)) < (clip or 1.0) for x in jax.tree.leaves(g))
    cfg = OptimizerConfig(grad_clip=clip, b1=0.9)
    tx, _, _ = make_optimizer(cfg, 100, params)
    _, state = tx.update(g, tx.init(params), params)
    factor = clip / norm if clipped else 1.0
    expected = jax.tree.map(lambda x: (1 - cfg.b1) * x * factor, g)
    # rtol 1e-5: float32 global norm over ~10^4 squares (relative error ~1e-6); a missing clip is
    # off by 3x, clipping to a wrong threshold or leaf by leaf by far more than 1e-5.
    for got, want in zip(jax.tree.leaves(optax.tree_utils.tree_get(state, "mu")), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
