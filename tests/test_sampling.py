import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mingpt_palm.vocab import Vocab
from mingpt_palm.config import ModelConfig
from mingpt_palm.errors import UserError
from mingpt_palm.model import PaLM
from mingpt_palm.sampling import check_sampling_args, filter_logits, generate

CFG = ModelConfig(seq_len=32, dim=32, depth=2, heads=4, dim_head=8)


def trained(cfg, steps=40, lr=1e-2):
    """A model trained for a moment on a short text: a random one decodes a constant character,
    which would let a broken cache pass the equality tests."""
    import optax

    from mingpt_palm.loss import cross_entropy

    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog; " * 40, np.uint8).astype(np.int32)
    model = PaLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        grads = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, batch[:, :-1])[0], batch[:, 1:], 0.0)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(text) - 33, 16)
        params, opt = step(params, opt, text[starts[:, None] + np.arange(33)])
    return params


@pytest.fixture(scope="module")
def params():
    return trained(CFG)


VARIANTS = {"palm": CFG, **{v: dataclasses.replace(CFG, variant=v) for v in ("palm-lite", "lamda", "gpt")},
            "gpt-sinusoidal": dataclasses.replace(CFG, variant="gpt", position="sinusoidal")}
RELATIVE = ["palm", "palm-lite", "lamda"]  # rotary, ALiBi, T5: scores depend on distances alone
ABSOLUTE = ["gpt", "gpt-sinusoidal"]


