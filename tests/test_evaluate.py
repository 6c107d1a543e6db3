"""Whole-split scoring: in process against the training loss, and through eval_char.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, call_main, main_ok, run_cli
from mingpt_palm.vocab import Vocab
from mingpt_palm import data, evaluate, parallel
from mingpt_palm.config import ModelConfig
from mingpt_palm.loss import cross_entropy
from mingpt_palm.model import PaLM


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "tiny.txt"
    # 20,000 bytes: val and test are 1,000 bytes each, 15.6 windows of 64 (a padded last window)
    corpus.write_bytes((b"It was the best of times, it was the worst of times. " * 400)[:20_000])
    main_ok("train_char.py", "--dataset-path", corpus, "--experiments-dir", root, "--experiment-name", "e",
            *TINY, "--max-steps", 10, "--checkpoint-interval", 5, "--eval-interval", 0, cwd=root)
    return root


def _score(root, *args, devices=4):
    """eval_char.py's scoring; in this process (4 devices) unless another device count is asked for."""
    args = ["--experiments-dir", root, "--experiment-name", "e", "--sample-steps", 0, "--batch-size", 4, *args]
    if devices == 4:
        main_ok("eval_char.py", *args, cwd=root)
    else:
        run_cli("eval_char.py", *args, devices=devices)


def test_split_scoring_counts_every_byte_and_ignores_device_count(experiment):
    _score(experiment, "--split", "test")
    four = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    assert four["split_bytes"] == 1000 and four["bytes_scored"] == 999  # all but the first byte
    assert four["checkpoint_step"] == 10 and 0 < four["bits_per_byte"] < 8
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
    """evaluate.score (pmapped over 4 devices, batches padded with zero-weight windows, per-window sums
    added on the host) over data.split_windows' windows must give the mean next-byte loss over the
    split, computed here without the code under test: windows cut by hand (window w: inputs
    split[16w : 16w+16], targets one byte later, positions past the end not scored), one plain forward
    of the model over them, and the loss written out in float64 numpy (logsumexp minus the target's
    logit). Neither model.token_nll, nor data.scoring_windows / window_spans, nor the eval step's
    weighting is reused, so a bug in any of them shows.

    rel 1e-6: the reference adds float64 losses of float32 logits; score adds float32 per-token losses
    into float32 per-window sums (16 terms of ~5.5: relative error ~1e-6 at worst) in float64, from the
    logits of differently batched matmuls; measured 4e-10. Scoring the 10 padded positions,
    losing the padded window, shifting targets or windows by one, or a wrong logsumexp moves the loss
    by far more (1e-3 relative and up)."""
    cfg = ModelConfig(seq_len=16, dim=32, depth=2, heads=4, dim_head=8)
    model = PaLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 2)[:87], np.uint8)
    vocab = Vocab.build("byte", split)
    assert np.array_equal(vocab.encode(split), split)  # byte ids are the bytes
    raw, weights = data.split_windows(split, cfg.seq_len)
    tokens = vocab.encode(raw)
    batch_size = 4
    # 6 windows in batches of 4: the second batch is padded with 2 empty windows, and the last real
    # window scores only 86 - 5 * 16 = 6 of its 16 positions.
    assert len(tokens) == 6 and len(tokens) % batch_size
    assert batch_size % jax.local_device_count() == 0

    result = evaluate.score(evaluate.make_eval_step(model), parallel.replicate(params), tokens, weights, batch_size)

    # The reference, by hand.
    length, ids = cfg.seq_len, split.astype(np.int64)
    inputs = np.zeros((6, length), np.int64)
    targets = np.zeros((6, length), np.int64)
    scored = np.zeros((6, length), bool)
    for w in range(6):
        chunk = ids[w * length : w * length + length + 1]  # up to 17 bytes: 16 inputs, 16 targets
        inputs[w, : min(length, len(chunk))] = chunk[:length]
        targets[w, : len(chunk) - 1] = chunk[1:]
        scored[w, : len(chunk) - 1] = True
    assert scored.sum() == len(split) - 1 == 86 and scored[-1].sum() == 6
    logits, _ = model.apply({"params": params}, jnp.asarray(inputs, jnp.int32))
    logits = np.asarray(logits, np.float64)  # [6, 16, 256]
    top = logits.max(axis=-1)
    lse = top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    expected = nll[scored].sum() / scored.sum()

    assert result["tokens"] == int(scored.sum())
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / np.log(2), rel=1e-12)


# --- Windows of any length and stride (issue 10) -------------------------------------------------

