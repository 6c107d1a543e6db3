"""Tokenizers: sentencepiece round trips on Shakespeare and on generated XML, bits per byte from bytes, and the
experiment that stores the tokenizer (train, eval, resume, an old config, a damaged model file)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import SHAKESPEARE, TINY, call_main, leaves, load_state, main_ok, read_scalars, xml_text
from test_reliability import assert_unchanged, assert_user_error, snapshot


def splits(path):
    """train / val / test of a file as load_corpus cuts it (90/5/5)."""
    from mingpt_palm import data
    from mingpt_palm.config import DataConfig

    c = data.load_corpus(str(path), DataConfig(), progress=False)
    return c.train, c.val, c.test


def learn(train, vocab_size=512, budget=300_000, seed=0, model_type="bpe"):
    from mingpt_palm.config import DataConfig
    from mingpt_palm.tokenizers import SentencePieceVocab

    cfg = DataConfig(tokenizer="sentencepiece", vocab_size=vocab_size, sp_train_bytes=budget,
                     sp_model_type=model_type)
    return SentencePieceVocab.train(train, cfg, seed)


def odd_bytes() -> bytes:
    """Bytes sentencepiece would not give back on its own: NUL, control characters, CR LF, U+2581 (its
    space marker), invalid and truncated UTF-8, a lone continuation byte, runs of spaces at the ends, a
    line longer than the 64 KiB cap on what it is handed at once, and 4 KiB of random bytes."""
    rng = np.random.default_rng(0)
    return (b"\x00\x01\x7f \t\r\n  lead and trail  \n"
            + "\u2581x \u2581\u2581 caf\u00e9 \u65e5\u672c \U0001f600\n".encode() + b"\xe2\x96 \xff\xfe\x80 \xc3\n" + b"no newline for a while " * 4000
            + bytes(rng.integers(0, 256, 4096, dtype=np.uint8)) + b"\n\n")


@pytest.fixture(scope="module")
def xml_corpus(tmp_path_factory):
    """Generated MediaWiki-like XML (conftest.xml_text, 407,553 bytes): markup and UTF-8 in several scripts,
    lines of up to 3.6 KB; its train split holds 366,799 bytes."""
    path = tmp_path_factory.mktemp("xml") / "wiki.xml"
    path.write_bytes(xml_text())
    return path


def assert_exact(vocab, raw) -> np.ndarray:
    ids = vocab.encode(np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert vocab.decode(ids) == bytes(raw)
    assert int(vocab.byte_lengths[ids].sum()) == len(raw)  # every byte is covered by exactly one token
    return ids


@pytest.mark.parametrize("corpus", ["shakespeare", "xml"])
def test_sentencepiece_round_trip_is_byte_exact_on_text(corpus, xml_corpus):
    """Learned from one corpus's train split, exact on its val and test splits, on the other corpus (UTF-8
    it never saw, for a model learned on ASCII Shakespeare) and on bytes no text has."""
    paths = {"shakespeare": SHAKESPEARE, "xml": xml_corpus}
    train, val, test = splits(paths[corpus])
    vocab = learn(train)
    assert vocab.size == 512 and vocab.unknown_count(val) == 0
    other = splits(paths["xml" if corpus == "shakespeare" else "shakespeare"])[1]
    for raw in (test, other, odd_bytes(), b"", b"\n", b"x"):
        assert_exact(vocab, raw)
    # Sub-words, not bytes: 1.9 bytes per token for 512 pieces on Shakespeare, 2.6 on the generated XML.
    assert len(val) / len(assert_exact(vocab, val)) > 1.4


def test_chunked_encoding_gives_the_ids_of_the_whole(monkeypatch, xml_corpus):
    """Long splits are encoded in pieces cut after a newline; a newline is always a token of its own, so
    the ids are those of the whole text encoded at once."""
    from mingpt_palm import tokenizers

    train, val, _ = splits(xml_corpus)
    vocab = learn(train)
    whole = vocab.encode(val)
    monkeypatch.setattr(tokenizers, "_CHUNK", 5000)  # the 20,377-byte val split in 5 pieces
    assert np.array_equal(vocab.encode(val), whole)
    assert_exact(vocab, odd_bytes())  # no newline for 90 KB: cut at a character start, still exact


def test_training_sample_is_whole_lines_drawn_by_seed(xml_corpus):
    from mingpt_palm.tokenizers import training_lines

    train, _, _ = splits(xml_corpus)
    lines = set(bytes(train).split(b"\n"))
    runs, drawn = training_lines(train, 200_000, seed=0)
    assert 200_000 <= drawn < 200_000 + 4000  # stops at the line that crosses the budget (lines < 3.6 KB)
    assert all(run.encode() in lines for run in runs if "\u2581" not in run)
    assert training_lines(train, 200_000, seed=0)[0] == runs
    assert training_lines(train, 200_000, seed=1)[0] != runs
    whole, n = training_lines(train, 10**9, seed=0)  # a budget beyond the split: all of it, in order
    assert n == len(train) and whole == [line.decode() for line in bytes(train).split(b"\n") if line]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_learning_is_deterministic(model_type):
    """Each process of a job learns its own tokenizer: the same bytes and settings must give the same model."""
    train, val, _ = splits(SHAKESPEARE)
    # 40 KB of the 89,859-byte train split: another seed draws other lines.
    vocab = learn(train, budget=40_000, model_type=model_type)
    assert learn(train, budget=40_000, model_type=model_type).sha256 == vocab.sha256
    assert learn(train, budget=40_000, model_type=model_type, seed=1).sha256 != vocab.sha256  # other lines
    assert_exact(vocab, val)


def test_bits_per_byte_are_counted_in_bytes_not_tokens():
    """Hand-made: "aaaa b" is two tokens of 4 and 2 bytes. With every token costing 1 nat, a window of the
    ids [aaaa, ▁b, aaaa, ▁b, aaaa] scores 4 targets (▁b, aaaa, ▁b, aaaa) = 4 nats over 2 + 4 + 2 + 4 = 12
    bytes: 1/3 nat per byte, 1 nat per token."""
    import jax.numpy as jnp

    from mingpt_palm import evaluate

    vocab = learn(np.frombuffer(b"aaaa b aaaa b\n" * 2000, np.uint8), vocab_size=264)
    ids = vocab.encode(np.frombuffer(b"aaaa baaaa baaaa", np.uint8))
    assert [vocab.decode([i]) for i in ids] == [b"aaaa", b" b", b"aaaa", b" b", b"aaaa"]
    assert vocab.byte_lengths[ids].tolist() == [4, 2, 4, 2, 4]

    def one_nat_each(params, tokens, weights):
        return jnp.sum(jnp.asarray(weights), axis=-1)

    tokens = np.tile(ids, (4, 1))  # 4 windows (one per simulated device) of the same 5 ids
    result = evaluate.score(one_nat_each, None, tokens, np.ones((4, 4), np.float32), 4, vocab.byte_lengths)
    assert result["tokens"] == 16 and result["bytes"] == 48
    assert result["bits_per_token"] == pytest.approx(1 / math.log(2), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(16 / 48 / math.log(2), rel=1e-12)


def test_the_cache_of_a_split_is_read_back_and_a_damaged_one_ignored(tmp_path):
    train, val, _ = splits(SHAKESPEARE)
    vocab = learn(train)
    vocab.cache_dir = tmp_path
    assert vocab.cached(val) is None
    ids = vocab.encode(val)
    np.save(vocab.cache_file(val), ids)
    back = vocab.cached(val)
    assert isinstance(back, np.memmap) and np.array_equal(back, ids) and vocab.encode(val) is not None
    assert vocab.cached(val[:-1]) is None  # other bytes, another file
    vocab.cache_file(val).write_bytes(vocab.cache_file(val).read_bytes()[:200])  # truncated
    assert vocab.cached(val) is None and np.array_equal(vocab.encode(val), ids)


def test_a_vocab_size_too_small_for_the_text_is_one_clear_error():
    from mingpt_palm.config import DataConfig, TrainConfig
    from mingpt_palm.errors import UserError
    from mingpt_palm.settings import validate_train

    with pytest.raises(UserError, match=r"--data.vocab-size 200 must be more than 257"):  # before any data is read
        validate_train(TrainConfig(data=DataConfig(tokenizer="sentencepiece", vocab_size=200)))
    validate_train(TrainConfig(data=DataConfig(tokenizer="byte", vocab_size=200)))  # unused by bytes

    train, _, _ = splits(SHAKESPEARE)
    with pytest.raises(UserError, match=r"--data.vocab-size 300 is too small for this corpus: it needs at least 3\d\d "
                                        r"\(256 byte pieces, the unknown id and \d+ characters"):
        learn(train, vocab_size=300)
    with pytest.raises(UserError, match=r"--data.vocab-size 600 is more pieces than 28,000 bytes of training lines "
                                        r"hold: at most 2\d\d; pass --data.vocab-size 2\d\d or less"):
        learn(np.frombuffer(b"aaaa b aaaa b\n" * 2000, np.uint8), vocab_size=600)


def test_a_config_of_another_format_is_refused_and_a_missing_setting_is_named():
    """config.json carries a format number: a file of an earlier build (no number) is refused in one
    line rather than half read; within the format, what defines the run must be there, and a setting
    that does not (one added later) takes its default."""
    from mingpt_palm import settings
    from mingpt_palm.config import TrainConfig

    saved = settings.to_json(TrainConfig())
    with pytest.raises(ValueError, match=r"it is format None, written by another build of mingpt-palm; this one "
                                         r"reads format 1"):
        settings.from_json({k: v for k, v in saved.items() if k != "format"})
    del saved["data"]["tokenizer"], saved["log_interval"]
    with pytest.raises(ValueError, match=r"^lacks data.tokenizer$"):
        settings.from_json(saved)
    saved["data"]["tokenizer"] = "char"
    assert settings.from_json(saved).log_interval == TrainConfig.log_interval


# --- through the command line --------------------------------------------------------------------------

SP = ["--data.tokenizer", "sentencepiece", "--data.vocab-size", 512, "--data.sp-train-bytes", 300_000]


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory):
    """experiments/sp: 6 steps of a 512-piece sentencepiece run on a private copy of the Shakespeare fixture
    (checkpoints 3 and 6, validation at 6, every step logged)."""
    root = tmp_path_factory.mktemp("sp")
    shutil.copy(SHAKESPEARE, root / "corpus.txt")
    proc = main_ok("train_char.py", "--dataset-path", "corpus.txt", "--experiment-name", "sp", *TINY, *SP,
                   "--max-steps", 6, "--checkpoint-interval", 3, "--eval-interval", 6, "--log-interval", 1,
                   "--keep-checkpoints", 5, cwd=root)
    return root, proc


def work_copy(sp_run, tmp_path):
    """The experiment and its corpus copied into tmp_path, config.json and corpus.json pointing at the copy."""
    root = sp_run[0]
    shutil.copy(root / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copytree(root / "experiments", tmp_path / "experiments")
    exp = tmp_path / "experiments" / "sp"
    for name, key in (("config.json", "dataset_path"), ("corpus.json", "path")):
        record = json.loads((exp / name).read_text())
        (exp / name).write_text(json.dumps(record | {key: str(tmp_path / "corpus.txt")}))
    return exp


def experiment_vocab(exp):
    from mingpt_palm.experiment import Experiment

    return Experiment(exp.parent, exp.name).read_vocab(512)


def test_train_with_sentencepiece_stores_the_tokenizer_and_logs_bits_per_byte(sp_run):
    root, proc = sp_run
    exp = root / "experiments" / "sp"
    assert "vocab sentencepiece (512)" in proc.stdout and "tokenizer: sentencepiece bpe, 512 pieces" in proc.stdout
    assert json.loads((exp / "config.json").read_text())["data"]["tokenizer"] == "sentencepiece"
    record = json.loads((exp / "vocab.json").read_text())
    assert record["kind"] == "sentencepiece" and record["size"] == 512 and (exp / "tokenizer.model").is_file()
    assert len(list((exp / "tokens").glob("*.npy"))) == 2  # train and val, encoded once

    from mingpt_palm import data

    vocab = experiment_vocab(exp)
    train, val, _ = splits(root / "corpus.txt")
    train_ids, val_ids = vocab.cached(train), vocab.cached(val)
    vocab.cache_dir = None
    assert np.array_equal(train_ids, vocab.encode(train)) and np.array_equal(val_ids, vocab.encode(val))
    scalars = {tag: dict(values) for tag, values in read_scalars(exp / "tb").items()}
    # val/bpc is bits per byte: val/bits_per_token x tokens / bytes of the fixed validation windows (8 x 8 x 64).
    windows = np.concatenate([data.get_batch(val_ids, 0, i, 8, 64, stream=data.EVAL_STREAM) for i in range(8)])
    per_token = windows[:, 1:].size / vocab.byte_lengths[windows[:, 1:]].sum()
    assert scalars["val/bpc"][6] == pytest.approx(scalars["val/bits_per_token"][6] * per_token, rel=1e-6)
    assert 1.4 < 1 / per_token < 2.5  # bytes per token of 512 pieces on Shakespeare
    # The same for training: step 1's batch is batch 0 of the train ids.
    batch = data.get_batch(train_ids, 0, 0, 8, 64)
    ratio = batch[:, 1:].size / vocab.byte_lengths[batch[:, 1:]].sum()
    assert scalars["train/bpc"][1] == pytest.approx(scalars["train/bits_per_token"][1] * ratio, rel=1e-6)


def test_eval_samples_and_scores_a_sentencepiece_experiment_without_flags(sp_run, tmp_path):
    exp = work_copy(sp_run, tmp_path)
    out = main_ok("eval_char.py", "--experiment-name", "sp", "--sample-steps", 12, "--batch-size", 8,
                  "--prompt", "ROMEO: caf\u00e9 \u2581", cwd=tmp_path)
    raw = out.stdout.encode("utf-8", "surrogateescape")
    assert "ROMEO: caf\u00e9 \u2581".encode() in raw and b"=== sample 1 of 1: 12 tokens, " in raw
    report = json.loads((exp / "eval" / "val.json").read_text())
    vocab = experiment_vocab(exp)
    _, val, _ = splits(tmp_path / "corpus.txt")
    first = vocab.byte_lengths[vocab.encode(val)[0]]
    assert report["split_bytes"] == len(val) and report["bytes_scored"] == len(val) - first
    assert report["tokens_scored"] == report["split_tokens"] - 1 < report["bytes_scored"]
    assert report["bits_per_byte"] == pytest.approx(
        report["loss_nats"] * report["tokens_scored"] / report["bytes_scored"] / math.log(2), rel=1e-9)


def test_resume_of_a_sentencepiece_run_is_bit_exact(sp_run, tmp_path):
    """From step 3 with no flags: the saved tokenizer and the cached ids come back (nothing is learned or
    encoded again), and steps 4-6 end bit for bit where the uninterrupted run did."""
    exp = work_copy(sp_run, tmp_path)
    proc = main_ok("train_char.py", "--experiment-name", "sp", "--restore-step", 3, cwd=tmp_path)
    assert "restored from step 3" in proc.stdout
    assert "tokenizer: learning" not in proc.stdout and "tokenizer: encoding" not in proc.stdout
    ref = sp_run[0] / "experiments" / "sp"
    for a, b in zip(leaves(load_state(ref, 6)), leaves(load_state(exp, 6)), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    ref_loss = dict(read_scalars(ref / "tb")["train/loss"])
    logged = read_scalars(exp / "tb")["train/loss"]  # the copied run's event file, then the resumed one's
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6, 4, 5, 6] and all(v == ref_loss[s] for s, v in logged)


def test_resume_refuses_another_vocab_size(sp_run, tmp_path):
    work_copy(sp_run, tmp_path)
    before = snapshot(tmp_path)
    proc = call_main("train_char.py", "--experiment-name", "sp", "--restore-checkpoint", "--max-steps", 8,
                     "--data.vocab-size", 1024, cwd=tmp_path)
    assert_user_error(proc, "data.vocab_size: 512 saved vs 1024 given")
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("how, fragment", [
    ("missing", "tokenizer.model is missing: it holds the sentencepiece model"),
    ("damaged", "tokenizer.model is damaged (its sha256 is not the"),
])
@pytest.mark.parametrize("script", [
    ["train_char.py", "--experiment-name", "sp", "--restore-checkpoint", "--max-steps", 8],
    ["eval_char.py", "--experiment-name", "sp", "--sample-steps", 4],
], ids=["resume", "eval"])
def test_a_missing_or_damaged_tokenizer_model_is_one_clear_line(sp_run, tmp_path, how, fragment, script):
    exp = work_copy(sp_run, tmp_path)
    model = exp / "tokenizer.model"
    if how == "missing":
        model.unlink()
    else:
        damaged = bytearray(model.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        model.write_bytes(bytes(damaged))
    before = snapshot(tmp_path)
    assert_user_error(call_main(*script, cwd=tmp_path), fragment, "restore it from a backup")
    assert_unchanged(before, snapshot(tmp_path))