@pytest.fixture(scope="module")
def models():
    """Each variant trained once for the module, on first use. GPT-2's small init (0.02) learns more
    slowly: 100 steps at 3e-3 bring it to the loss the others reach in 40 at 1e-2 (~0.2 nats)."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = VARIANTS[name]
            cache[name] = cfg, trained(cfg, *((100, 3e-3) if cfg.variant == "gpt" else (40, 1e-2)))
        return cache[name]

    return get


PROMPT = np.frombuffer(b"To be, or not", np.uint8).astype(np.int32)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_greedy_equals_recompute(models, name):
    # 13 prompt + 19 new = exactly seq_len, so both see the same contexts at every step
    cfg, params = models(name)
    cached = generate(params, cfg, PROMPT, 19, jax.random.PRNGKey(0), temperature=0)
    full = generate(params, cfg, PROMPT, 19, jax.random.PRNGKey(0), temperature=0, recompute=True)
    np.testing.assert_array_equal(cached, full)
    assert len(set(cached[0].tolist())) > 1  # not a degenerate constant sequence


@pytest.mark.parametrize("name", RELATIVE)
def test_greedy_generation_past_seq_len_follows_the_sliding_window(models, name):
    """3 x seq_len greedy characters, far past the context: each must be the best next character of
    ONE full forward over prompt + everything generated before it. That forward's mask is the
    sliding window (tests/test_model.py checks it is exactly seq_len wide and that the cache
    reproduces it), so a cache that slides wrongly picks other characters once it is full.

    A choice within 1e-4 of the best logit counts as the best: the cached and full logits differ by
    float32 rounding (~2e-6, test_model), so such a near-tie may go either way; a wrong context
    moves logits by 1e-2 or more.
    """
    cfg, params = models(name)
    steps = 3 * cfg.seq_len
    out = generate(params, cfg, PROMPT, steps, jax.random.PRNGKey(1), temperature=0)[0]
    assert len(set(out[cfg.seq_len:].tolist())) > 1  # past the context, still not a constant
    seq = np.concatenate([PROMPT, out])
    logits, _ = PaLM(cfg).apply({"params": params}, seq[:-1])  # position i predicts seq[i + 1]
    logits = np.asarray(logits[len(PROMPT) - 1 :])
    chosen = logits[np.arange(steps), out]
    late = np.flatnonzero(chosen < logits.max(axis=-1) - 1e-4)
    assert len(late) == 0, f"generated characters {late.tolist()} are not the full forward's best"


@pytest.mark.parametrize("name", ABSOLUTE)
def test_absolute_positions_generate_past_seq_len_as_recomputing_the_last_window(models, name):
    """Learned or sinusoidal positions cannot slide a cache: past seq_len every step must equal the
    model run over the last seq_len characters at positions 0..seq_len-1 (the reference recomputes
    exactly that). 2.5 x seq_len greedy characters, compared exactly: cached and recomputed logits
    differ by float32 rounding (~1e-6), far below the gap between a trained model's best two
    characters; a cache that slid (keys at stale positions) picks other characters within a few steps.
    """
    cfg, params = models(name)
    steps = int(2.5 * cfg.seq_len)
    cached = generate(params, cfg, PROMPT, steps, jax.random.PRNGKey(0), temperature=0)
    full = generate(params, cfg, PROMPT, steps, jax.random.PRNGKey(0), temperature=0, recompute=True)
    assert len(set(cached[0, cfg.seq_len:].tolist())) > 1  # past the context, still not a constant
    np.testing.assert_array_equal(cached, full)


def test_prompt_longer_than_seq_len_keeps_its_last_seq_len_tokens(params):
    tail = np.frombuffer(b"the lazy dog; the quick brown fox", np.uint8).astype(np.int32)[-CFG.seq_len :]
    long_prompt = np.concatenate([np.full(68, ord("#"), np.int32), tail])
    a = generate(params, CFG, long_prompt, 8, jax.random.PRNGKey(2), temperature=0)
    b = generate(params, CFG, tail, 8, jax.random.PRNGKey(2), temperature=0)
    np.testing.assert_array_equal(a, b)
    # The two ends of the prompt lead to different text, so keeping the wrong end would show.
    head = generate(params, CFG, long_prompt[: CFG.seq_len], 8, jax.random.PRNGKey(2), temperature=0)
    assert not np.array_equal(a, head)


def test_top_k_one_is_greedy_and_seed_reproducible(params):
    greedy = generate(params, CFG, PROMPT, 15, jax.random.PRNGKey(0), temperature=0)
    top1 = generate(params, CFG, PROMPT, 15, jax.random.PRNGKey(5), temperature=1.3, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    a = generate(params, CFG, PROMPT, 15, jax.random.PRNGKey(7), num_samples=3, top_k=20, top_p=0.9)
    b = generate(params, CFG, PROMPT, 15, jax.random.PRNGKey(7), num_samples=3, top_k=20, top_p=0.9)
    c = generate(params, CFG, PROMPT, 15, jax.random.PRNGKey(8), num_samples=3, top_k=20, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # samples are independent draws


def test_filter_logits():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    k2 = filter_logits(logits, 1.0, 2, None)
    assert np.isfinite(np.asarray(k2)).tolist() == [True, True, False, False]
    # top-p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it -> keep two
    p = filter_logits(logits, 1.0, None, 0.7)
    assert np.isfinite(np.asarray(p)).tolist() == [True, True, False, False]
    assert np.isfinite(np.asarray(filter_logits(logits, 1.0, None, 0.4))).tolist() == [True, False, False, False]
    np.testing.assert_allclose(filter_logits(logits, 2.0, None, None), logits / 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=300), "top-k 300 must be between 1 and the vocabulary size 256"),
    (dict(top_k=0), "top-k"),
    (dict(top_p=1.5), "top-p"),
    (dict(num_samples=0), "num-samples"),
])
def test_bad_sampling_args(kwargs, match):
    args = dict(temperature=1.0, top_k=None, top_p=None, steps=10, num_samples=1) | kwargs
    with pytest.raises(UserError, match=match):
        check_sampling_args(256, args["temperature"], args["top_k"], args["top_p"], args["steps"],
                            args["num_samples"])


# --- long generation: chunks, progress, one seed per sample ----------------------------------------

@pytest.mark.parametrize("recompute, partitionable", [(False, True), (True, True), (False, False)])
def test_a_longer_sample_extends_a_shorter_one(params, monkeypatch, recompute, partitionable):
    """Step t draws with fold_in(key, t): a longer sample with the same key begins with the shorter one,
    and how the steps are cut into compiled chunks never shows. split(key, steps) kept the first property
    only with jax_threefry_partitionable on (JAX's default), hence the run with it off. 45 steps run past
    seq_len (32), so the sliding cache is carried across chunks too."""
    from mingpt_palm import sampling

    def draw(steps):
        with jax.threefry_partitionable(partitionable):
            return generate(params, CFG, PROMPT, steps, jax.random.PRNGKey(3), num_samples=2, top_k=20,
                            recompute=recompute)

    whole = draw(45)
    np.testing.assert_array_equal(draw(13), whole[:, :13])
    monkeypatch.setattr(sampling, "CHUNK", 8)  # 5 chunks of 8 and one of 5
    np.testing.assert_array_equal(draw(45), whole)
    np.testing.assert_array_equal(draw(13), whole[:, :13])
    assert not np.array_equal(whole[0], whole[1])  # samples are independent draws


def test_generate_reports_progress_after_each_chunk_and_prints_nothing(params, monkeypatch, capsys):
    """progress is opt-in (training's TensorBoard samples stay silent): a callable told the tokens of
    each chunk once they are on the host."""
    from mingpt_palm import sampling

    monkeypatch.setattr(sampling, "CHUNK", 8)
    told = []
    out = generate(params, CFG, PROMPT, 20, jax.random.PRNGKey(0), progress=told.append)
    assert told == [8, 8, 4] and out.shape == (1, 20)
    generate(params, CFG, PROMPT, 20, jax.random.PRNGKey(0))
    assert capsys.readouterr() == ("", "")


def _eval_sample(params, capsysbinary, **kwargs):
    """eval_char.sample in process on the byte vocabulary: (stdout, stderr), as bytes (samples may hold
    any byte)."""
    import eval_char
    from mingpt_palm.config import EvalConfig, TrainConfig

    cfg = EvalConfig(experiment_name="e", prompt="To be, or not", sample_steps=20, **kwargs)
    vocab = Vocab.build("byte", np.zeros(1, np.uint8))
    eval_char.sample(cfg, TrainConfig(dataset_path="x", model=CFG), vocab, params, None)
    return capsysbinary.readouterr()


def _samples(out: bytes) -> list[tuple[bytes, bytes]]:
    """(header, text) of each sample eval_char printed."""
    parts = out.split(b"=== sample ")[1:]
    return [(p.split(b" ===\n", 1)[0].decode(), p.split(b" ===\n", 1)[1][:-1]) for p in parts]


def test_each_sample_is_drawn_with_its_own_seed(params, capsysbinary):
    """Sample i of --num-samples 3 --seed 5 is --seed 5+i-1 --num-samples 1, to the character, and its
    header says that seed; it is what generate draws from PRNGKey(5+i-1) alone."""
    three = _samples(_eval_sample(params, capsysbinary, num_samples=3, seed=5).out)
    assert [h for h, _ in three] == [f"{i} of 3: 20 characters, seed {4 + i}" for i in (1, 2, 3)]
    for i, (_, text) in enumerate(three):
        [(header, alone)] = _samples(_eval_sample(params, capsysbinary, num_samples=1, seed=5 + i).out)
        assert header == f"1 of 1: 20 characters, seed {5 + i}" and alone == text
        ids = generate(params, CFG, PROMPT, 20, jax.random.PRNGKey(5 + i), temperature=1.0)[0]
        assert bytes(ids.astype(np.uint8)) == text
    assert len({text for _, text in three}) == 3


def test_eval_generation_shows_progress_on_stderr(params, capsysbinary, monkeypatch):
    """Not a terminal: a line now and then (every LINE_INTERVAL_S, 0 here: after every chunk), counting the
    tokens of all samples; a terminal gets a tqdm bar; a process other than 0 prints nothing."""
    import io
    import sys

    from mingpt_palm import logs as progress, sampling

    monkeypatch.setattr(sampling, "CHUNK", 8)
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    err = _eval_sample(params, capsysbinary, num_samples=2).err.decode()
    assert err.splitlines() == [f"generating 2 samples: {n} of 40 tokens ({100 * n // 40}%)"
                                for n in (8, 16, 20, 28, 36, 40)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    _eval_sample(params, capsysbinary)
    assert sys.stderr.getvalue().startswith("\rgenerating:   0%|") and " 0/20 " in sys.stderr.getvalue()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(sys, "stderr", Terminal())
    _eval_sample(params, capsysbinary)
    assert sys.stderr.getvalue() == ""