def _tiny_model(variant="palm", seq_len=16, num_tokens=256):
    cfg = ModelConfig(variant=variant, seq_len=seq_len, dim=32, depth=2, heads=4, dim_head=8, num_tokens=num_tokens)
    model = PaLM(cfg)
    return cfg, model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))["params"]


def _old_split_windows(split, seq_len):
    """split_windows as it was before strides (git bb7f94f): the reference S = L must reproduce."""
    n_targets = len(split) - 1
    windows = -(-n_targets // seq_len)
    padded = np.zeros(windows * seq_len + 1, dtype=np.uint8)
    padded[: len(split)] = split
    tokens = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len]
    weights = (np.arange(windows * seq_len) < n_targets).reshape(windows, seq_len).astype(np.float32)
    return tokens, weights


def _old_score(p_eval, rparams, tokens, weights, batch_size):
    """evaluate.score as it was before strides (git bb7f94f), single process."""
    n = len(tokens)
    padded = -(-n // batch_size) * batch_size
    if padded != n:
        tokens = np.concatenate([tokens, np.zeros((padded - n, tokens.shape[1]), tokens.dtype)])
        weights = np.concatenate([weights, np.zeros((padded - n, weights.shape[1]), weights.dtype)])
    sums = [np.asarray(p_eval(rparams, parallel.shard(tokens[s : s + batch_size]),
                              parallel.shard(weights[s : s + batch_size]))).astype(np.float64).reshape(-1)
            for s in range(0, padded, batch_size)]
    total, count = np.array([np.sum(np.concatenate(sums)[:n]), np.sum(weights[:n])])
    loss = total / max(int(count), 1)
    return {"loss": loss, "bpc": loss / np.log(2), "tokens": int(count)}


def test_stride_equal_to_length_is_the_old_scoring_exactly():
    """S = L: the same windows through the same step, so the very same float64 numbers, not merely
    close ones. A char vocabulary makes the old path's padding (byte 0 encoded: the unknown id)
    differ from the new one's (id 0): padding comes after every scored target, so under causal
    attention it cannot change a scored loss, and the equality checks that too."""
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 3)[:151], np.uint8)
    vocab = Vocab.build("char", split)
    cfg, model, params = _tiny_model(num_tokens=vocab.size)
    p_eval, rparams = evaluate.make_eval_step(model), parallel.replicate(params)
    raw, old_weights = _old_split_windows(split, cfg.seq_len)
    old = _old_score(p_eval, rparams, vocab.encode(raw), old_weights, 8)
    tokens, weights = data.scoring_windows(vocab.encode(split), cfg.seq_len, cfg.seq_len)
    new = evaluate.score(p_eval, rparams, tokens, weights, 8, vocab.byte_lengths)
    assert len(tokens) == 10 and len(tokens) % 8  # a padded last window and a padded last batch
    assert new["tokens"] == new["bytes"] == old["tokens"] == 150
    assert new["loss"] == old["loss"] and new["bits_per_byte"] == old["bpc"]
    assert new["bits_per_byte"] == new["bits_per_token"] == old["bpc"]


@pytest.mark.parametrize("n, length, stride", [(23, 5, 5), (23, 5, 2), (23, 5, 1), (24, 5, 3), (26, 5, 3),
                                               (100, 16, 5), (4, 10, 3), (11, 10, 10), (12, 10, 4), (2, 3, 1)])
def test_windows_score_every_target_once(n, length, stride):
    """Ids 0..n-1 as tokens: the targets under weight 1 must be exactly 1..n-1, in order, each once
    (n not a multiple of S, L > n and L = n - 1 included); every window but the first scores only
    its last S positions, so each of those has at least L - S ids of context; the windows are
    strided views of one array, not copies."""
    ids = np.arange(n, dtype=np.int32)
    tokens, weights = data.scoring_windows(ids, length, stride)
    dense = weights[:]
    assert tokens.shape == (len(weights), length + 1) and dense.shape == weights.shape
    assert set(np.unique(dense)) <= {0.0, 1.0} and dense.sum() == n - 1
    np.testing.assert_array_equal(tokens[:, 1:][dense > 0], np.arange(1, n))
    np.testing.assert_array_equal(tokens[:, :-1][dense > 0], np.arange(0, n - 1))  # inputs stay aligned
    assert not dense[1:, : length - stride].any()
    assert tokens.strides[0] == stride * ids.itemsize or len(tokens) == 1  # row w starts w*S ids later
    np.testing.assert_array_equal(np.concatenate([weights[i : i + 3] for i in range(0, len(weights), 3)]), dense)
    if stride == length:  # the non-overlapping windows split_windows always gave
        old_tokens, old_weights = _old_split_windows(ids.astype(np.uint8), length)
        np.testing.assert_array_equal(tokens, old_tokens)
        np.testing.assert_array_equal(dense, old_weights)


