"""The speed features keep the numbers: attention kernels, bfloat16, gradient accumulation, remat,
and the on-device halt that lets several steps be in flight."""

from __future__ import annotations

import dataclasses
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import SHAKESPEARE, leaves, need_data
from mingpt_palm import layers
from mingpt_palm import model as model_lib
from mingpt_palm import parallel
from mingpt_palm.config import ModelConfig, OptimizerConfig, TrainConfig
from mingpt_palm.loss import cross_entropy
from mingpt_palm.model import PaLM, init_cache
from mingpt_palm.state import build, init_state
from mingpt_palm.step import Control, accumulated_grads, train_step

CFG = ModelConfig(seq_len=16, dim=32, depth=2, heads=4, dim_head=8, dtype="float32")
BYTES = jnp.arange(256, dtype=jnp.int32)
ONES = jnp.ones(256, jnp.int32)  # every byte id stands for one byte


def _params(cfg=CFG):
    """Initial parameters, but for T5's bias table, zero at init (no position bias at all): N(0, 1) here,
    so that lamda's attention is compared with its bias in play."""
    params = PaLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    if "rel_bias" in params:
        table = params["rel_bias"]["table"]
        params = {**params, "rel_bias": {"table": jax.random.normal(jax.random.PRNGKey(9), table.shape, table.dtype)}}
    return params


def einsum_attend(q, k, v, positions, key_positions, *, context, implementation, contiguous, bias=None,
                  dropout=None):
    """The attention this project used before jax.nn.dot_product_attention: the reference. Key/value
    heads are copied to every query head first (multi-query or multi-head alike)."""
    delta = positions[:, None] - key_positions[None, :]
    allowed = (key_positions[None, :] >= 0) & (delta >= 0) & (delta < context)
    group = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, group, axis=-2), jnp.repeat(v, group, axis=-2)
    scores = jnp.einsum("...thd,...shd->...hts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("...hts,...shd->...thd", weights, v)


def available_implementations() -> list[str]:
    found = ["xla"]
    if jax.default_backend() == "gpu":
        found.append("cudnn")
    return found


@pytest.mark.parametrize("implementation, variant", [("xla", "palm"), ("xla", "palm-lite"), ("xla", "lamda"),
                                                     ("xla", "gpt"), ("cudnn", "palm")])
def test_every_attention_implementation_equals_the_einsum_reference(implementation, variant, monkeypatch):
    """Logits of a full forward (within and past seq_len) and of cached decoding, each implementation
    against the einsum path. float32: 1e-5 absolute, rounding of differently ordered sums (measured
    ~1e-6); cuDNN runs in bfloat16 and is compared with the einsum path in bfloat16, within 0.1 (8-bit
    mantissas through two blocks; a wrong mask or a wrong head grouping is off by more than 1)."""
    if implementation not in available_implementations():
        pytest.skip(f"{implementation} attention needs an NVIDIA GPU (this is {jax.default_backend()})")
    dtype = "bfloat16" if implementation == "cudnn" else "float32"
    # gpt with sinusoidal positions: its learned table would refuse the forward past seq_len.
    cfg = dataclasses.replace(CFG, attention=implementation, dtype=dtype, variant=variant,
                              position="sinusoidal" if variant == "gpt" else "auto")
    atol = 0.1 if dtype == "bfloat16" else 1e-5
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 3 * cfg.seq_len), 0, 256)
    ours = _window_long_and_cached_logits(cfg, params, tokens)
    monkeypatch.setattr(layers, "attend", einsum_attend)
    for a, b in zip(ours, _window_long_and_cached_logits(cfg, params, tokens), strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def _window_long_and_cached_logits(cfg, params, tokens):
    """Logits of one training window, of a forward over all of `tokens` (past seq_len), and of one cached
    decoding step after a 5-token prompt; compiled anew, so that a patched `attend` is traced."""
    apply = jax.jit(lambda p, t, pos=None, c=None: PaLM(cfg).apply({"params": p}, t, pos, c))
    window, _ = apply(params, tokens[:, : cfg.seq_len])
    long, _ = apply(params, tokens)
    _, cache = apply(params, tokens[:, :5], jnp.arange(5), init_cache(cfg, (2,)))
    cached, _ = apply(params, tokens[:, 5:6], jnp.arange(5, 6), cache)
    return window, long, cached


def test_cudnn_where_it_cannot_run_is_one_clear_error():
    from mingpt_palm.errors import UserError

    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU cuDNN can run")
    with pytest.raises(UserError, match=r"--model.attention cudnn cannot run here: it needs an NVIDIA GPU"):
        model_lib.attention_implementation(dataclasses.replace(CFG, attention="cudnn"))
    assert model_lib.attention_implementation(dataclasses.replace(CFG, attention="auto")) == "xla"
    assert model_lib.compute_dtype(dataclasses.replace(CFG, dtype="auto")) == jnp.float32  # a CPU


def test_multi_query_keys_are_not_copied_per_head():
    """The single key/value head reaches dot_product_attention as K = 1 (grouped), never broadcast to
    every query head first. In a cached decoding step (one query, 16 cached keys of width 16, 8 heads)
    keys copied per head would be a [2, 16, 8, 16] array, a shape nothing else in the step has."""
    cfg = dataclasses.replace(CFG, heads=8, dim_head=16)
    params = _params(cfg)
    apply = jax.jit(lambda p, t, pos, c: PaLM(cfg).apply({"params": p}, t, pos, c))
    hlo = apply.lower(params, jnp.zeros((2, 1), jnp.int32), jnp.arange(3, 4), init_cache(cfg, (2,))).as_text()
    assert "tensor<2x16x1x16xf32>" in hlo  # the cache's keys are there
    assert "tensor<2x16x8x16xf32>" not in hlo


def _bf16(cfg):
    return dataclasses.replace(cfg, dtype="bfloat16")


def test_bfloat16_keeps_parameters_norms_and_logits_in_float32():
    cfg = _bf16(CFG)
    params = _params(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits, _ = PaLM(cfg).apply({"params": params}, jnp.zeros((1, 16), jnp.int32))
    assert logits.dtype == jnp.float32
    assert init_cache(cfg, (1,))["layers"][0]["k"].dtype == jnp.bfloat16


def _steps(cfg: TrainConfig, batches, accum=1):
    """Run the real (pmapped) train step over `batches`; returns (state, [metrics of each step])."""
    model, tx, schedule, _, _ = build(cfg)
    step = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=cfg.model.z_loss,
                                 table=BYTES, byte_lengths=ONES, max_nonfinite=10))
    state, control = parallel.replicate(init_state(model, tx, cfg)), parallel.replicate(Control.start())
    out = []
    for raw in batches:
        state, control, _, metrics = step(state, control, parallel.shard_micro_batches(raw, accum),
                                          np.zeros(jax.local_device_count(), bool))
        out.append(parallel.unreplicate(metrics))
    return parallel.unreplicate(state), out


