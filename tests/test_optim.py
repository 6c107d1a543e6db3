import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mingpt_palm.config import ModelConfig, OptimizerConfig
from mingpt_palm.model import PaLM
from mingpt_palm.optim import decay_mask, lr_schedule, make_optimizer


def _params():
    cfg = ModelConfig(seq_len=8, dim=16, depth=3, heads=2, dim_head=8)
    return PaLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]


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
    cfg = OptimizerConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=100)
    s = lr_schedule(cfg, max_steps=1100)
    assert float(s(0)) == 0.0
    assert float(s(50)) == pytest.approx(5e-4)
    assert float(s(100)) == pytest.approx(1e-3)
    # halfway through the cosine: midpoint between peak and floor
    assert float(s(600)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-5)
    assert float(s(1100)) == pytest.approx(1e-4, rel=1e-5)
    assert float(s(5000)) == pytest.approx(1e-4, rel=1e-5)

