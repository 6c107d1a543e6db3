"""Guards around an experiment directory: one run at a time, damaged records, a changed corpus, never a
non-finite checkpoint, nothing left behind by a run that never started."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SHAKESPEARE, TINY, call_main, cli_env, leaves, load_state, main_ok, steps_in
from test_reliability import assert_unchanged, assert_user_error, snapshot


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """experiments/base trained on a private copy of the Shakespeare fixture (checkpoints 5 and 10)."""
    root = tmp_path_factory.mktemp("guards")
    shutil.copy(SHAKESPEARE, root / "corpus.txt")
    main_ok("train_char.py", "--dataset-path", "corpus.txt", "--experiment-name", "base", *TINY, "--max-steps", 10,
            "--checkpoint-interval", 5, "--eval-interval", 0, cwd=root)
    return root


def work_copy(base, tmp_path):
    shutil.copy(base / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copytree(base / "experiments", tmp_path / "experiments")
    exp = tmp_path / "experiments" / "base"
    config = json.loads((exp / "config.json").read_text())
    config["dataset_path"] = str(tmp_path / "corpus.txt")  # the copy's own corpus
    (exp / "config.json").write_text(json.dumps(config))
    corpus = json.loads((exp / "corpus.json").read_text())
    (exp / "corpus.json").write_text(json.dumps(corpus | {"path": str(tmp_path / "corpus.txt")}))
    return exp


RESUME = ["train_char.py", "--experiment-name", "base", "--restore-checkpoint", "--max-steps", 12]
EVAL = ["eval_char.py", "--experiment-name", "base", "--sample-steps", 4]


def _damage_config(exp, how):
    path = exp / "config.json"
    config = json.loads(path.read_text())
    if how == "not json":
        path.write_text('{"model": {"dim": 64,')
    elif how == "lacks model":
        del config["model"]
        path.write_text(json.dumps(config))
    elif how == "wrong type":
        config["model"]["depth"] = "two"
        path.write_text(json.dumps(config))


@pytest.mark.parametrize("how, fragment", [
    ("not json", "config.json is damaged (JSONDecodeError"),
    ("lacks model", "config.json is damaged (lacks model)"),
    ("wrong type", "config.json is damaged (model.depth is 'two' (expected int))"),
])
@pytest.mark.parametrize("script", [RESUME, EVAL], ids=["resume", "eval"])
def test_a_damaged_config_json_is_named_not_the_checkpoints(base, tmp_path, how, fragment, script):
    exp = work_copy(base, tmp_path)
    _damage_config(exp, how)
    before = snapshot(tmp_path)
    proc = call_main(*script, cwd=tmp_path)
    line = assert_user_error(proc, fragment, "the first record of history.jsonl there holds the settings")
    assert "unreadable" not in proc.stderr, line
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("script", [RESUME, EVAL], ids=["resume", "eval"])
def test_a_config_json_of_another_format_is_refused_not_half_read(base, tmp_path, script):
    """config.json from an earlier build (no "format", as before format 1) names the format it holds and the
    one this build reads, instead of reading fields whose meaning may have changed."""
    exp = work_copy(base, tmp_path)
    config = json.loads((exp / "config.json").read_text())
    del config["format"]
    (exp / "config.json").write_text(json.dumps(config))
    before = snapshot(tmp_path)
    assert_user_error(call_main(*script, cwd=tmp_path), "config.json cannot be read: it is format None, written by "
                      "another build of mingpt-palm; this one reads format 1; continue or evaluate this experiment "
                      "with the build that made it")
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("how, fragment", [
    ("missing", "vocab.json is missing"),
    ("inconsistent", "vocab.json describes 3 tokens but the model in config.json has num_tokens 256"),
])
@pytest.mark.parametrize("script", [RESUME, EVAL], ids=["resume", "eval"])
def test_a_missing_or_inconsistent_vocab_json(base, tmp_path, how, fragment, script):
    exp = work_copy(base, tmp_path)
    if how == "missing":
        (exp / "vocab.json").unlink()
    else:
        (exp / "vocab.json").write_text(json.dumps({"kind": "char", "symbols": [97, 98]}))
    before = snapshot(tmp_path)
    assert_user_error(call_main(*script, cwd=tmp_path), fragment)
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("how", ["changed", "gone"])
@pytest.mark.parametrize("script", [RESUME, EVAL], ids=["resume", "eval"])
def test_a_changed_or_vanished_corpus_stops_resume_and_eval(base, tmp_path, how, script):
    work_copy(base, tmp_path)
    corpus = tmp_path / "corpus.txt"
    if how == "changed":
        data = bytearray(corpus.read_bytes())
        data[1000] ^= 1  # one bit: the size alone would not tell
        corpus.write_bytes(bytes(data))
        fragment = f"the corpus experiments/base was trained on has changed: {corpus} is now 99,843 bytes"
    else:
        corpus.unlink()
        fragment = f"the corpus experiments/base was trained on is gone: {corpus} is not a file any more"
    before = snapshot(tmp_path)
    assert_user_error(call_main(*script, cwd=tmp_path), fragment)
    assert_unchanged(before, snapshot(tmp_path))


# --- one run per experiment -------------------------------------------------------------------------

def _background(tmp_path, *args) -> subprocess.Popen:
    out = open(tmp_path / "bg.out", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), *map(str, args)], cwd=tmp_path,
                            env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc


def _wait_for(predicate, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, (proc.returncode, proc.args)
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_live_run_locks_its_experiment(base, tmp_path):
    """While a run trains: a second run and a resume are refused naming it, and neither touches its files
    (the resume used to delete its save in progress); eval reads the newest complete checkpoint without
    calling the save in progress interrupted. Once the run is killed its lock no longer blocks. The live
    run is a process of its own (the lock is a process's); the others run in this one, as another process
    would, since a flock taken through another open file is refused within one process too."""
    work_copy(base, tmp_path)
    ckpt = tmp_path / "experiments" / "base" / "checkpoints"
    live = _background(tmp_path, "--experiment-name", "base", "--restore-checkpoint", "--max-steps", 100_000,
                       "--checkpoint-interval", 1, "--keep-checkpoints", 2)
    try:
        _wait_for(lambda: max(steps_in(ckpt)) >= 13, live)
        holder = f"pid {live.pid} on host "
        second = call_main("train_char.py", "--dataset-path", "corpus.txt", *TINY, "--experiment-name", "base",
                           cwd=tmp_path)
        assert_user_error(second, "experiments/base already exists and a training run is using it", holder)
        resume = call_main(*RESUME[:-1], 100_000, cwd=tmp_path)
        assert_user_error(resume, "experiment experiments/base is in use by another training run", holder)
        ev = main_ok(*EVAL, "--split", "none", cwd=tmp_path)
        assert f"a training run is using experiments/base ({holder}" in ev.stderr
        assert "interrupted" not in ev.stderr
        assert live.poll() is None  # the live run never noticed
        step = max(steps_in(ckpt))
        _wait_for(lambda: max(steps_in(ckpt)) >= step + 3, live)  # and still saves
    finally:
        live.kill()  # SIGKILL: the lock must go with the process
        live.wait(timeout=60)
    proc = main_ok(*RESUME[:-1], max(steps_in(ckpt)) + 2, cwd=tmp_path)
    assert "restored from step" in proc.stdout


def test_two_runs_with_one_name_started_together(base, tmp_path):
    """Exactly one gets the directory; the other says so in one line and changes nothing of the winner's."""
    shutil.copy(base / "corpus.txt", tmp_path / "corpus.txt")
    args = ["--dataset-path", "corpus.txt", *TINY, "--max-steps", 3, "--eval-interval", 0]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), *map(str, args),
                               "--experiment-name", "same"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "Traceback" not in loser[0] + loser[1]
    (line,) = [x for x in loser[1].splitlines() if x.startswith("error: ")]
    assert "experiments/same already exists" in line
    assert steps_in(tmp_path / "experiments" / "same" / "checkpoints") == [3]


