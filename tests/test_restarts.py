"""Restarts and what an experiment directory says: a run killed before its first checkpoint, one command line
for the first start and every restart, records written only once a run is under way, hand-edited configs,
and the figures a run reports (its learning rate, its tokens/s, its step count)."""

from __future__ import annotations

import json
import shutil
import statistics

import numpy as np
import pytest

from conftest import SHAKESPEARE, TINY, call_main, main_ok, read_scalars, steps_in
from test_reliability import (assert_unchanged, assert_user_error, popen_output, popen_train, snapshot,
                              wait_until)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """experiments/base: 10 steps, checkpoints 5 and 10."""
    root = tmp_path_factory.mktemp("restarts")
    main_ok("train_char.py", "--dataset-path", SHAKESPEARE, "--experiment-name", "base", *TINY, "--max-steps", 10,
            "--checkpoint-interval", 5, "--eval-interval", 0, cwd=root)
    return root


def copy_of(base, tmp_path):
    shutil.copytree(base / "experiments", tmp_path / "experiments")
    return tmp_path / "experiments" / "base"


def history(exp) -> list[dict]:
    return [json.loads(line) for line in (exp / "history.jsonl").read_text().splitlines()]


def edit_config(exp, path: str, value) -> None:
    config = json.loads((exp / "config.json").read_text())
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    (exp / "config.json").write_text(json.dumps(config, indent=2))


# --- restarts -------------------------------------------------------------------------------------

def test_killed_before_its_first_checkpoint_the_same_command_starts_it_over(shakespeare, tmp_path):
    """A scheduler's requeue runs the same command again: with --restore-checkpoint it must start the
    experiment the first time, start it over after a kill that came before its first save (it has
    nothing to lose but its logs), and continue it after one that came later."""
    command = ["--dataset-path", shakespeare, "--experiment-name", "r", *TINY, "--max-steps", 30,
               "--checkpoint-interval", 20, "--log-interval", 1, "--eval-interval", 0, "--restore-checkpoint"]
    exp = tmp_path / "experiments" / "r"
    proc = popen_train(*command, cwd=tmp_path)
    wait_until(lambda: "step 4/30:" in popen_output(tmp_path)[0], proc, interval=0.002)
    proc.kill()
    proc.wait(timeout=60)
    assert "experiment: experiments/r (new); steps 0 -> 30" in popen_output(tmp_path)[0]
    assert steps_in(exp / "checkpoints") == [], "the kill came after the first checkpoint: make the run longer"
    assert list((exp / "tb").iterdir())  # the killed attempt's event file, which the restart replaces

    again = main_ok("train_char.py", *command, cwd=tmp_path)
    assert ("restart: experiments/r has no complete checkpoint yet: starting it over from step 0 with its saved "
            "settings (the earlier attempt had nothing to keep but its TensorBoard logs, which this run replaces)"
            in again.stdout)
    assert "experiment: experiments/r (started over); steps 0 -> 30" in again.stdout
    assert [s for s, _ in read_scalars(exp / "tb")["train/loss"]] == list(range(1, 31))  # each step once
    assert [h["event"] for h in history(exp)] == ["new", "restart"]
    assert steps_in(exp / "checkpoints") == [20, 30]

    # Nothing left to train: the same command says so and changes nothing.
    before = snapshot(tmp_path)
    assert_user_error(call_main("train_char.py", *command, cwd=tmp_path),
                      "experiments/r is at step 30, and --max-steps is 30: nothing to train")
    assert_unchanged(before, snapshot(tmp_path))


def test_a_start_that_fails_before_its_first_step_changes_nothing(base, tmp_path, monkeypatch, in_process):
    """Records and checkpoint moves wait for the first step: a resume that fails while compiling (out of
    memory, here) leaves config.json, history.jsonl and checkpoints/ as they were, so that the next plain
    --restore-checkpoint still continues from the newest checkpoint."""
    from mingpt_palm import train

    copy_of(base, tmp_path)

    def out_of_memory(*args, **kwargs):  # as XLA says it when the step does not fit while compiling
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.")

    monkeypatch.setattr(train, "train_step", out_of_memory)
    before = snapshot(tmp_path)
    proc = in_process("train_char.py", "--experiment-name", "base", "--restore-step", 5, "--max-steps", 20,
                      "--log-interval", 3, cwd=tmp_path)
    assert_user_error(proc, "out of memory: XLA could not allocate", code=1)
    assert_unchanged(before, snapshot(tmp_path))


# --- what an experiment directory says ------------------------------------------------------------

