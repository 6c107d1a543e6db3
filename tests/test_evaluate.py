"""Whole-split scoring through eval_char.py."""

import json

import pytest

from conftest import TINY, run_cli


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