def test_default_names_never_collide(base, tmp_path):
    """Two unnamed runs started in the same second get two directories."""
    from mingpt_palm.experiment import Experiment

    a = Experiment(tmp_path, "corpus_2026-11-23-120000", unique=True)
    b = Experiment(tmp_path, "corpus_2026-11-23-120000", unique=True)
    a.create("a")
    b.create("b")
    assert (a.name, b.name) == ("corpus_2026-11-23-120000", "corpus_2026-11-23-120000-2")
    a.lock.release(), b.lock.release()

    shutil.copy(base / "corpus.txt", tmp_path / "corpus.txt")
    args = ["--dataset-path", "corpus.txt", *TINY, "--max-steps", 2, "--eval-interval", 0]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), *map(str, args)], cwd=tmp_path,
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(list((tmp_path / "experiments").iterdir())) == 2


# --- never a non-finite checkpoint -----------------------------------------------------------------

def test_a_step_whose_update_is_not_finite_is_skipped():
    """A finite loss and gradient with an overflowing update (here an infinite learning rate) used to
    poison the parameters at step 1; now the step is skipped like one with a NaN loss."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import optax

    from mingpt_palm import parallel
    from mingpt_palm.config import ModelConfig, TrainConfig
    from mingpt_palm.model import PaLM
    from mingpt_palm.state import init_state
    from mingpt_palm.step import STATUS, Control, train_step

    cfg = TrainConfig(model=ModelConfig(seq_len=8, dim=16, depth=1, heads=2, dim_head=8))
    model = PaLM(cfg.model)
    tokens = (np.arange(4 * 9).reshape(4, 9) * 7 % 256).astype(np.uint8)
    for lr, applied in ((np.inf, False), (1e-3, True)):
        schedule = lambda count, lr=lr: jnp.float32(lr)  # noqa: E731
        tx = optax.adamw(schedule, weight_decay=0.0)
        state = init_state(model, tx, cfg)
        step = parallel.pmap(partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=1e-4,
                                     table=jnp.arange(256, dtype=jnp.int32), byte_lengths=jnp.ones(256, jnp.int32),
                                     max_nonfinite=10))
        new, control, status, metrics = step(parallel.replicate(state), parallel.replicate(Control.start()),
                                             parallel.shard_micro_batches(tokens, 1),
                                             np.zeros(jax.local_device_count(), bool))
        assert int(control.bad_in_row[0]) == (0 if applied else 1) and not bool(control.halted[0])
        assert bool(status[0][STATUS.index("finite")]) == applied, lr
        assert np.isfinite(float(metrics["loss"][0])) and np.isfinite(float(metrics["grad_norm"][0]))
        changed = [not np.array_equal(a, b[0]) for a, b in zip(leaves(state.params), leaves(new.params))]
        assert all(changed) if applied else not any(changed), lr
        assert all(np.isfinite(x).all() for x in leaves(new))
        assert int(new.skipped[0]) == (0 if applied else 1) and int(new.step[0]) == 1


def test_a_state_with_nan_is_never_saved(tmp_path):
    from mingpt_palm.checkpoints import Saver
    from mingpt_palm.errors import TrainingStopped

    saver = Saver(tmp_path / "checkpoints", keep=2)
    state = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(1)}
    saver.save(1, state, {"step": 1})
    saver.wait()
    with pytest.raises(TrainingStopped, match=r"step 2: the train state holds non-finite numbers .*newest in .* is "
                                              r"step 1"):
        saver.save(2, {"params": {"w": np.array([1, np.nan, 1], np.float32)}, "step": np.int32(2)}, {"step": 2})
    saver.close()
    assert steps_in(tmp_path / "checkpoints") == [1]


def test_a_nan_streak_never_rotates_away_the_last_good_parameters(tmp_path, monkeypatch, capsys):
    """The issue's case: the learning rate explodes after step 10, checkpoints every 2 steps, 3 kept. The
    poisoned updates are skipped, so every checkpoint written holds the step-10 parameters or older, and
    the stop message names one whose parameters are finite."""
    import jax.numpy as jnp

    import train_char
    from mingpt_palm import optim

    real = optim.lr_schedule

    def exploding(cfg, max_steps):
        base = real(cfg, max_steps)
        return lambda count: jnp.where(count >= 10, jnp.inf, base(count))

    monkeypatch.setattr(optim, "lr_schedule", exploding)
    monkeypatch.setattr(sys, "argv", ["train_char.py", "--dataset-path", str(SHAKESPEARE),
                                      "--experiments-dir", str(tmp_path), "--experiment-name", "nan", *map(str, TINY),
                                      "--max-steps", "40", "--checkpoint-interval", "2", "--keep-checkpoints", "3",
                                      "--eval-interval", "0", "--max-nonfinite-steps", "7"])
    assert train_char.main() == 1
    err = capsys.readouterr().err
    exp = tmp_path / "nan"
    kept = steps_in(exp / "checkpoints")
    assert kept == [12, 14, 16]  # steps 11-17 skipped; the 7th skip (step 17) stops the run unsaved
    good = load_state(exp, 10 if 10 in kept else kept[0])["params"]
    for step in kept:
        state = load_state(exp, step)
        assert all(np.isfinite(x).all() for x in leaves(state)), step
        assert all(np.array_equal(a, b) for a, b in zip(leaves(state["params"]), leaves(good)))
    assert f"checkpoint step 16 in {exp.absolute() / 'checkpoints'} holds the last good parameters" in err
