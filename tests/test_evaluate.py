"""Whole-split scoring: in process against the training loss, and through eval_char.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, run_cli
from mingpt_palm import data, evaluate, parallel
from mingpt_palm.config import ModelConfig
from mingpt_palm.model import PaLM, cross_entropy


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "tiny.txt"
    # 20,000 bytes: val and test are 1,000 bytes each, 15.6 windows of 64 (a padded last window)
    corpus.write_bytes((b"It was the best of times, it was the worst of times. " * 400)[:20_000])
    run_cli("train_char.py", "--dataset-path", corpus, "--experiments-dir", root, "--experiment-name", "e",
            *TINY, "--max-steps", 10, "--checkpoint-interval", 5, "--eval-interval", 0)
    return root


def _score(root, *args, devices=4):
    run_cli("eval_char.py", "--experiments-dir", root, "--experiment-name", "e", "--sample-steps", 0,
            "--batch-size", 4, *args, devices=devices)


def test_split_scoring_counts_every_byte_and_ignores_device_count(experiment):
    _score(experiment, "--split", "test")
    four = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    assert four["split_bytes"] == 1000 and four["bytes_scored"] == 999  # all but the first byte
    assert four["checkpoint_step"] == 10 and 0 < four["bpc"] < 8
    _score(experiment, "--split", "test")
    again = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    assert again == four  # deterministic, to the last bit
    _score(experiment, "--split", "test", devices=1)
    one = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    # Per-window sums are added on the host in window order in float64, so only the float32
    # forward of each window can differ with the device layout: relative 1e-6.
    assert one["bytes_scored"] == 999
    assert one["loss_nats"] == pytest.approx(four["loss_nats"], rel=1e-6)


def test_val_split_and_older_checkpoint(experiment):
    _score(experiment, "--split", "val", "--checkpoint-step", 5)
    old = json.loads((experiment / "e" / "eval" / "val_step5.json").read_text())
    _score(experiment, "--split", "val")
    new = json.loads((experiment / "e" / "eval" / "val.json").read_text())
    assert old["checkpoint_step"] == 5 and new["checkpoint_step"] == 10
    assert old["bytes_scored"] == new["bytes_scored"] == 999
    assert new["loss_nats"] < old["loss_nats"]  # five more steps of training help


def test_score_equals_the_training_loss_over_the_same_windows():
    """evaluate.score (pmapped over 4 devices, batches padded with zero-weight windows, per-window
    sums added on the host) must give exactly what model.cross_entropy, the training loss, gives
    over the same windows in one forward: nll_sum / count, and count = every byte but the first.

    rel 1e-5: both sides sum float32 per-token losses of ~5.5 nats; the reference adds all 86 in
    float32 (worst-case relative error 86 * 6e-8 = 5e-6), score adds per-window float32 sums in
    float64, and the logits come from differently batched matmuls (~1e-6). Scoring the 10 padded
    positions, losing the padded window or shifting targets moves the loss by more than 1%.
    """
    cfg = ModelConfig(seq_len=16, dim=32, depth=2, heads=4, dim_head=8)
    model = PaLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 2)[:87], np.uint8)
    vocab = data.Vocab.build("byte", split)
    raw, weights = data.split_windows(split, cfg.seq_len)
    tokens = vocab.encode(raw)
    batch_size = 4
    # 6 windows in batches of 4: the second batch is padded with 2 empty windows, and the last real
    # window scores only 86 - 5 * 16 = 6 of its 16 positions.
    assert len(tokens) == 6 and len(tokens) % batch_size and weights[-1].sum() == 6
    assert batch_size % jax.local_device_count() == 0

    result = evaluate.score(evaluate.make_eval_step(model), parallel.replicate(params), tokens, weights, batch_size)

    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    _, m = cross_entropy(logits, tokens[:, 1:], z_loss=0.0, weights=weights)
    assert result["tokens"] == int(m["count"]) == len(split) - 1
    assert result["loss"] == pytest.approx(float(m["nll_sum"]) / float(m["count"]), rel=1e-5)
    assert result["bpc"] == pytest.approx(result["loss"] / np.log(2), rel=1e-12)