@pytest.mark.parametrize("path, value, recorded", [
    ("seed", 3, 0), ("optim.learning_rate", 0.01, 0.003), ("model.seq_len", 32, 64),
])
def test_a_hand_edited_run_defining_setting_is_refused(base, tmp_path, in_process, path, value, recorded):
    exp = copy_of(base, tmp_path)
    edit_config(exp, path, value)
    before = snapshot(tmp_path)
    proc = in_process("train_char.py", "--experiment-name", "base", "--restore-checkpoint", "--max-steps", 12,
                      cwd=tmp_path)
    assert_user_error(proc, "experiments/base/config.json was changed after the run last started",
                      f"{path}: {recorded!r} recorded, {value!r} in config.json", "put the recorded values back")
    assert_unchanged(before, snapshot(tmp_path))


def test_an_edited_model_shape_is_named_by_eval_resume_and_init_from(base, tmp_path, in_process):
    """With the history there, the edit is named against it; without it (deleted, or from elsewhere), the
    checkpoint's own shapes show that config.json does not belong to it: never a flax traceback, and
    never "unreadable" for healthy checkpoints."""
    exp = copy_of(base, tmp_path)
    edit_config(exp, "model.ff_mult", 2)
    proc = in_process("eval_char.py", "--experiment-name", "base", "--sample-steps", 2, cwd=tmp_path)
    assert_user_error(proc, "model.ff_mult: 4 recorded, 2 in config.json")

    (exp / "history.jsonl").unlink()
    before = snapshot(tmp_path)
    shape = ("does not match checkpoint step 10", "['block_0']['ff_out']['kernel'] is [256, 64] there, [128, 64] in "
             "config.json", "put back the ones they were trained with")
    for script, args in (("eval_char.py", ["--experiment-name", "base", "--sample-steps", 2]),
                         ("train_char.py", ["--experiment-name", "base", "--restore-checkpoint", "--max-steps", 12]),
                         ("train_char.py", ["--init-from", "experiments/base", "--experiment-name", "ft",
                                            "--max-steps", 2])):
        proc = in_process(script, *args, cwd=tmp_path)
        assert_user_error(proc, *shape)
        assert "unreadable" not in proc.stderr
    assert_unchanged(before, snapshot(tmp_path))