@pytest.mark.parametrize("variant, length, stride", [("palm", 16, 5), ("palm", 8, 8), ("palm-lite", 32, 12),
                                                     ("gpt", 16, 3)])
def test_strided_score_equals_the_loss_over_the_same_windows(variant, length, stride):
    """evaluate.score with overlapping windows (lazy weights, batches padded with empty windows) must
    give what cross_entropy gives over the same windows and dense weights in one forward; at
    L = 2 x seq_len (palm-lite) the reference passes context=L, as scoring must. rel 1e-5 as in the
    test above; a weight one position off, or context left at seq_len, moves the loss by far more."""
    cfg, model, params = _tiny_model(variant)
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 3)[:131], np.uint8)
    tokens, weights = data.split_windows(split, length, stride)
    result = evaluate.score(evaluate.make_eval_step(model, context=length if length > cfg.seq_len else None),
                            parallel.replicate(params), tokens, weights, 4)
    logits, _ = model.apply({"params": params}, tokens[:, :-1], context=length)
    _, m = cross_entropy(logits, tokens[:, 1:], z_loss=0.0, weights=weights)
    assert result["tokens"] == int(m["count"]) == len(split) - 1
    assert result["loss"] == pytest.approx(float(m["nll_sum"]) / float(m["count"]), rel=1e-5)
    if length > cfg.seq_len:  # the sliding window of seq_len would be another number
        short, _ = model.apply({"params": params}, tokens[:, :-1])
        _, s = cross_entropy(short, tokens[:, 1:], z_loss=0.0, weights=weights)
        assert abs(float(s["nll_sum"]) - float(m["nll_sum"])) > 1e-3 * float(m["nll_sum"])


class _TwoByteVocab:
    """A vocabulary of 256 ids, each said to stand for two corpus bytes (as a SentencePiece piece may)."""

    size = 256
    byte_lengths = np.full(256, 2, np.int32)

    def encode(self, raw):
        return np.asarray(raw, np.int32)

    def unknown_count(self, raw):
        return 0


class _Reports:
    def __init__(self, root):
        self.root, self.written = root, {}

    def write_report(self, name, report):
        self.written[name] = json.loads(json.dumps(report))  # what the JSON file would hold
        return self.root / name


def test_report_gives_bits_per_byte_and_per_token(tmp_path, capsys):
    """eval_char.score with a vocabulary whose tokens cover two bytes each: bits per byte is half of
    bits per token (dividing by 2 is exact in floating point), bytes scored twice the tokens; the
    report holds L, S and both rates, and the printed line says them too."""
    import eval_char
    from mingpt_palm.config import EvalConfig, TrainConfig

    cfg, _, params = _tiny_model()
    train_cfg = TrainConfig(dataset_path="x", model=cfg)
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 3)[:101], np.uint8)
    corpus = data.Corpus(tmp_path / "x", None, split, split, split)
    exp = _Reports(tmp_path)
    eval_char.score(EvalConfig(experiment_name="e", batch_size=4, eval_seq_len=12, stride=5), exp, train_cfg,
                    _TwoByteVocab(), params, 7, corpus)
    report = exp.written["val.json"]
    assert (report["eval_seq_len"], report["stride"], report["seq_len"]) == (12, 5, 16)
    assert report["tokens_scored"] == 100 and report["bytes_scored"] == 200 and report["split_bytes"] == 101
    assert report["bits_per_byte"] == report["bits_per_token"] / 2 and "bpc" not in report
    assert report["bits_per_token"] == pytest.approx(report["loss_nats"] / np.log(2), rel=1e-12)
    assert 4 < report["bits_per_token"] < 12  # near log2(256) for an untrained model
    out = capsys.readouterr().out
    assert f"{report['bits_per_byte']:.4f} bits per byte" in out and "windows of 12 tokens advancing by 5" in out


def test_score_reports_progress_per_batch_only_when_asked(capsys):
    """evaluate.score tells `progress` the windows of each batch once they are scored; without it (training's
    periodic evaluation) it prints nothing."""
    _, model, params = _tiny_model()
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 3)[:131], np.uint8)
    tokens, weights = data.split_windows(split, 16, 16)
    p_eval, rparams = evaluate.make_eval_step(model), parallel.replicate(params)
    told = []
    evaluate.score(p_eval, rparams, tokens, weights, 4, progress=told.append)
    assert told == [4, 4, 1] and len(tokens) == 9
    evaluate.score(p_eval, rparams, tokens, weights, 4)
    assert capsys.readouterr() == ("", "")