def _shakespeare_batches(n, batch, seq_len):
    from mingpt_palm import data
    from mingpt_palm.config import DataConfig

    split = data.load_corpus(str(need_data(SHAKESPEARE)), DataConfig(), progress=False).train
    return [data.get_batch(split, 0, s, batch, seq_len) for s in range(n)]


def test_bfloat16_training_follows_float32():
    """40 steps of a small model on tinyshakespeare in bfloat16 and in float32, same data and init: the
    loss falls from ~5.9 to ~3 either way, and the bfloat16 curve stays within 0.1 nats of float32's at
    every step (measured max 0.03: bfloat16 matmul inputs carry 8-bit mantissas, ~0.4% per product,
    into a loss of a few nats). A bfloat16 softmax or loss, or bfloat16 parameters that cannot take
    updates of lr ~1e-3, drift by more; a wrong cast of the logits breaks it at once."""
    cfg = TrainConfig(batch_size=8, max_steps=40, model=dataclasses.replace(CFG, seq_len=32, dim=64),
                      optim=OptimizerConfig(learning_rate=3e-3, warmup_steps=5))
    batches = _shakespeare_batches(40, 8, 32)
    _, f32 = _steps(cfg, batches)
    _, bf16 = _steps(dataclasses.replace(cfg, model=_bf16(cfg.model)), batches)
    a, b = np.array([m["loss"] for m in f32]), np.array([m["loss"] for m in bf16])
    assert a[-5:].mean() < a[0] - 2.0  # it learned
    np.testing.assert_allclose(b, a, atol=0.1, rtol=0)