def test_a_continued_run_records_what_it_ran_with(base, tmp_path, in_process):
    """config.json holds what auto resolved to (a CPU run continued on a GPU would otherwise switch to
    bfloat16 without a word) and the warmup the run uses; an edit of a setting that may change (max_steps)
    is counted from the record of the last start, as a flag would be; a display flag given once
    (--no-progress) does not become the default of later resumes."""
    exp = copy_of(base, tmp_path)
    saved = json.loads((exp / "config.json").read_text())
    assert saved["model"]["dtype"] == "float32" and saved["optim"]["warmup_steps"] == 5
    assert saved["progress"] is False  # TINY passes --no-progress

    edit_config(exp, "max_steps", 11)
    proc = in_process("train_char.py", "--experiment-name", "base", "--restore-checkpoint", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = history(exp)[-1]
    assert last["event"] == "resume" and last["changed"]["max_steps"] == [10, 11]
    assert "progress" not in last["changed"]  # how a run is displayed is not what it runs
    assert json.loads((exp / "config.json").read_text())["progress"] is True


# --- numbers that must not lie ---------------------------------------------------------------------

def test_the_default_warmup_is_recorded_and_the_run_decays(shakespeare, tmp_path, in_process):
    """No --optim.warmup-steps: 5% of a 40-step run (2), saved in config.json; the logged rate peaks at
    update 2 and reaches the floor at update 40 (with the old default of 1000 cut to the run, it would
    still be rising at 40)."""
    tiny = [a for a in map(str, TINY) if a not in ("--optim.warmup-steps", "5")]
    proc = in_process("train_char.py", "--dataset-path", shakespeare, "--experiment-name", "w", *tiny, "--max-steps",
                      40, "--log-interval", 1, "--eval-interval", 0, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    exp = tmp_path / "experiments" / "w"
    assert json.loads((exp / "config.json").read_text())["optim"]["warmup_steps"] == 2
    lr = dict(read_scalars(exp / "tb")["train/learning_rate"])
    assert lr[2] == pytest.approx(3e-3, rel=1e-5) and lr[40] == pytest.approx(3e-4, rel=1e-5)


def test_a_warmup_longer_than_the_run_is_kept_and_said(shakespeare, tmp_path, in_process):
    """--optim.warmup-steps 100 on a 3-step run is what --help promises (it used to be cut to the run, which
    then trained at the peak), and the start says so; a new run and its resume both print it."""
    # The third update's rate: 3 / 100 of the peak 3e-3 (the first update runs at peak / warmup).
    note = ("schedule: the warmup (100 steps) is longer than the run (3 steps): the learning rate rises to 9e-05 and "
            "never reaches its peak 0.003")
    proc = in_process("train_char.py", "--dataset-path", shakespeare, "--experiment-name", "long", *TINY,
                      "--optim.warmup-steps", 100, "--eval-interval", 0, "--max-steps", 3, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert note in proc.stdout.splitlines(), proc.stdout
    proc = in_process("train_char.py", "--experiment-name", "long", "--restore-checkpoint", "--max-steps", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("schedule: the warmup (100 steps) is longer than the run (4 steps)")
               for line in proc.stdout.splitlines()), proc.stdout


def test_tokens_per_second_counts_training_time_only(shakespeare, tmp_path, monkeypatch, in_process):
    """Evaluations and checkpoints made slow on purpose (0.5 s each, against steps of about 30 ms): every
    logged step time stays between a third and 10x of the median (noise on a shared machine slows steps
    down far more often than it speeds them up). Leaving the slow work in makes the steps next to it 0.5 s
    slower (15x); taking out time during which the devices were computing (a save handed to orbax while a
    step is in flight) left those windows only the dispatch (a few ms, 0.1x), and windows that began
    after the log line's own work read 0.8 ms where steps took 11."""
    import time

    from mingpt_palm import checkpoints, evaluate

    real_save, real_score = checkpoints.Saver.save, evaluate.score

    def slow_save(self, *args, **kwargs):
        time.sleep(0.5)
        return real_save(self, *args, **kwargs)

    def slow_score(*args, **kwargs):
        time.sleep(0.5)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(checkpoints.Saver, "save", slow_save)
    monkeypatch.setattr(evaluate, "score", slow_score)
    proc = in_process("train_char.py", "--dataset-path", shakespeare, "--experiment-name", "speed", *TINY,
                      "--batch-size", 32, "--max-steps", 25, "--log-interval", 1, "--eval-interval", 5,
                      "--eval-batches", 1, "--checkpoint-interval", 3, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tok_s = dict(read_scalars(tmp_path / "experiments" / "speed" / "tb")["train/tokens_per_second"])
    ms = {step: 32 * 64 / value * 1e3 for step, value in tok_s.items()}
    median = statistics.median(ms.values())
    off = {step: round(t / median, 2) for step, t in ms.items() if not median / 3 < t < 10 * median}
    assert not off, f"step times far from the median {median:.1f} ms (ratio to it): {off}"


def test_max_epochs_counts_steps_exactly():
    """ceil of the exact number of windows: a float product rounds 1.1 x 3000 / 10 to 330.00000000000006
    (331 steps); floor or round would give 6 for 6.25 and 16 for 16.67."""
    from mingpt_palm.settings import steps_for_epochs

    assert steps_for_epochs(1.1, 3000, seq_len=10, batch_size=1) == 330
    assert steps_for_epochs(0.25, 1000, seq_len=10, batch_size=4) == 7
    assert steps_for_epochs(0.5, 1000, seq_len=10, batch_size=3) == 17
    assert steps_for_epochs(1e-9, 1000, seq_len=10, batch_size=4) == 1


def test_periodic_evaluation_scores_one_micro_batch_at_a_time(shakespeare, tmp_path, monkeypatch, in_process):
    """With --grad-accum-steps k a device holds the activations of one micro-batch while training; an
    evaluation of k micro-batches' rows at once could run out of memory where training fits."""
    from mingpt_palm import evaluate

    seen, real_score = [], evaluate.score

    def score(p_eval, params, tokens, weights, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return real_score(p_eval, params, tokens, weights, batch_size, *args, **kwargs)

    monkeypatch.setattr(evaluate, "score", score)
    proc = in_process("train_char.py", "--dataset-path", shakespeare, "--experiment-name", "accum", *TINY,
                      "--batch-size", 16, "--grad-accum-steps", 2, "--max-steps", 2, "--eval-interval", 2,
                      "--eval-batches", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert seen == [8]  # 16 rows a step = 2 micro-batches of 8 (2 per device on 4 devices)
    assert np.isfinite(read_scalars(tmp_path / "experiments" / "accum" / "tb")["val/loss"][0][1])