def test_eval_scoring_shows_progress_on_stderr(tmp_path, capsys, monkeypatch):
    """eval_char's whole-split scoring: a line now and then on stderr (every LINE_INTERVAL_S, 0 here: after
    every batch) when stderr is not a terminal; stdout keeps only the report."""
    import eval_char
    from mingpt_palm import logs as progress
    from mingpt_palm.config import EvalConfig, TrainConfig

    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    cfg, _, params = _tiny_model()
    split = np.frombuffer((b"It was the best of times, it was the worst of times. " * 3)[:101], np.uint8)
    corpus = data.Corpus(tmp_path / "x", None, split, split, split)
    eval_char.score(EvalConfig(experiment_name="e", batch_size=4), _Reports(tmp_path),
                    TrainConfig(dataset_path="x", model=cfg), _TwoByteVocab(), params, 7, corpus)
    out, err = capsys.readouterr()
    assert err.splitlines() == ["scoring val: 4 of 7 windows (57%)", "scoring val: 7 of 7 windows (100%)"]
    assert "of 7 windows" not in out and "bits per byte" in out


def test_cli_overlapping_windows_report(experiment):
    """Through eval_char.py: L and S reach the report, every byte but the first is scored once at any
    stride, and --eval-seq-len 64 --stride 64 is the default (seq_len 64) scoring to the bit."""
    _score(experiment, "--split", "test")
    default = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    _score(experiment, "--split", "test", "--eval-seq-len", 64, "--stride", 64)
    same = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    assert same == default and (default["eval_seq_len"], default["stride"]) == (64, 64)
    _score(experiment, "--split", "test", "--eval-seq-len", 128, "--stride", 48)  # 2 x seq_len, rotary
    long = json.loads((experiment / "e" / "eval" / "test.json").read_text())
    assert (long["eval_seq_len"], long["stride"]) == (128, 48)
    assert long["tokens_scored"] == long["bytes_scored"] == 999
    assert long["bits_per_byte"] == pytest.approx(long["bits_per_token"], rel=1e-12)
    assert long["loss_nats"] != default["loss_nats"] and 0 < long["bits_per_byte"] < 8


def _refused(root, name, *args):
    proc = call_main("eval_char.py", "--experiments-dir", root, "--experiment-name", name, "--sample-steps", 0,
                     "--batch-size", 4, *args, cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    return proc.stderr


def test_cli_refuses_windows_it_cannot_score(experiment):
    assert "--stride 65 is longer than --eval-seq-len 64" in _refused(experiment, "e", "--eval-seq-len", 64,
                                                                       "--stride", 65)
    assert "--stride 100 is longer than the window (the model's seq_len, 64)" in _refused(experiment, "e",
                                                                                            "--stride", 100)
    assert "--stride 0 must be >= 1" in _refused(experiment, "e", "--stride", 0)
    assert "--eval-seq-len 0 must be >= 1" in _refused(experiment, "e", "--eval-seq-len", 0)
    assert "has 1,000 bytes, fewer than one window of --eval-seq-len + 1 = 1001" in _refused(
        experiment, "e", "--split", "test", "--eval-seq-len", 1000)


def test_cli_refuses_long_windows_for_learned_positions(tmp_path):
    """gpt (learned absolute positions, a table of seq_len rows) cannot score past seq_len: one line
    that names the schemes that can, exit 2, no report written."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_bytes((b"It was the best of times, it was the worst of times. " * 400)[:20_000])
    main_ok("train_char.py", "--dataset-path", corpus, "--experiments-dir", tmp_path, "--experiment-name", "g",
            *TINY, "--model.variant", "gpt", "--max-steps", 2, "--checkpoint-interval", 2, "--eval-interval", 0,
            cwd=tmp_path)
    line = _refused(tmp_path, "g", "--eval-seq-len", 128)
    assert "scoring windows longer than seq_len needs a position scheme that extends (alibi, t5, rotary)" in line
    assert "this model uses learned positions up to 64" in line
    assert not (tmp_path / "g" / "eval").exists() or not any((tmp_path / "g" / "eval").iterdir())
    scored = main_ok("eval_char.py", "--experiments-dir", tmp_path, "--experiment-name", "g", "--sample-steps", 0,
                     "--batch-size", 4, "--eval-seq-len", 64, "--stride", 16, cwd=tmp_path)
    assert "windows of 64 tokens advancing by 16" in scored.stdout