def test_bfloat16_cache_equals_recompute():
    """Cached decoding in bfloat16 against one full bfloat16 forward: 0.05 absolute on logits of order
    1 (the cache stores bfloat16 keys, the full pass rounds the same keys the same way; what differs is
    the order of bfloat16 sums, measured ~1e-2). An off-by-one slot is off by far more."""
    cfg = _bf16(CFG)
    params = _params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 256)
    apply = jax.jit(lambda p, t, pos=None, c=None: PaLM(cfg).apply({"params": p}, t, pos, c))
    full, _ = apply(params, tokens)
    cache = init_cache(cfg, (2,))
    outs = []
    for t in range(16):
        logits, cache = apply(params, tokens[:, t : t + 1], jnp.arange(t, t + 1), cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=0.05, rtol=0)


def test_gradient_accumulation_equals_one_big_batch():
    """3 updates with --grad-accum-steps 4 against 3 updates on the same global batch at once (4 devices):
    the same sequences, gradients averaged in another order, so parameters and Adam moments agree to
    float32 rounding (1e-6; measured ~1e-8), and so do the logged loss and gradient norm. Summing the
    micro-batch gradients without dividing by 4, or dropping one micro-batch, is off by 1e-3 or more."""
    cfg = TrainConfig(batch_size=32, max_steps=10, model=CFG, optim=OptimizerConfig(warmup_steps=0))
    batches = _shakespeare_batches(3, 32, 16)
    one, m1 = _steps(cfg, batches, accum=1)
    four, m4 = _steps(dataclasses.replace(cfg, grad_accum_steps=4), batches, accum=4)
    for a, b in zip(leaves((one.params, one.opt_state)), leaves((four.params, four.opt_state)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for key in ("loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose([m[key] for m in m1], [m[key] for m in m4], rtol=1e-5)


def _dropout_step(model_cfg: ModelConfig, seed: int, accum: int = 1):
    """raw, step -> (loss, grad_norm) of one real (pmapped) train step from the initial parameters at
    state.step = step, `seed` keying dropout; compiled once."""
    cfg = TrainConfig(batch_size=8, model=model_cfg, grad_accum_steps=accum, optim=OptimizerConfig(warmup_steps=0))
    model, tx, schedule, _, _ = build(cfg)
    step_fn = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=model_cfg.z_loss,
                                    table=BYTES, byte_lengths=ONES, max_nonfinite=10, seed=seed))
    state = init_state(model, tx, cfg)

    def run(raw, step: int):
        _, _, _, metrics = step_fn(parallel.replicate(state.replace(step=jnp.int32(step))),
                                   parallel.replicate(Control.start()), parallel.shard_micro_batches(raw, accum),
                                   np.zeros(jax.local_device_count(), bool))
        metrics = parallel.unreplicate(metrics)
        return float(metrics["loss"]), float(metrics["grad_norm"])

    return run


def test_the_train_step_drops_out_with_the_keys_of_seed_step_and_row():
    """gpt with dropout 0.3 through the real train step (4 devices x 2 micro-batches of 1 sequence): the
    loss and gradient norm are those of a reference that applies dropout to each sequence of the global
    batch with the key dropout_keys gives its row (all 8 rows at once on one device), at this seed (3)
    and step (5), and not the deterministic ones; the same batch at another step draws other masks.

    rel 1e-5: the same masks, and a mean of 8 sequences' gradients summed in another order (measured
    3e-7). Without dropout (keys None) the loss moves by 1e-3 and the gradient norm by 2% (an untrained
    model's loss is near log 256 whatever is dropped); keys of the wrong rows (the device left out of
    the row), of step 0 or of seed 0 draw other masks and miss the reference loss by 1e-3 to 7e-3
    (measured), the other step's loss differs by 6e-3 and its gradient norm by 6%."""
    from mingpt_palm.step import dropout_keys

    model_cfg = dataclasses.replace(CFG, variant="gpt", dropout=0.3)
    raw = np.random.default_rng(0).integers(0, 256, (8, CFG.seq_len + 1), dtype=np.uint8)
    seed, step = 3, 5
    step_fn = _dropout_step(model_cfg, seed, accum=2)
    loss, grad_norm = step_fn(raw, step)

    model = PaLM(model_cfg)
    params = _params(model_cfg)  # init_state's: PRNGKey(TrainConfig.seed = 0)
    keys = jax.pmap(lambda _: dropout_keys(seed, step, (1, 8)), axis_name=parallel.AXIS,
                    devices=jax.devices()[:1])(jnp.zeros(1))[0, 0]  # [8 rows, key]
    tokens = jnp.asarray(raw, jnp.int32)

    @partial(jax.jit, static_argnums=1)
    def loss_and_grad_norm(p, dropout):
        def loss_fn(p):
            if dropout:  # one key per sequence, as the step does
                def apply(t, k):
                    return model.apply({"params": p}, t, deterministic=False, rngs={"dropout": k})[0]

                logits = jax.vmap(apply)(tokens[:, :-1], keys)
            else:
                logits, _ = model.apply({"params": p}, tokens[:, :-1])
            total, m = cross_entropy(logits, tokens[:, 1:], model_cfg.z_loss)
            return total, m["loss"]

        (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        return ce, optax.tree_utils.tree_norm(grads)

    ref_loss, ref_norm = map(float, loss_and_grad_norm(params, True))
    plain_loss, plain_norm = map(float, loss_and_grad_norm(params, False))
    assert loss == pytest.approx(ref_loss, rel=1e-5) and grad_norm == pytest.approx(ref_norm, rel=1e-5)
    assert abs(loss - plain_loss) > 1e-4 and abs(grad_norm - plain_norm) > 5e-3 * plain_norm, (loss, plain_loss)
    other_loss, other_norm = step_fn(raw, 0)
    assert abs(other_loss - loss) > 1e-3 and abs(other_norm - grad_norm) > 5e-3 * grad_norm, (other_loss, loss)


def _compiled_step_hlo(accum: int) -> str:
    cfg = TrainConfig(batch_size=4 * 4 * accum, model=CFG, grad_accum_steps=accum)
    model, tx, schedule, _, _ = build(cfg)
    step = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=1e-4, table=BYTES,
                                 byte_lengths=ONES, max_nonfinite=10))
    state = parallel.replicate(init_state(model, tx, cfg))
    raw = np.zeros((jax.local_device_count(), accum, 4, CFG.seq_len + 1), np.uint8)
    return step.lower(state, parallel.replicate(Control.start()), raw,
                      np.zeros(jax.local_device_count(), bool)).compile().as_text()


