"""--parallel fsdp: the training dp does, with each device holding about 1/N of the state."""

from __future__ import annotations

import dataclasses
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHAKESPEARE, TINY, leaves, load_state, main_ok, need_data, read_scalars, run_cli, steps_in
from mingpt_palm import checkpoints, data, fsdp, parallel
from mingpt_palm.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from mingpt_palm.state import build, init_state
from mingpt_palm.step import STATUS, Control, train_step

CFG = TrainConfig(model=ModelConfig(seq_len=16, dim=32, depth=2, heads=4, dim_head=8, dtype="float32"),
                  batch_size=8, max_steps=20, optim=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
                  parallel="fsdp", fsdp_min_bytes=0)  # 0: every leaf with a width axis is split, even this small
BYTES, ONES = jnp.arange(256, dtype=jnp.int32), jnp.ones(256, jnp.int32)


class OneDevice(parallel.Replicated):
    """dp on the first device alone (pmap over one device), beside the 4 the suite simulates."""

    def compile(self, step):
        return jax.pmap(step, axis_name=parallel.AXIS, devices=jax.local_devices()[:1])

    def place(self, tree):
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)

    place_state = place

    def batch(self, raw, accum):
        return raw.reshape(1, accum, -1, *raw.shape[1:])

    def stop_flags(self, flag):
        return np.full(1, flag)


def _layout(kind: str, cfg: TrainConfig):
    return {"dp": parallel.DP, "dp1": OneDevice(), "fsdp": fsdp.Sharded(build(cfg).abstract, cfg.model.dim,
                                                                        cfg.fsdp_min_bytes)}[kind]


def _train(cfg: TrainConfig, kind: str, batches):
    """The real step, compiled and fed by the layout as the loop does it: (host state, [loss], [grad norm])."""
    layout, built = _layout(kind, cfg), build(cfg)
    state = layout.place_state(layout.init(partial(init_state, built.model, built.tx, cfg)))
    control = layout.place(Control.start())
    step = layout.compile(partial(train_step, model=built.model, tx=built.tx, schedule=built.schedule,
                                  z_loss=cfg.model.z_loss, table=BYTES, byte_lengths=ONES, max_nonfinite=10,
                                  seed=cfg.seed, layout=layout))
    losses, norms = [], []
    for raw in batches:
        state, control, status, _ = step(state, control, layout.batch(raw, cfg.grad_accum_steps),
                                         layout.stop_flags(False))
        s = layout.read(status)
        losses.append(s[STATUS.index("loss")])
        norms.append(s[STATUS.index("grad_norm")])
    host = layout.read(state) if kind != "fsdp" else jax.device_get(state)
    return host, np.array(losses), np.array(norms)


@pytest.mark.parametrize("clip,accum,dropout", [(1.0, 1, 0.0), (0.0, 2, 0.1)],
                         ids=["clip", "noclip-accum2-dropout"])
