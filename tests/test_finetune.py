"""--init-from: a new experiment that starts from another's parameters (fine-tuning), with its own step
count, optimizer and schedule, on the source's corpus or another one; and the cases it refuses."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import SHAKESPEARE, TINY, call_main, load_state, main_ok
from test_reliability import assert_unchanged, assert_user_error, snapshot


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """experiments/X: 4 steps of the TINY model with a char vocabulary on a copy of the Shakespeare fixture. Its seed
    is not the default, so that parameters initialised afresh by a run started from it (seed 0) are far
    from X's, not X's minus 4 small steps."""
    root = tmp_path_factory.mktemp("finetune")
    shutil.copy(SHAKESPEARE, root / "corpus.txt")
    main_ok("train_char.py", "--dataset-path", "corpus.txt", "--experiment-name", "X", "--data.tokenizer", "char",
            *TINY, "--max-steps", 4, "--checkpoint-interval", 4, "--eval-interval", 0, "--seed", 1, cwd=root)
    return root


def lr_of_first_update() -> float:
    """The learning rate of update 1 of a fresh run of TINY's optimizer settings with --max-steps 1."""
    from mingpt_palm.config import OptimizerConfig
    from mingpt_palm.optim import lr_schedule

    lr = float(TINY[TINY.index("--optim.learning-rate") + 1])
    warmup = int(TINY[TINY.index("--optim.warmup-steps") + 1])
    return float(lr_schedule(OptimizerConfig(learning_rate=lr, warmup_steps=warmup), 1)(0))


def test_starts_from_the_source_parameters_with_a_fresh_optimizer(source):
    proc = main_ok("train_char.py", "--init-from", "experiments/X", "--experiment-name", "Y", *TINY, "--max-steps", 1,
                   "--eval-interval", 0, cwd=source)
    assert "init: parameters from experiments/X step 4 (step 0 here, fresh optimizer and schedule)" in proc.stdout
    assert "experiment: experiments/Y (new); steps 0 -> 1" in proc.stdout
    x, y = load_state(source / "experiments" / "X"), load_state(source / "experiments" / "Y")
    assert int(x["step"]) == 4 and int(y["step"]) == 1  # Y counts its own steps from 0
    # Update 1 of a fresh Adam is lr * (g / |g| + weight_decay * w) per weight: bias-corrected m / sqrt(v)
    # is exactly the sign of the gradient (up to eps = 1e-8 against gradients far larger), and its
    # schedule is at update 1. So every weight of Y's step 1 lies within lr_1 * (1 + wd |w|) of X's:
    # re-initialised weights (O(0.1) away) fail this. And the undecayed norm scales, whose gradients are
    # never zero, move by exactly lr_1: Adam moments carried over from X (their ratio is no sign), or
    # X's schedule continued (update 5 of a 1-step plan: the floor, lr / 10), fail that. rtol 1e-3 covers
    # float32 rounding of weights near 1 (1.2e-7 against lr_1 = 3e-3).
    lr1, wd = lr_of_first_update(), 0.1
    for path, xw in jax.tree_util.tree_leaves_with_path(x["params"]):
        yw = np.asarray(_at(y["params"], path))
        assert np.all(np.abs(yw - xw) <= lr1 * (1 + wd * np.abs(xw)) * (1 + 1e-3)), jax.tree_util.keystr(path)
    moved = np.abs(np.asarray(y["params"]["final_norm"]["scale"]) - np.asarray(x["params"]["final_norm"]["scale"]))
    np.testing.assert_allclose(moved, lr1, rtol=1e-3)
    # Y's own records: the source and step it began from, X's vocabulary, X's corpus by default.
    exp_y, exp_x = source / "experiments" / "Y", source / "experiments" / "X"
    config = json.loads((exp_y / "config.json").read_text())
    assert config["init_from"] == "experiments/X"
    first = json.loads((exp_y / "history.jsonl").read_text().splitlines()[0])
    assert first["init_from"] == {"experiment": str(exp_x.resolve()), "step": 4} and first["step"] == 0
    assert (exp_y / "vocab.json").read_text() == (exp_x / "vocab.json").read_text()
    assert json.loads((exp_y / "corpus.json").read_text())["path"] == str((source / "corpus.txt").resolve())


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_another_corpus_maps_bytes_outside_the_vocabulary_to_unknown(source, tmp_path):
    symbols = set(json.loads((source / "experiments" / "X" / "vocab.json").read_text())["symbols"])
    text = ("Ünïcödé and tildes ~ are not in Shakespeare; the rest of this line is. " * 60).encode()
    (tmp_path / "other.txt").write_bytes(text)
    outside = sum(b not in symbols for b in text)
    assert outside > 0
    shutil.copytree(source / "experiments", tmp_path / "experiments")
    # dropout is one of the settings a fine-tuning run may change.
    proc = main_ok("train_char.py", "--init-from", "experiments/X", "--experiment-name", "Z", "--dataset-path",
                   "other.txt", *TINY, "--model.dropout", 0.1, "--max-steps", 2, "--eval-interval", 0, cwd=tmp_path)
    assert (f"{outside:,} of this corpus's {len(text):,} bytes ({100 * outside / len(text):.2f}%) are outside it and "
            "become the unknown id") in proc.stdout
    exp = tmp_path / "experiments" / "Z"
    assert json.loads((exp / "corpus.json").read_text())["path"] == str((tmp_path / "other.txt").resolve())
    assert (exp / "vocab.json").read_text() == (tmp_path / "experiments" / "X" / "vocab.json").read_text()
    assert json.loads((exp / "config.json").read_text())["model"]["dropout"] == 0.1
    # Continuing a fine-tuned experiment is an ordinary resume: it does not start from X again.
    proc = main_ok("train_char.py", "--experiment-name", "Z", "--restore-checkpoint", "--max-steps", 3, cwd=tmp_path)
    assert "restored from step 2" in proc.stdout and "init:" not in proc.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--init-from", "experiments/nope"], ["--init-from experiments/nope: no experiment 'nope' in experiments/"]),
    (["--init-from", "experiments/empty"], ["--init-from experiments/empty:", "holds no checkpoint"]),
    (["--init-from", "experiments/X", "--model.dim", "32"], ["--model.dim 32 (it has 64)", "keeps its architecture"]),
    (["--init-from", "experiments/X", "--data.tokenizer", "byte"], ["--data.tokenizer 'byte' (it has 'char')"]),
    # A fine-tune's own command line with --restore-checkpoint continues the experiment it made (here X,
    # at its end already): --init-from then only records how it began.
    (["--init-from", "experiments/X", "--experiment-name", "X", "--restore-checkpoint"],
     ["experiments/X is at step 4, and --max-steps is 2: nothing to train"]),
    (["--init-from", "experiments/X", "--preset", "gpt2-small"], ["--preset and --init-from both choose the model"]),
])
def test_refusals_change_nothing(source, tmp_path, args, fragments):
    shutil.copytree(source / "experiments", tmp_path / "experiments")
    (tmp_path / "experiments" / "empty").mkdir()
    shutil.copy(tmp_path / "experiments" / "X" / "config.json", tmp_path / "experiments" / "empty" / "config.json")
    shutil.copy(source / "corpus.txt", tmp_path / "corpus.txt")
    before = snapshot(tmp_path)
    name = [] if "--experiment-name" in args else ["--experiment-name", "new"]
    proc = call_main("train_char.py", *TINY, "--max-steps", 2, *name, *args, cwd=tmp_path)
    assert_user_error(proc, *fragments)
    assert_unchanged(before, snapshot(tmp_path))