ALL_REDUCE = re.compile(r"= [^\n]*\ball-reduce(?:-start)?\(")


def _computations(hlo: str) -> dict[str, str]:
    """name -> instructions of every computation in HLO text: a computation starts with a line
    `[ENTRY ]%name (params) -> type {` and ends with a line `}`."""
    found, name, lines = {}, None, []
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) \(.*\{$", line)
        if header:
            name, lines = header.group(1), []
        elif line == "}" and name is not None:
            found[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    return found


def _called(text: str) -> list[str]:
    """The computations the instructions in `text` call: fusions, loops, conditionals, reducers."""
    single = re.findall(r"\b(?:calls|body|condition|to_apply)=%([\w.\-]+)", text)
    several = re.findall(r"\b(?:branch_computations|called_computations|calls)=\{([^}]*)\}", text)
    return single + [n.strip().lstrip("%") for group in several for n in group.split(",") if n.strip()]


def _all_reduces_in_loops(hlo: str) -> dict[str, int]:
    """For each while loop's body: the all-reduces in it and in everything it calls (an all-reduce in a
    loop body runs once per iteration, but the text shows it once)."""
    computations = _computations(hlo)
    out = {}
    for body in re.findall(r"\bwhile\([^\n]*\bbody=%([\w.\-]+)", hlo):
        assert body in computations, f"while body {body} not found in the HLO text"
        seen, todo = set(), [body]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(_called(computations[name]))
        out[body] = sum(len(ALL_REDUCE.findall(computations[name])) for name in seen)
    return out


def test_accumulation_all_reduces_once_per_update_not_per_micro_batch():
    """With 4 micro-batches the compiled step runs its scan as a while loop, and no all-reduce sits in
    that loop's body or in anything it calls: the gradients are averaged over devices once, after the
    loop (optax.MultiSteps under pmap would all-reduce every micro-batch). Counting all-reduces in the
    whole text cannot tell: one inside the loop is written once however often it runs, and XLA
    combines the gradient leaves and metrics into one or a few, so a pmean moved into the scan body
    (with the metrics and the byte count) gives the same count, 2 (the sums and the stop flag's max).
    The count must still match 1 micro-batch's, in case XLA ever unrolls the loop."""
    one, four = _compiled_step_hlo(1), _compiled_step_hlo(4)
    loops = _all_reduces_in_loops(four)
    assert loops, "the scan over micro-batches compiled to no while loop"
    assert not any(loops.values()), loops
    assert len(ALL_REDUCE.findall(four)) == len(ALL_REDUCE.findall(one))


def _saved_for_backward(cfg: ModelConfig, params, tokens) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every array the loss's backward pass keeps from its forward pass, by jax's own
    account (jax.ad_checkpoint.print_saved_residuals), the arguments (parameters, tokens) left out."""
    import contextlib
    import io

    import jax.ad_checkpoint

    def loss(p):
        logits, _ = PaLM(cfg).apply({"params": p}, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:], cfg.z_loss)[0]

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, params)
    saved = []
    for line in printed.getvalue().splitlines():
        if "from the argument" not in line:
            dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            itemsize = {"f32": 4, "i32": 4, "bool": 1, "bf16": 2}[dtype]
            saved.append((shape, itemsize * math.prod(shape)))
    return saved


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_same_gradients(remat):
    """Rematerialisation recomputes the same operations: the gradients agree to float32 rounding (1e-6
    absolute on gradients of order 1e-2, measured 0), and the parameters (and so checkpoints) are the same.

    And it is on: the backward pass keeps less of the forward. Without remat it keeps each block's
    attention weights [B, T, H, S] and feed-forward activations [B, T, ff] (1.5 MB in all here); with
    `block` only each block's input (0.24 MB: the logits' softmax is outside the blocks), with `dots`
    the matmul outputs too (0.59 MB: q, k and v out of the fused projection among them), neither any
    attention weights. nn.remat left out, or cfg.remat ignored, keeps them all; the two policies
    swapped keep the wrong matmuls. (XLA's CPU compiler shows no such difference in
    memory_analysis().temp_size_in_bytes, not even for a plain jax.checkpoint'ed MLP, so the check is
    on jax's own account of the residuals.)"""
    tokens = jnp.asarray(np.stack(_shakespeare_batches(1, 8, 16)[0]), jnp.int32)[None]
    plain = _params(CFG)
    cfg = dataclasses.replace(CFG, remat=remat)
    assert jax.tree.structure(_params(cfg)) == jax.tree.structure(plain)
    g0, _ = accumulated_grads(plain, tokens, PaLM(CFG), 1e-4)
    g1, _ = accumulated_grads(plain, tokens, PaLM(cfg), 1e-4)
    for a, b in zip(leaves(g0), leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    weights_shape = (8, CFG.seq_len, CFG.heads, CFG.seq_len)
    kept = _saved_for_backward(CFG, plain, tokens[0])
    assert sum(1 for shape, _ in kept if shape == weights_shape) >= CFG.depth  # what remat is there to spare
    remat_kept = _saved_for_backward(cfg, plain, tokens[0])
    assert not [shape for shape, _ in remat_kept if shape == weights_shape]
    assert sum(b for _, b in remat_kept) < 0.5 * sum(b for _, b in kept), (remat_kept, kept)
    fused = (8, CFG.seq_len, CFG.heads * CFG.dim_head + 2 * CFG.dim_head)  # q, k, v out of the fused projection
    assert any(shape == fused for shape, _ in remat_kept) == (remat == "dots"), remat_kept


def test_a_halted_run_changes_nothing_in_the_steps_already_in_flight():
    """A stop agreed at step 2: the step itself is taken, later steps (dispatched before the host knew)
    leave the state bit for bit alone and report themselves inactive."""
    cfg = TrainConfig(batch_size=8, max_steps=10, model=CFG, optim=OptimizerConfig(warmup_steps=0))
    model, tx, schedule, _, _ = build(cfg)
    step = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=1e-4, table=BYTES,
                                 byte_lengths=ONES, max_nonfinite=10))
    state, control = parallel.replicate(init_state(model, tx, cfg)), parallel.replicate(Control.start())
    batches = _shakespeare_batches(4, 8, 16)
    n = jax.local_device_count()
    for i, raw in enumerate(batches):
        stop = np.full(n, i == 1)
        state, control, _, _ = step(state, control, parallel.shard_micro_batches(raw, 1), stop)
        if i == 1:
            at_stop = parallel.unreplicate(state)
    after = parallel.unreplicate(state)
    assert int(at_stop.step) == int(after.step) == 2 and bool(parallel.unreplicate(control.halted))
    for a, b in zip(leaves(at_stop), leaves(after), strict=True):
        assert a.tobytes() == b.tobytes()