def test_fsdp_on_4_devices_trains_like_dp_on_4_and_on_1(clip, accum, dropout):
    """20 steps from the same batches: parameters, both Adam moments, losses and gradient norms of fsdp (4
    devices) equal dp's on 4 and on 1 device to float32 rounding. Only the order of the sums differs: against
    dp on 4, parameters and moments agree to 2e-6 absolute (measured 4e-7 after 20 steps at lr 3e-3); against
    dp on 1 to 2e-4 (measured 7e-5 with dropout, and dp on 4 is as far from dp on 1: Adam's 1/sqrt(nu) swells
    the rounding of near-zero gradients), 99.99% of elements to 2e-6; losses and norms to 1e-5 relative
    (measured 3e-7). A psum where the mean is, a lost micro-batch, dropout rows numbered otherwise than dp's,
    or a gradient not summed over the batch are off by 1e-3 or more in most elements."""
    cfg = dataclasses.replace(CFG, grad_accum_steps=accum, model=dataclasses.replace(CFG.model, dropout=dropout),
                              optim=dataclasses.replace(CFG.optim, grad_clip=clip))
    split = data.load_corpus(str(need_data(SHAKESPEARE)), DataConfig(), progress=False).train
    batches = [data.get_batch(split, 0, s, 8, 16) for s in range(20)]
    sharded, loss, norm = _train(cfg, "fsdp", batches)
    for kind in ("dp", "dp1"):
        other, other_loss, other_norm = _train(cfg, kind, batches)
        diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
            leaves((sharded.params, sharded.opt_state)), leaves((other.params, other.opt_state)), strict=True)])
        assert diff.max() < {"dp": 2e-6, "dp1": 2e-4}[kind], (kind, diff.max())
        assert np.quantile(diff, 0.9999) < 2e-6, kind
        np.testing.assert_allclose(loss, other_loss, rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(norm, other_norm, rtol=1e-5, err_msg=kind)
    assert loss[-5:].mean() < loss[0] - 0.5  # it learned: the comparison is not between two idle runs


def test_each_leaf_is_split_along_the_width_as_the_rule_says():
    """The state is born sharded: a [D, F] kernel is [D/4, F] on each device, an [F, D] one [F, D/4], the
    embedding [V, D/4], Adam's moments like their parameters; under --fsdp-min-bytes every leaf of this
    model is small, and stays whole."""
    layout, built = _layout("fsdp", CFG), build(CFG)
    state = layout.init(partial(init_state, built.model, built.tx, CFG))
    d, f = CFG.model.dim, CFG.model.ff_mult * CFG.model.dim
    fused = CFG.model.heads * CFG.model.dim_head + 2 * CFG.model.dim_head + 2 * f
    want = {"['block_0']['fused_proj']['kernel']": (d // 4, fused), "['block_0']['attn_out']['kernel']": (d // 4, d),
            "['block_0']['ff_out']['kernel']": (f, d // 4), "['embed']['embedding']": (256, d // 4),
            "['final_norm']['scale']": (d // 4,)}
    mu, nu = state.opt_state[1][0].mu, state.opt_state[1][0].nu
    for tree in (state.params, mu, nu):
        shards = {jax.tree_util.keystr(p): x.addressable_shards[0].data.shape
                  for p, x in jax.tree_util.tree_leaves_with_path(tree)}
        assert {k: shards[k] for k in want} == want
    whole = _layout("fsdp", dataclasses.replace(CFG, fsdp_min_bytes=1 << 20)).init(
        partial(init_state, built.model, built.tx, CFG))
    assert all(x.addressable_shards[0].data.shape == x.shape for x in jax.tree.leaves(whole))


def test_the_rule_never_splits_a_fused_projection_along_its_outputs():
    """gpt's qkv kernel [D, 3 * heads * dim_head] with 3 * 2 * 16 = D = 96: both axes have the width's length;
    the rule takes the input axis, which the block does not slice into q, k and v. An embedding [V, D] with
    V = D takes its width axis."""
    assert fsdp.shard_axis("['block_0']['qkv']['kernel']", (96, 96), 4, 96, 0) == 0
    assert fsdp.shard_axis("['block_0']['attn_out']['kernel']", (32, 96), 4, 96, 0) == 1
    assert fsdp.shard_axis("['embed']['embedding']", (96, 96), 4, 96, 0) == 1
    assert fsdp.shard_axis("['rel_bias']['table']", (32, 4), 4, 96, 0) is None
    assert fsdp.shard_axis("['block_0']['fused_proj']['kernel']", (96, 608), 4, 96, 1 << 20) is None  # 233 KB


def test_the_compiled_fsdp_step_gathers_weights_and_holds_a_quarter_of_the_state():
    """The compiled step of 4 devices: it all-gathers the weight shards, sums no activation ([.., seq_len, ..])
    over devices (the batch stays split by sequence: layers.along_batch), and its per-device arguments
    (state and batch) are about 1/4 of dp's: a state left whole (in_shardings lost) or activations cut along
    the width (tensor-parallel all-reduces, what XLA chose before along_batch) fail it. XLA looks rows up in
    the width-split embedding table where they lie and trades the [b, seq_len, D/4] pieces (all-to-all)
    rather than gather the table: that is allowed. On CPU, XLA lowers the gradient reduce-scatter as an
    all-reduce and a slice (its CPU pipeline has no reduce-scatter creator); a GPU gets reduce-scatters."""
    cfg = dataclasses.replace(CFG, grad_accum_steps=2)
    raw = np.zeros((8, 17), np.uint8)
    compiled = {}
    for kind in ("dp", "fsdp"):
        layout, built = _layout(kind, cfg), build(cfg)
        state = layout.place_state(layout.init(partial(init_state, built.model, built.tx, cfg)))
        step = layout.compile(partial(train_step, model=built.model, tx=built.tx, schedule=built.schedule,
                                      z_loss=1e-4, table=BYTES, byte_lengths=ONES, max_nonfinite=10, layout=layout))
        compiled[kind] = step.lower(state, layout.place(Control.start()), layout.batch(raw, 2),
                                    layout.stop_flags(False)).compile()
    text = compiled["fsdp"].as_text()
    collectives = re.findall(r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter)(?:-start)?\(", text)
    assert sum(kind == "all-gather" for _, kind in collectives) >= 2 * cfg.model.depth
    seq = cfg.model.seq_len
    summed = [shape for shape, kind in collectives if kind == "all-reduce" and re.search(rf"[\[,]{seq}[,\]]", shape)]
    assert summed == [], summed
    dp, sharded = (compiled[k].memory_analysis().argument_size_in_bytes for k in ("dp", "fsdp"))
    assert sharded < 0.3 * dp, (sharded, dp)


def test_a_nonfinite_shard_is_found_on_the_devices():
    """The checkpoint guard reads each leaf's verdict from the devices (no host copy of a sharded state): a
    NaN in one shard of one Adam moment is named, a finite state passes."""
    layout, built = _layout("fsdp", CFG), build(CFG)
    state = layout.init(partial(init_state, built.model, built.tx, CFG))
    assert checkpoints.nonfinite_leaves(state) == []
    mu = state.opt_state[1][0].mu
    bad = mu["block_1"]["ff_out"]["kernel"]
    poisoned = jax.device_put(np.asarray(bad).copy(), bad.sharding)
    poisoned = poisoned.at[-1, -1].set(jnp.nan)  # the last column: the last device's shard
    mu = {**mu, "block_1": {**mu["block_1"], "ff_out": {"kernel": poisoned}}}
    adam = state.opt_state[1][0]._replace(mu=mu)
    state = state.replace(opt_state=(state.opt_state[0], (adam, *state.opt_state[1][1:])))
    assert checkpoints.nonfinite_leaves(state) == [".opt_state[1][0].mu['block_1']['ff_out']['kernel']"]


def test_under_fsdp_a_nonfinite_step_is_skipped_and_a_stop_on_one_device_halts_the_run():
    """The guards of the step body hold under jit too: a NaN in one shard of the parameters makes the loss
    non-finite, and the step leaves the state bit for bit as it was (counting the skip); a stop asked on one
    device of four halts the run there, and a step dispatched after it changes nothing."""
    layout, built = _layout("fsdp", CFG), build(CFG)
    state = layout.init(partial(init_state, built.model, built.tx, CFG))
    w = state.params["block_0"]["ff_out"]["kernel"]
    poisoned = state.replace(params={**state.params, "block_0": {**state.params["block_0"], "ff_out": {
        "kernel": w.at[0, -1].set(jnp.nan)}}})
    step = layout.compile(partial(train_step, model=built.model, tx=built.tx, schedule=built.schedule, z_loss=1e-4,
                                  table=BYTES, byte_lengths=ONES, max_nonfinite=10, layout=layout))
    raw = layout.batch(np.full((8, 17), 65, np.uint8), 1)
    one = jax.make_array_from_process_local_data(layout.flags, np.array([False, False, True, False]), (4,))
    after, control, status, _ = step(poisoned, layout.place(Control.start()), raw, layout.stop_flags(False))
    status = dict(zip(STATUS, layout.read(status)))
    assert not status["finite"] and status["bad_in_row"] == 1 and not status["halted"]
    assert int(layout.read(after.skipped)) == 1 and int(layout.read(after.step)) == 1
    for a, b in zip(leaves(jax.device_get((poisoned.params, poisoned.opt_state))),
                    leaves(jax.device_get((after.params, after.opt_state))), strict=True):
        assert a.tobytes() == b.tobytes()
    halted, control, status, _ = step(state, layout.place(Control.start()), raw, one)
    assert layout.read(status)[STATUS.index("halted")] and bool(layout.read(control.halted))
    later, _, _, _ = step(halted, control, raw, layout.stop_flags(False))
    assert int(layout.read(later.step)) == 1
    for a, b in zip(leaves(jax.device_get(halted)), leaves(jax.device_get(later)), strict=True):
        assert a.tobytes() == b.tobytes()


# --- the command line: checkpoints across layouts and device counts -------------------------------

ARGS = [*TINY, "--max-steps", 20, "--checkpoint-interval", 10, "--eval-interval", 0, "--log-interval", 1,
        "--fsdp-min-bytes", 0]


def test_a_checkpoint_continues_under_the_other_layout_and_device_count(shakespeare, tmp_path):
    """A run under one layout on 4 devices, continued from its step 10 (--restore-step) under the other on 2,
    retraces its own steps 11-20 to float tolerance (the layouts sum in other orders: parameters and moments
    within 2e-5, measured ~1e-6; losses rel 1e-4), both ways. fsdp's step 20 also matches dp's, and a
    checkpoint of sharded state is scored by eval_char.py on a single device. A restore that put the saved
    shards in the wrong places, or kept the saving run's topology, fails at once or is off by far more."""
    common = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *ARGS]
    for first, then in (("dp", "fsdp"), ("fsdp", "dp")):
        name = f"{first}-then-{then}"
        main_ok("train_char.py", *common, "--experiment-name", name, "--parallel", first, cwd=tmp_path)
        before = read_scalars(tmp_path / name / "tb")["train/loss"]
        out = run_cli("train_char.py", "--experiments-dir", tmp_path, "--experiment-name", name, "--restore-step",
                      10, "--parallel", then, devices=2, cwd=tmp_path).stdout
        assert f"devices: 2 under --parallel {then} now, 4 under {first} when step 10 was saved" in out, out
        (superseded,) = (tmp_path / name / "superseded_checkpoints").iterdir()
        for a, b in zip(leaves(load_state(None, step_dir=superseded)), leaves(load_state(tmp_path / name, 20)),
                        strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, err_msg=name)
        after = read_scalars(tmp_path / name / "tb")["train/loss"][len(before):]  # the continued run's file
        assert [s for s, _ in after] == list(range(11, 21))
        np.testing.assert_allclose([v for _, v in after], [v for s, v in before if s > 10], rtol=1e-4)
    for a, b in zip(leaves(load_state(tmp_path / "fsdp-then-dp", 20)), leaves(load_state(tmp_path / "dp-then-fsdp", 20)),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    scored = run_cli("eval_char.py", "--experiments-dir", tmp_path, "--experiment-name", "dp-then-fsdp",
                     "--sample-steps", 0, devices=1, cwd=tmp_path).stdout
    assert re.search(r"=== val: \d\.\d+ bits per byte", scored), scored
    assert steps_in(tmp_path / "dp-then-fsdp" / "checkpoints") == [10, 20]
