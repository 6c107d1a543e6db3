"""Reliability, end to end through the command line: what survives a kill, a Ctrl-C, a NaN, bad input.

Every kill here targets a process this file started, by its id (Popen.kill / send_signal). SIGKILL
is the kill that cannot be caught (and JAX swallows SIGTERM in multi-process jobs, docs/design.md).
"""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (ROOT, SHAKESPEARE, TINY, call_main, cli_env, leaves, load_state, main_ok, read_scalars,
                      run_cli, steps_in)

TMP_MARK = ".orbax-checkpoint-tmp"


# --- helpers ---------------------------------------------------------------------------------------

_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """A failing test must not leave its trainer running: kill what this file started, by id."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def popen_train(*args, cwd: Path, sigint_ignored: bool = False) -> subprocess.Popen:
    """train_char.py in the background; output goes to files so a full pipe can never stall it."""
    out, err = open(cwd / "popen.stdout", "w"), open(cwd / "popen.stderr", "w")
    command = [sys.executable, str(ROOT / "train_char.py"), *map(str, args)]
    if sigint_ignored:  # as a shell without job control starts `command &`; exec keeps the ignore
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    proc = subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=out, stderr=err)
    out.close(), err.close()
    _started.append(proc)
    return proc


def popen_output(cwd: Path) -> tuple[str, str]:
    return (cwd / "popen.stdout").read_text(errors="replace"), (cwd / "popen.stderr").read_text(errors="replace")


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 180, interval: float = 0.005):
    """Poll predicate() until it is truthy; fail if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        if proc.poll() is not None:
            raise AssertionError(f"train_char.py exited ({proc.returncode}) before the condition held")
        time.sleep(interval)
    proc.kill()
    proc.wait()
    raise AssertionError(f"condition not met within {timeout} s")


def assert_bitwise_equal(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def losses_per_run(tb_dir: Path) -> list[list[tuple[int, float]]]:
    """train/loss of each event file (a restart opens a new one), in the order the runs happened."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [[(event.step, value.tensor.float_val[0]) for event in EventFileLoader(str(path)).Load()
             for value in event.summary.value if value.tag == "train/loss"]
            for path in sorted(tb_dir.glob("events.out.tfevents.*"))]


def snapshot(root: Path) -> dict:
    """Every path under root with its size, mtime and content hash: any write, create or delete shows."""
    snap = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if not p.is_file():  # a directory, or a FIFO that reading would block on
            snap[rel] = ("not a file", st.st_mode, st.st_mtime_ns)
        else:
            snap[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def assert_unchanged(before: dict, after: dict) -> None:
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"disk changed: added {added}, removed {removed}, changed {changed}"


def assert_user_error(proc, *fragments: str, code: int = 2) -> str:
    """Exit code, exactly one `error: ...` line holding every fragment, no traceback; returns the line."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in text, text
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    # Anything else on stderr is one of our own warnings, never library noise.
    others = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith(("error: ", "warning: "))]
    assert not others, proc.stderr
    return errors[0]


