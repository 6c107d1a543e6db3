import json

import numpy as np
import pytest

from mingpt_palm.vocab import Vocab
from mingpt_palm import data
from mingpt_palm.config import DataConfig
from mingpt_palm.errors import UserError


def _corpus(tmp_path, n, **kw):
    path = tmp_path / "c.txt"
    path.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, n, dtype=np.uint8)))
    return data.load_corpus(str(path), DataConfig(datasets_dir=str(tmp_path / "ds"), **kw), progress=False)


def test_split_boundaries(tmp_path):
    c = _corpus(tmp_path, 1000)
    assert (len(c.train), len(c.val), len(c.test)) == (900, 50, 50)
    raw = np.fromfile(c.path, np.uint8)
    np.testing.assert_array_equal(np.concatenate([c.train, c.val, c.test]), raw)
    assert isinstance(c.train, np.memmap)
    c = _corpus(tmp_path, 1000, val_fraction=0.1, test_fraction=0.2)
    assert (len(c.train), len(c.val), len(c.test)) == (700, 100, 200)


def test_standard_split_for_registered_corpus(tmp_path, monkeypatch):
    from mingpt_palm import download

    path = tmp_path / "ds" / "toy" / "toy"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 100)
    toy = download.Source("toy", "http://127.0.0.1:9/toy", "0" * 64, 100, None, (80, 15, 5))
    monkeypatch.setitem(download.CORPORA, "toy", toy)
    c = data.load_corpus("toy", DataConfig(datasets_dir=str(tmp_path / "ds")), progress=False)
    assert (len(c.train), len(c.val), len(c.test)) == (80, 15, 5)
    assert c.registered == toy


def test_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    c = _corpus(tmp_path, 5000)
    a = data.get_batch(c.train, seed=1, step=7, global_batch=8, seq_len=16)
    b = data.get_batch(c.train, seed=1, step=7, global_batch=8, seq_len=16)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 17) and a.dtype == np.uint8
    assert not np.array_equal(a, data.get_batch(c.train, seed=1, step=8, global_batch=8, seq_len=16))
    assert not np.array_equal(a, data.get_batch(c.train, seed=2, step=7, global_batch=8, seq_len=16))
    # every row is a real window of the split
    raw = np.asarray(c.train).tobytes()
    assert all(row.tobytes() in raw for row in a)


def test_process_slices_are_disjoint_and_form_the_global_batch(tmp_path):
    c = _corpus(tmp_path, 5000)
    whole = data.get_batch(c.train, 3, 11, 8, 16)
    parts = [data.get_batch(c.train, 3, 11, 8, 16, process_index=p, process_count=2) for p in range(2)]
    assert all(p.shape == (4, 17) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_split_windows_predict_every_byte_once():
    split = np.arange(23, dtype=np.uint8)
    tokens, weights = data.split_windows(split, 5)
    assert tokens.shape == (5, 6) and weights.shape == (5, 5)
    targets = tokens[:, 1:][weights > 0]
    np.testing.assert_array_equal(targets, split[1:])  # every byte but the first, exactly once
    np.testing.assert_array_equal(tokens[:, :-1][weights > 0], split[:-1])


def test_char_vocab():
    train = np.frombuffer(b"abcabc", np.uint8)
    v = Vocab.build("char", train)
    assert v.size == 4 and v.unk_id == 3
    np.testing.assert_array_equal(v.encode(np.frombuffer(b"cab!", np.uint8)), [2, 0, 1, 3])
    assert v.decode([0, 1, 2, 3]) == b"abc?"
    assert v.unknown_count(np.frombuffer(b"a!!b", np.uint8)) == 2
    w = Vocab.from_json(json.loads(json.dumps(v.to_json())))  # as vocab.json stores it
    np.testing.assert_array_equal(w.encode(np.arange(256, dtype=np.uint8)), v.encode(np.arange(256, dtype=np.uint8)))
    b = Vocab.build("byte", train)
    assert b.size == 256 and b.decode(b.encode(np.frombuffer(b"hi\xff", np.uint8))) == b"hi\xff"


def test_too_small_split_is_a_clear_error(tmp_path):
    c = _corpus(tmp_path, 400)
    with pytest.raises(UserError, match="val split .* 20 bytes, fewer than one window of block size \\+ 1 = 65"):
        data.require_windows(c.val, "val", 64, c.path)


def test_batches_reach_both_ends_of_a_split_and_never_cross_it(tmp_path):
    """A train split only 4 bytes longer than one window of seq_len + 1 holds exactly 4 windows,
    starting at 0..3. Over many steps the sampler must draw every one of them, the first (offset 0)
    and the last (ending at the split's last byte) included, and only them: an off-by-one in the
    range of offsets either never draws the last window or reads past the split's end (into the
    validation bytes that follow it on disk, or out of the array)."""
    seq_len, extra = 12, 3
    path = tmp_path / "ramp.txt"
    path.write_bytes(bytes(range(20)))  # every byte distinct: a window's first byte is its offset
    c = data.load_corpus(str(path), DataConfig(datasets_dir=str(tmp_path / "ds"), val_fraction=0.1,
                                               test_fraction=0.1), progress=False)
    assert len(c.train) == seq_len + 1 + extra  # 16 bytes: 0..15; val holds 16, 17
    offsets = set()
    for step in range(200):
        batch = data.get_batch(c.train, seed=0, step=step, global_batch=4, seq_len=seq_len)
        for row in batch:
            np.testing.assert_array_equal(row, np.arange(row[0], row[0] + seq_len + 1))  # contiguous
            assert row[-1] < len(c.train), f"window {row.tolist()} crosses the end of the split"
            offsets.add(int(row[0]))
    # 800 draws from 4 windows: missing one by chance has probability 4 * (3/4)^800, about 1e-100.
    assert offsets == set(range(extra + 1)), sorted(offsets)