def truncate_files(step_dir: Path) -> None:
    """Cut every file of a checkpoint to half its length, as a full disk or a partial copy would."""
    for f in step_dir.rglob("*"):
        if f.is_file():
            os.truncate(f, f.stat().st_size // 2)


# --- kill at an arbitrary moment -------------------------------------------------------------------

def test_sigkill_after_an_observed_step_then_resume_is_bit_exact(shakespeare, tmp_path):
    steps, every = 150, 10
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", steps,
            "--checkpoint-interval", every, "--log-interval", 1, "--eval-interval", 0, "--keep-checkpoints", 100]
    main_ok("train_char.py", *args, "--experiment-name", "ref", cwd=tmp_path)  # uninterrupted: in process

    # "Any moment after the first checkpoint": a step chosen at random, killed as soon as its line is printed
    # (between checkpoints, or while one is being written) once the first checkpoint is complete on disk
    # (saves are asynchronous: step 10's may still be in progress when step 11 prints); reported on failure.
    target = random.randint(every + 1, steps - 20)
    proc = popen_train(*args, "--experiment-name", "cut", cwd=tmp_path)
    wait_until(lambda: f"step {target}/{steps}:" in popen_output(tmp_path)[0] and steps_in(tmp_path / "cut" /
                                                                                            "checkpoints"),
               proc, interval=0.002)
    proc.kill()  # SIGKILL to this process id: nothing gets to clean up
    proc.wait(timeout=60)
    context = f"killed after step {target} was printed"
    assert proc.returncode == -signal.SIGKILL, f"run ended on its own before the kill ({context})"
    saved = steps_in(tmp_path / "cut" / "checkpoints")
    assert saved and every <= saved[-1] <= target + every and saved[-1] < steps, (saved, context)

    resumed = main_ok("train_char.py", "--experiments-dir", tmp_path, "--experiment-name", "cut",
                      "--restore-checkpoint", cwd=tmp_path)
    assert f"restored from step {saved[-1]}" in resumed.stdout, context

    # The whole train state (params, Adam moments, counters), bit for bit.
    assert_bitwise_equal(load_state(tmp_path / "ref", steps), load_state(tmp_path / "cut", steps))

    reference = dict(read_scalars(tmp_path / "ref" / "tb")["train/loss"])
    assert sorted(reference) == list(range(1, steps + 1))
    killed, after = losses_per_run(tmp_path / "cut" / "tb")
    # Logs are flushed with every checkpoint, so the killed run's curve reaches at least its last one.
    assert {s for s, _ in killed} >= set(range(1, saved[-1] + 1)), context
    assert [s for s, _ in after] == list(range(saved[-1] + 1, steps + 1)), context
    for step, loss in killed + after:
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]} ({context})"


def test_killed_during_a_checkpoint_save_restarts_from_the_last_complete_one(shakespeare, tmp_path):
    # ~6 MB of train state, saved every step: a save lasts long enough to be caught midway.
    model = ["--model.dim", "128", "--model.depth", "2", "--model.heads", "4", "--model.dim-head", "32",
             "--block-size", "64", "--batch-size", "8", "--no-progress", "--sample-length", "0"]
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *model, "--eval-interval", 0,
            "--checkpoint-interval", 1]
    for attempt in range(6):
        name = f"save{attempt}"
        ckpt = tmp_path / name / "checkpoints"
        proc = popen_train(*args, "--max-steps", 300, "--experiment-name", name, cwd=tmp_path)

        def saving_after_a_complete_one():
            try:
                names = os.listdir(ckpt)
            except FileNotFoundError:
                return False
            return any(TMP_MARK in n for n in names) and any(n.isdigit() for n in names)

        wait_until(saving_after_a_complete_one, proc, interval=0.0002)
        proc.kill()
        proc.wait(timeout=60)
        partial = [n for n in os.listdir(ckpt) if TMP_MARK in n]
        if partial:  # caught it: the save was still unfinished when the process died
            break
    else:
        pytest.fail("never managed to kill a run in the middle of a save in 6 attempts")

    complete = steps_in(ckpt)[-1]
    resumed = main_ok("train_char.py", *args, "--max-steps", complete + 2, "--experiment-name", name,
                      "--restore-checkpoint", cwd=tmp_path)
    assert f"warning: ignoring incomplete checkpoint {ckpt / partial[0]} (its save was interrupted)" in resumed.stderr
    assert f"restored from step {complete}" in resumed.stdout
    assert not [n for n in os.listdir(ckpt) if TMP_MARK in n]  # orbax cleared the debris
    assert steps_in(ckpt)[-1] == complete + 2


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(sig, shakespeare, tmp_path):
    args = ["--dataset-path", shakespeare, *TINY, "--max-steps", 100_000, "--checkpoint-interval", 5,
            "--keep-checkpoints", 2, "--log-interval", 1, "--eval-interval", 0, "--experiment-name", "sig"]
    exp = tmp_path / "experiments" / "sig"
    proc = popen_train(*args, cwd=tmp_path)
    wait_until(lambda: (exp / "checkpoints" / "5").is_dir(), proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    stdout, stderr = popen_output(tmp_path)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stdout + stderr, stderr
    name = signal.Signals(sig).name
    assert f"{name} received: finishing this step and saving a checkpoint" in stderr

    stopped = steps_in(exp / "checkpoints")[-1]
    assert stopped >= 5
    assert f"stopped by {name} at step {stopped}; checkpoint saved in {exp.absolute() / 'checkpoints'}" in stderr
    # Logs flushed: every step up to the stop is in TensorBoard.
    assert [s for s, _ in read_scalars(exp / "tb")["train/loss"]] == list(range(1, stopped + 1))

    # The printed command continues the run (shortened here with a later --max-steps, which wins).
    command = shlex.split(stderr.split("Resume with:\n", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "train_char.py"] and command[-1] == "--restore-checkpoint"
    resumed = call_main("train_char.py", *command[2:], "--max-steps", stopped + 2, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"restored from step {stopped}" in resumed.stdout
    assert steps_in(exp / "checkpoints") == [stopped, stopped + 2]  # --keep-checkpoints 2


def test_ctrl_c_stays_ignored_when_the_run_started_with_it_ignored(shakespeare, tmp_path):
    # As `python train_char.py &` from a script starts it: the terminal's Ctrl-C is meant for the
    # script's foreground job, and must not stop (or save and stop) the run in the background.
    args = ["--dataset-path", shakespeare, *TINY, "--max-steps", 100_000, "--checkpoint-interval", 5,
            "--log-interval", 1, "--eval-interval", 0, "--experiment-name", "bg"]
    ckpt = tmp_path / "experiments" / "bg" / "checkpoints"
    proc = popen_train(*args, cwd=tmp_path, sigint_ignored=True)
    wait_until(lambda: (ckpt / "5").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: (ckpt / "15").is_dir(), proc)  # two more saves: it trained on
    assert "received" not in popen_output(tmp_path)[1]
    proc.send_signal(signal.SIGTERM)  # still handled: the way to stop such a run
    proc.wait(timeout=120)
    stdout, stderr = popen_output(tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received: finishing this step" in stderr and "SIGINT" not in stderr


def test_second_ctrl_c_aborts_cleanly_without_a_partial_checkpoint(shakespeare, tmp_path):
    # A save every step: the second Ctrl-C most likely lands inside one (the hardest place to stop).
    args = ["--dataset-path", shakespeare, *TINY, "--max-steps", 100_000, "--checkpoint-interval", 1,
            "--log-interval", 1, "--eval-interval", 0, "--experiment-name", "twice"]
    ckpt = tmp_path / "experiments" / "twice" / "checkpoints"
    proc = popen_train(*args, cwd=tmp_path)
    wait_until(lambda: (ckpt / "5").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    # The handler announces itself at once; the step it lets finish takes far longer than this poll.
    wait_until(lambda: "SIGINT received" in popen_output(tmp_path)[1], proc, interval=0.0005)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    stdout, stderr = popen_output(tmp_path)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr, stderr
    assert "error: aborted by a second Ctrl-C without saving the current step" in stderr
    assert "stopped by" not in stderr
    # The abort may cut a save short: that leaves only a *.orbax-checkpoint-tmp directory, which is
    # never restored; every numbered checkpoint is whole.
    assert steps_in(ckpt)
    for step in steps_in(ckpt):
        assert int(load_state(ckpt.parent, step)["step"]) == step


def early_ctrl_c_ended_cleanly(proc, stderr: str, line: str) -> None:
    """A Ctrl-C while the libraries load ends the process by the signal itself (the shell sees 130), with
    nothing printed; once the backend is up it is one line and exit 130. Never a traceback, a crash
    (SIGABRT, SIGSEGV) or a swallowed interrupt (the run would have trained on: the wait times out)."""
    assert proc.returncode in (-signal.SIGINT, 130), (proc.returncode, stderr)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.strip().splitlines()[-1:] == ([line] if proc.returncode == 130 else []), stderr


def test_ctrl_c_in_the_first_second_ends_the_run_cleanly(shakespeare, tmp_path):
    # Raised at an arbitrary moment of start-up, a KeyboardInterrupt used to land inside a C extension's
    # initialisation (a crash, a traceback) or in code that swallows it (jax's gc callback): 12 of 36 early
    # Ctrl-Cs did. Until the backend is up the kernel's default handler ends the process instead.
    args = ["--dataset-path", shakespeare, *TINY, "--max-steps", 100_000, "--eval-interval", 0]
    for i, delay in enumerate((0.1, 0.5, 0.9, 1.3)):
        proc = popen_train(*args, "--experiment-name", f"early{i}", cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        early_ctrl_c_ended_cleanly(proc, popen_output(tmp_path)[1], "error: interrupted before training started; "
                                   "checkpoints already on disk are complete and intact")
    assert not list((tmp_path / "experiments").glob("early*"))  # nothing left to block the same command


def test_ctrl_c_before_training_starts_is_one_line(shakespeare, tmp_path, monkeypatch, capsys):
    """In process, so that the Ctrl-C lands at a known moment: while the corpus loads."""
    import train_char
    from mingpt_palm import data

    real_load = data.load_corpus

    def load_corpus(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT to this process, as a terminal sends it
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data, "load_corpus", load_corpus)
    monkeypatch.setattr(sys, "argv", ["train_char.py", "--dataset-path", str(shakespeare), "--experiments-dir",
                                      str(tmp_path), "--experiment-name", "early", *map(str, TINY),
                                      "--max-steps", "20"])  # a lost Ctrl-C fails in seconds, not after a whole run
    assert train_char.main() == 130
    err = capsys.readouterr().err
    assert err.strip() == ("error: interrupted before training started; checkpoints already on disk are "
                           "complete and intact")
    assert not (tmp_path / "early").exists()


@pytest.fixture(scope="module")
def long_val_experiment(tmp_path_factory) -> Path:
    """A tiny model trained for one step on 6 copies of the Shakespeare fixture with half of them held out
    for validation: its 300 KB validation split makes a whole-split scoring long enough to interrupt."""
    root = tmp_path_factory.mktemp("longval")
    (root / "corpus.txt").write_bytes(SHAKESPEARE.read_bytes() * 6)
    main_ok("train_char.py", "--dataset-path", "corpus.txt", "--experiment-name", "w", *TINY, "--max-steps", 1,
            "--eval-interval", 0, "--data.val-fraction", 0.5, cwd=root)
    return root


@pytest.mark.parametrize("work, args", [
    ("generating", ["--split", "none", "--sample-steps", 400_000]),
    ("scoring", ["--sample-steps", 0, "--batch-size", 4, "--stride", 8]),  # 8x the windows: ~10 s, never done
])
def test_ctrl_c_stops_eval_at_once(long_val_experiment, work, args):
    """A long generation used to ignore Ctrl-C until it finished (the main thread waits inside XLA)."""
    out, err = long_val_experiment / "eval.stdout", long_val_experiment / "eval.stderr"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, str(ROOT / "eval_char.py"), "--experiment-name", "w", *map(str, args)],
                                cwd=long_val_experiment, env=cli_env(devices=1), stdout=o, stderr=e)
    _started.append(proc)
    wait_until(lambda: "checkpoint step 1" in err.read_text(), proc)
    time.sleep(1.5)  # compiled and busy by now
    assert proc.poll() is None, f"eval finished before the Ctrl-C: make its {work} longer"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.wait(timeout=60)
    took = time.monotonic() - sent
    stderr = err.read_text()
    assert proc.returncode == 130 and took < 2.0, (proc.returncode, took, stderr)
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [
        "error: interrupted by Ctrl-C; nothing was written"]
    assert "=== sample" not in out.read_text()
    assert not (long_val_experiment / "experiments" / "w" / "eval" / "val.json").exists()


# --- non-finite steps (in process: a poisoned batch makes the loss NaN) ----------------------------

def test_ctrl_c_in_evals_first_second_ends_it_cleanly(long_val_experiment):
    # As for training (above); a lost Ctrl-C would leave this generation running past the wait.
    out, err = long_val_experiment / "early.stdout", long_val_experiment / "early.stderr"
    for delay in (0.1, 0.7, 1.3):
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen([sys.executable, str(ROOT / "eval_char.py"), "--experiment-name", "w", "--split",
                                     "none", "--sample-steps", "400000"], cwd=long_val_experiment,
                                    env=cli_env(devices=1), stdout=o, stderr=e)
        _started.append(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        early_ctrl_c_ended_cleanly(proc, err.read_text(), "error: interrupted by Ctrl-C; nothing was written")


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(shakespeare, tmp_path, monkeypatch, capsys):
    import jax.numpy as jnp

    import train_char
    from mingpt_palm import data, loss
    from mingpt_palm import step as step_module

    poisoned: set[int] = set()
    real_get_batch, real_cross_entropy = data.get_batch, loss.cross_entropy

    def get_batch(split, seed, step, *args, **kwargs):
        batch = real_get_batch(split, seed, step, *args, **kwargs)
        return np.zeros_like(batch) if step in poisoned else batch  # NUL bytes: never in Shakespeare

    def cross_entropy(logits, targets, z_loss, weights=None):
        loss, metrics = real_cross_entropy(logits, targets, z_loss, weights)
        nan = jnp.where(jnp.all(targets == 0), jnp.nan, 0.0)
        return loss + nan, dict(metrics, loss=metrics["loss"] + nan)

    monkeypatch.setattr(data, "get_batch", get_batch)
    monkeypatch.setattr(step_module, "cross_entropy", cross_entropy)

    def cli(*extra) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["train_char.py", "--dataset-path", str(shakespeare), "--experiments-dir",
                                          str(tmp_path), "--experiment-name", "nan", *map(str, TINY),
                                          "--checkpoint-interval", "1", "--log-interval", "1", "--eval-interval",
                                          "0", "--keep-checkpoints", "100", "--max-nonfinite-steps", "3",
                                          *map(str, extra)])
        code = train_char.main()
        return code, capsys.readouterr().err

    exp = tmp_path / "nan"
    poisoned.update({2, 3})  # steps 3 and 4 (steps count from 1): two in a row, below the limit
    code, err = cli("--max-steps", 6)
    assert code == 0, err
    assert "warning: step 3: non-finite loss, gradient or update" in err and "update skipped (2 in a row)" in err
    skipped = read_scalars(exp / "tb")["train/skipped_steps"]
    assert skipped == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 2), (6, 2)]
    # A skipped step changes nothing in the state but its counters.
    two, four = load_state(exp, 2), load_state(exp, 4)
    assert_bitwise_equal((two["params"], two["opt_state"]), (four["params"], four["opt_state"]))
    assert int(four["skipped"]) == 2 and int(four["step"]) == 4
    assert not np.array_equal(leaves(load_state(exp, 5)["params"])[0], leaves(four["params"])[0])

    poisoned.clear()
    poisoned.update(range(6, 100))  # from step 7 on, every step
    code, err = cli("--max-steps", 20, "--restore-checkpoint")
    assert code == 1, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "3 consecutive steps had a non-finite loss, gradient or update (last at step 9); stopped" in line
    assert f"checkpoint step 8 in {exp.absolute() / 'checkpoints'} holds the last good parameters" in line
    assert steps_in(exp / "checkpoints")[-1] == 8  # nothing saved for the step that gave up
    good, last = load_state(exp, 6), load_state(exp, 8)
    assert_bitwise_equal(good["params"], last["params"])
    assert all(np.isfinite(x).all() for x in leaves(last["params"]))
    assert read_scalars(exp / "tb")["train/skipped_steps"][-3:] == [(7, 3), (8, 4), (9, 5)]


# --- damaged checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A working directory with experiments/base (checkpoints 5 and 10), an experiment without
    checkpoints, a few bad corpora and a directory; read-only for the tests that use it."""
    root = tmp_path_factory.mktemp("work")
    main_ok("train_char.py", "--dataset-path", SHAKESPEARE, "--experiment-name", "base", *TINY, "--max-steps", 10,
            "--checkpoint-interval", 5, "--eval-interval", 0, cwd=root)
    bare = root / "experiments" / "bare"  # as a run killed before its first save leaves it
    bare.mkdir()
    for f in ("config.json", "vocab.json", "corpus.json", "history.jsonl", "run.lock"):
        shutil.copy(root / "experiments" / "base" / f, bare / f)
    (root / "empty.txt").write_bytes(b"")
    (root / "short.txt").write_bytes(b"too short for one window of 65 bytes\n")
    (root / "smallval.txt").write_bytes(b"a long enough training split, but 5% of it is under 65 bytes. " * 16)
    (root / "adir").mkdir()
    os.mkfifo(root / "fifo")
    (root / "experiments" / "stray.txt").write_text("not an experiment")
    # Trained with a test split (5% of 992 bytes) too small for one window.
    main_ok("train_char.py", "--dataset-path", "smallval.txt", "--experiment-name", "small", *TINY, "--max-steps", 1,
            "--eval-interval", 0, "--data.val-fraction", 0.1, cwd=root)
    return root


def damaged_copy(trained: Path, tmp_path: Path) -> Path:
    exp = tmp_path / "experiments" / "base"
    shutil.copytree(trained / "experiments" / "base", exp)
    return exp


RESTORE_BASE = ["--dataset-path", SHAKESPEARE, "--experiment-name", "base", *TINY, "--checkpoint-interval", 5,
                "--eval-interval", 0, "--restore-checkpoint"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
    exp = damaged_copy(trained, tmp_path)
    truncate_files(exp / "checkpoints" / "10")

    before = snapshot(tmp_path)
    ev = main_ok("eval_char.py", "--experiment-name", "base", "--split", "none", "--sample-steps", 3, cwd=tmp_path)
    assert "warning: checkpoint step 10 is unreadable" in ev.stderr
    assert "warning: restored step 5 instead of the newer, damaged checkpoint(s)" in ev.stderr
    assert "checkpoint step 5" in ev.stderr
    assert_unchanged(before, snapshot(tmp_path))  # evaluation only reads

    tr = main_ok("train_char.py", *RESTORE_BASE, "--max-steps", 12, cwd=tmp_path)
    assert "warning: checkpoint step 10 is unreadable" in tr.stderr
    assert "restored from step 5" in tr.stdout
    # Set aside, not deleted, so that the new step 10 can be saved in its place.
    (aside,) = (exp / "damaged_checkpoints").iterdir()
    assert aside.name.startswith("10_")
    assert f"moved the damaged checkpoint step 10 to experiments/base/damaged_checkpoints/{aside.name}" in tr.stderr
    assert steps_in(exp / "checkpoints") == [5, 10, 12]
    assert int(load_state(exp, 10)["step"]) == 10


def test_no_readable_checkpoint_is_a_clear_error(trained, tmp_path):
    exp = damaged_copy(trained, tmp_path)
    truncate_files(exp / "checkpoints" / "10")
    (exp / "checkpoints" / "5" / "state" / "_METADATA").write_text("not json")

    before = snapshot(tmp_path)
    tr = call_main("train_char.py", *RESTORE_BASE, "--max-steps", 12, cwd=tmp_path)
    assert_user_error(tr, "no readable checkpoint in", "step 10:", "step 5:")
    ev = call_main("eval_char.py", "--experiment-name", "base", "--split", "none", "--sample-steps", 3, cwd=tmp_path)
    assert_user_error(ev, "no readable checkpoint in", "step 10:", "step 5:")
    assert_unchanged(before, snapshot(tmp_path))


# --- bad input: one line, exit 2, nothing on disk changed ------------------------------------------

NEW = ["--experiment-name", "fresh", *TINY, "--max-steps", 2, "--eval-interval", 0]  # would train, were input good
SHAKES = ["--dataset-path", SHAKESPEARE]

BAD_INPUT = {
    "missing dataset": ("train_char.py", ["--dataset-path", "nowhere.txt", *NEW],
                        ["'nowhere.txt' is neither an existing file nor a registered corpus"]),
    "dataset is a directory": ("train_char.py", ["--dataset-path", "adir", *NEW], ["adir is a directory"]),
    "empty dataset": ("train_char.py", ["--dataset-path", "empty.txt", *NEW], ["empty.txt is empty"]),
    "corpus shorter than a window": ("train_char.py", ["--dataset-path", "short.txt", *NEW],
                                     ["the train split of short.txt has 35 bytes", "block size + 1 = 65"]),
    "val split below a window": ("train_char.py", ["--dataset-path", "smallval.txt", *NEW, "--eval-interval", 10],
                                 ["the val split of smallval.txt has 49 bytes", "--data.val-fraction"]),
    "batch not divisible by devices": ("train_char.py", [*SHAKES, *NEW, "--batch-size", 6],
                                       ["--batch-size 6 is not a positive multiple of the 4 devices"]),
    "batch not divisible into micro-batches": ("train_char.py", [*SHAKES, *NEW, "--grad-accum-steps", 3],
                                               ["--batch-size 8 is not a positive multiple of 4 devices x 3 "
                                                "micro-batches (= 12)", "use a multiple of 12, e.g. 12"]),
    "cudnn attention on a CPU": ("train_char.py", [*SHAKES, *NEW, "--model.attention", "cudnn"],
                                 ["--model.attention cudnn cannot run here: it needs an NVIDIA GPU (this is cpu)"]),
    "experiment exists": ("train_char.py", [*SHAKES, *NEW, "--experiment-name", "base"],
                          ["experiments/base already exists; pass --restore-checkpoint", "nothing was changed"]),
    "restore a step of an unknown experiment": ("train_char.py", [*SHAKES, *NEW, "--restore-step", 5],
                                                ["no experiment 'fresh' in experiments/", "base"]),
    "restore without a name": ("train_char.py", [*SHAKES, *TINY, "--max-steps", 2, "--restore-checkpoint"],
                               ["--restore-checkpoint needs --experiment-name"]),
    "restore with another model": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--model.dim", 32,
                                                     "--model.depth", 3],
                                   ["cannot continue experiments/base with different settings",
                                    "model.dim: 64 saved vs 32 given", "model.depth: 2 saved vs 3 given"]),
    "restore with another seed": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--seed", 1],
                                  ["seed: 0 saved vs 1 given"]),
    "restore with another batch size": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--batch-size", 16],
                                        ["batch_size: 8 saved vs 16 given"]),
    "restore with another optimizer": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--optim.b1", 0.8,
                                                         "--optim.learning-rate", 1e-3],
                                       ["optim.learning_rate: 0.003 saved vs 0.001 given",
                                        "optim.b1: 0.9 saved vs 0.8 given"]),
    "restore with another split": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--data.val-fraction", 0.1],
                                   ["data.val_fraction: 0.05 saved vs 0.1 given"]),
    "restore with another vocabulary": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--data.tokenizer", "char"],
                                        ["data.tokenizer: 'byte' saved vs 'char' given"]),
    "restore with another corpus": ("train_char.py", [*RESTORE_BASE, "--max-steps", 20, "--dataset-path",
                                                      "smallval.txt"],
                                    ["smallval.txt is not the corpus experiments/base was trained on",
                                     f"it was trained on {SHAKESPEARE.resolve()}"]),
    "restore with nothing left to train": ("train_char.py", ["--experiment-name", "base", "--restore-checkpoint"],
                                           ["experiments/base is at step 10, and --max-steps is 10: nothing to train"]),
    # Refused before anything moves: --restore-step once set checkpoint 10 aside first, and the next
    # plain --restore-checkpoint then continued from 5 without a word.
    "restore an older step with nothing to train": ("train_char.py", ["--experiment-name", "base", "--restore-step",
                                                                      5, "--max-steps", 5],
                                                    ["experiments/base is at step 5, and --max-steps is 5: nothing to "
                                                     "train"]),
    "restore an older step that does not exist": ("train_char.py", ["--experiment-name", "base", "--restore-step", 7,
                                                                    "--max-steps", 20],
                                                  ["no checkpoint for step 7", "available: [5, 10]"]),
    "name escapes (..)": ("train_char.py", [*SHAKES, *NEW, "--experiment-name", "../x"],
                          ["experiment name '../x' must be a plain directory name"]),
    "name escapes (absolute)": ("train_char.py", [*SHAKES, *NEW, "--experiment-name", "/tmp/x"],
                                ["experiment name '/tmp/x' must be a plain directory name"]),
    "negative learning rate": ("train_char.py", [*SHAKES, *NEW, "--optim.learning-rate", -1e-3],
                               ["--optim.learning-rate -0.001 must be in (0, 1]"]),
    "zero steps": ("train_char.py", [*SHAKES, *NEW, "--max-steps", 0], ["--max-steps 0 must be in [1, 2**31 - 1]"]),
    "eval unknown experiment": ("eval_char.py", ["--experiment-name", "nope"],
                                ["no experiment 'nope' in experiments/ (existing experiments: bare, base, small)"]),
    "eval without checkpoint": ("eval_char.py", ["--experiment-name", "bare"], ["no checkpoint in"]),
    "eval missing step": ("eval_char.py", ["--experiment-name", "base", "--checkpoint-step", 7],
                          ["no checkpoint for step 7", "available: [5, 10]"]),
    "eval name escapes": ("eval_char.py", ["--experiment-name", "../base"], ["must be a plain directory name"]),
    "top-k above vocabulary": ("eval_char.py", ["--experiment-name", "base", "--sample-from-top-k", 300],
                               ["--sample-from-top-k 300 must be between 1 and the vocabulary size 256"]),
    "negative temperature": ("eval_char.py", ["--experiment-name", "base", "--temperature", -0.5],
                             ["--temperature -0.5 must be a finite number >= 0"]),
    "temperature nan": ("eval_char.py", ["--experiment-name", "base", "--temperature", "nan"],
                        ["--temperature nan must be a finite number"]),
    "temperature inf": ("eval_char.py", ["--experiment-name", "base", "--temperature", "inf"],
                        ["--temperature inf must be a finite number"]),
    "infinite learning rate": ("train_char.py", [*SHAKES, *NEW, "--optim.learning-rate", "inf"],
                               ["--optim.learning-rate inf must be a finite number"]),
    "absurd learning rate": ("train_char.py", [*SHAKES, *NEW, "--optim.learning-rate", 1e30],
                             ["--optim.learning-rate 1e+30 must be in (0, 1]"]),
    "infinite z-loss": ("train_char.py", [*SHAKES, *NEW, "--model.z-loss", "inf"],
                        ["--model.z-loss inf must be a finite number"]),
    "negative seed": ("train_char.py", [*SHAKES, *NEW, "--seed", -1], ["--seed -1 must be in [0, 2**32)"]),
    "name too long": ("train_char.py", [*SHAKES, *NEW, "--experiment-name", "x" * 300],
                      ["is 300 bytes long; file systems allow 255 bytes per name"]),
    "eval name too long": ("eval_char.py", ["--experiment-name", "x" * 300], ["is 300 bytes long"]),
    "experiments dir is a file": ("train_char.py", [*SHAKES, *NEW, "--experiments-dir", "short.txt"],
                                  ["--experiments-dir short.txt is not a directory"]),
    "name is an existing file": ("train_char.py", [*SHAKES, *NEW, "--experiment-name", "stray.txt"],
                                 ["experiments/stray.txt exists and is not an experiment directory"]),
    "dataset is a FIFO": ("train_char.py", ["--dataset-path", "fifo", *NEW],
                          ["fifo is not a regular file (a FIFO, device or socket"]),
    "dataset is /dev/zero": ("train_char.py", ["--dataset-path", "/dev/zero", *NEW],
                             ["/dev/zero is not a regular file"]),
    "fractions leave no training data": ("train_char.py", [*SHAKES, *NEW, "--data.val-fraction", 0.5,
                                                           "--data.test-fraction", 0.5],
                                         ["--data.val-fraction 0.5 + --data.test-fraction 0.5 leave no training data"]),
    "fractions leave too little training data": ("train_char.py", ["--dataset-path", "smallval.txt", *NEW,
                                                                   "--data.val-fraction", 0.6,
                                                                   "--data.test-fraction", 0.39],
                                                 ["the train split of smallval.txt has 11 bytes",
                                                  "smaller --data.val-fraction/--data.test-fraction (now 0.6 + 0.39"]),
    "eval split below a window": ("eval_char.py", ["--experiment-name", "small", "--split", "test"],
                                  ["the test split of", "score --split val instead"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, trained):
    # In process (main() of the script, its stdout and stderr, file descriptors included): a refusal costs
    # a fraction of a second this way. The test below runs two of them as processes.
    script, args, fragments = BAD_INPUT[case]
    before = snapshot(trained)
    proc = call_main(script, *args, cwd=trained)
    assert_user_error(proc, *fragments)
    assert_unchanged(before, snapshot(trained))


@pytest.mark.parametrize("case", ["missing dataset", "eval missing step"])
def test_bad_input_through_a_process_is_the_same_one_line(case, trained):
    """What only a whole process shows: nothing printed while the libraries load or the backend starts
    (a warning at import, a C++ log line), the exit code as the shell sees it; one refusal of each script."""
    script, args, fragments = BAD_INPUT[case]
    before = snapshot(trained)
    proc = run_cli(script, *args, cwd=trained, check=False)
    assert_user_error(proc, *fragments)
    assert_unchanged(before, snapshot(trained))
