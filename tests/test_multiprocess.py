"""Two processes on localhost form one JAX job (jax.distributed, gloo collectives on CPU)."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (ROOT, TINY, cli_env, finish, free_port, leaves, load_state, main_ok, read_scalars, spawn_trainer,
                      steps_in)
from mingpt_palm.config import TrainConfig

LOGGED = ("train/loss", "train/grad_norm", "train/learning_rate")


def start_job(args_per_process, cwd=None):
    """One train_char.py per entry of args_per_process, joined into one job on a free port."""
    port = free_port()
    return [spawn_trainer(cli_env(devices=2) | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES":
                                                str(len(args_per_process)), "JAX_PROCESS_ID": str(pid)}, args, cwd)
            for pid, args in enumerate(args_per_process)]


# A job's settings for the tests below (gradient clipping at its default, 1.0): a checkpoint every 5 steps.
TWO = [*TINY, "--max-steps", 20, "--checkpoint-interval", 5, "--keep-checkpoints", 10, "--eval-interval", 0,
       "--log-interval", 1, "--peer-timeout", 5]


def uninterrupted_job(root, settings, name: str):
    """(experiments/name, what the two processes printed) of a whole two-process job (2 x 2 devices)."""
    from conftest import SHAKESPEARE

    args = ["--dataset-path", SHAKESPEARE, "--experiments-dir", root, *settings, "--experiment-name", name]
    procs = start_job([args, args])
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    return root / name, outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """experiments/ref: 20 uninterrupted steps of a two-process job with TWO: the job the parity test compares
    with one process, and the one a killed and resumed job must end bit for bit where it did."""
    return uninterrupted_job(tmp_path_factory.mktemp("two"), TWO, "ref")


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clip", "noclip"])
def test_two_processes_train_like_one(shakespeare, tmp_path, reference, clip):
    """2 processes x 2 devices == 1 process x 4 devices for the same global batch (20 steps; with clipping,
    the reference job itself, and without it a job that also validates every 5 steps).

    Each process feeds its own half of every global batch and the gradients are averaged over all 4
    devices, so only the order of float additions differs: parameters and Adam moments agree to 2e-5
    (measured ~1e-6), logged losses, gradient norms and learning rates to rel 1e-4. A psum in place of
    the pmean scales gradients by 4: Adam's update barely changes (it is scale-invariant), but its
    moments and the logged norm do, with clipping on or off; a wrong data split moves the losses.
    """
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TWO]
    if clip:
        assert TrainConfig().optim.grad_clip == clip  # what the reference job ran with
        two_dir, outs = reference
    else:
        args += ["--optim.grad-clip", clip, "--eval-interval", 5, "--eval-batches", 2]  # the later flag wins
        outs = finish(start_job([[*args, "--experiment-name", "two"]] * 2))
        two_dir = tmp_path / "two"
    assert "4 x cpu (2 process(es))" in outs[0][0], outs
    # Only process 0 speaks; process 1 says nothing unless something goes wrong. gloo, the CPU collectives
    # library, announces its connections on stdout itself: those lines are filtered out (distributed.py).
    assert "step 20/20:" in outs[0][0] and "[Gloo]" not in outs[0][0] and "peer ranks" not in outs[0][0]
    assert outs[1][0] == "", outs[1]
    assert "error" not in outs[0][1] + outs[1][1], outs

    main_ok("train_char.py", *args, "--experiment-name", "one", cwd=tmp_path)  # in this process, on its 4 devices
    for step in (5, 10, 15, 20):
        two, one = load_state(two_dir, step), load_state(tmp_path / "one", step)
        for a, b in zip(leaves((two["params"], two["opt_state"])), leaves((one["params"], one["opt_state"])),
                        strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    two, one = read_scalars(two_dir / "tb"), read_scalars(tmp_path / "one" / "tb")
    for tag in LOGGED:
        assert [s for s, _ in two[tag]] == [s for s, _ in one[tag]] == list(range(1, 21)), tag
        np.testing.assert_allclose([v for _, v in two[tag]], [v for _, v in one[tag]], rtol=1e-4, err_msg=tag)
    if not clip:  # validation covers the windows of both processes, so it matches the single process too
        assert [s for s, _ in two["val/loss"]] == [s for s, _ in one["val/loss"]] == [5, 10, 15, 20]
        np.testing.assert_allclose([v for _, v in two["val/loss"]], [v for _, v in one["val/loss"]], rtol=1e-5)


def test_processes_with_different_settings_stop_before_step_one(shakespeare, tmp_path):
    """A different --max-steps on one process used to hang both forever in the last all-reduce."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--eval-interval", 0,
            "--experiment-name", "mixed"]
    outs = finish(start_job([[*args, "--max-steps", 20], [*args, "--max-steps", 30]]), timeout=120)
    for pid, (out, err) in enumerate(outs):
        (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
        assert "were started with different settings (max_steps: " in line, err
        assert "start every process with the same arguments" in line
        assert "Traceback" not in err
    assert not (tmp_path / "mixed").exists()


def test_a_missing_process_is_named_after_the_timeout(shakespeare, tmp_path):
    """Process 1 of 2 alone: no coordinator answers. It gives up after --distributed-timeout, saying who."""
    env = cli_env(devices=2) | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2",
                                "JAX_PROCESS_ID": "1"}
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), "--dataset-path", str(shakespeare),
                             "--experiments-dir", str(tmp_path), *map(str, TINY), "--experiment-name", "alone",
                             "--distributed-timeout", "5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ((out, err),) = finish([proc], timeout=120)
    assert proc.returncode == 2, err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "process 1 of 2 could not form the job within 5 s: process 0 (the coordinator, at 127.0.0.1:" in line
    assert "Traceback" not in err
    assert time.monotonic() - began < 60
    assert not (tmp_path / "alone").exists()


def test_a_signal_to_one_process_stops_both_after_the_same_step(shakespeare, tmp_path):
    """Ctrl-C reaching one process only: both stop after the same step and save one checkpoint."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", 100000,
            "--checkpoint-interval", 20, "--eval-interval", 0, "--experiment-name", "sig"]
    procs = start_job([args, args])
    try:
        ckpt = tmp_path / "sig" / "checkpoints"
        deadline = time.time() + 240
        while not (ckpt / "20").is_dir() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        assert (ckpt / "20").is_dir(), "no first checkpoint"
        procs[1].send_signal(signal.SIGINT)
    finally:
        outs = finish(procs, timeout=120)
    assert procs[1].returncode == 130 and procs[0].returncode == 143, outs
    assert "SIGINT received" in outs[1][1] and "stopped by" not in outs[1][1]  # process 0 reports for the job
    assert "stopped by a signal to another process at step" in outs[0][1]
    step = int(outs[0][1].split("at step ")[1].split(";")[0])
    assert max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == step
    assert f"--experiments-dir {tmp_path} --experiment-name sig --restore-checkpoint" in outs[0][1]


# --- resume, and a process that dies --------------------------------------------------------------

def kill_after_a_checkpoint(procs, victim: int, ckpt) -> tuple[list, float]:
    """kill -9 process `victim` of a job once `ckpt` holds a complete checkpoint; (what every process printed,
    seconds from the kill until the other process ended)."""
    survivor = procs[1 - victim]
    try:
        deadline = time.monotonic() + 240
        while not steps_in(ckpt) and time.monotonic() < deadline and procs[victim].poll() is None:
            time.sleep(0.002)
        procs[victim].kill()
        killed = time.monotonic()
        survivor.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        outs = finish(procs)
    assert procs[victim].returncode == -signal.SIGKILL, "the job ended before the kill: make it longer"
    return outs, took


def one_error_line(err: str) -> str:
    assert "Traceback" not in err and "Check failure" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def assert_same_state(a, b) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_a_dead_coordinator_is_named_and_the_job_resumes_bit_exact(shakespeare, tmp_path, reference):
    """kill -9 of process 0, which hosts the job's coordinator: process 1 stops within --peer-timeout with
    one line naming it and the last complete checkpoint (its jax client used to abort at once with a C++
    stack trace). The same job restarted with --restore-checkpoint alone continues from there, and so does
    one with --restore-step (every process then sees the newer checkpoints gone): both end bit for bit
    where the uninterrupted job did. Continuing a multi-process experiment used to fail in orbax."""
    exp = tmp_path / "cut"
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TWO, "--experiment-name", "cut"]
    procs = start_job([args, args])
    outs, took = kill_after_a_checkpoint(procs, 0, exp / "checkpoints")
    line = one_error_line(outs[1][1])
    assert procs[1].returncode == 1 and took < 30, (procs[1].returncode, took, line)
    saved = steps_in(exp / "checkpoints")[-1]
    assert line.startswith("error: process 0 of 2 sent no heartbeat for 5 s (killed, or its host went down?); "
                           "this process (process 1) stops too. "), line
    assert (f"The last complete checkpoint is step {saved} in {exp / 'checkpoints'}; restart every process of the "
            f"job with: python train_char.py --experiments-dir {tmp_path} --experiment-name cut --restore-checkpoint"
            in line), line

    resume = ["--experiments-dir", tmp_path, "--experiment-name", "cut"]
    procs = start_job([[*resume, "--restore-checkpoint"]] * 2)
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"(restored from step {saved}); steps {saved} -> 20" in outs[0][0]
    assert_same_state(load_state(reference[0], 20), load_state(exp, 20))

    procs = start_job([[*resume, "--restore-step", 5]] * 2)
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "(restored from step 5); steps 5 -> 20" in outs[0][0]
    assert steps_in(exp / "checkpoints") == [5, 10, 15, 20]  # saved anew on every process: none skipped
    assert sorted(p.name.split("_")[0] for p in (exp / "superseded_checkpoints").iterdir()) == ["10", "15", "20"]
    assert_same_state(load_state(reference[0], 20), load_state(exp, 20))


def test_a_dead_process_is_named_by_the_others(shakespeare, tmp_path):
    """kill -9 of process 1 after a checkpoint: process 0 used to wait ~93 s, then abort (exit 134) with
    21 lines of XLA coordination errors and a C++ stack trace."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TWO, "--max-steps", 100_000,
            "--experiment-name", "dead"]
    procs = start_job([args, args])
    outs, took = kill_after_a_checkpoint(procs, 1, tmp_path / "dead" / "checkpoints")
    line = one_error_line(outs[0][1])
    assert procs[0].returncode == 1 and 4 < took < 30, (procs[0].returncode, took, line)
    assert "error: process 1 of 2 sent no heartbeat for 5 s (killed, or its host went down?); this process " \
           "(process 0) stops too. The last complete checkpoint is step " in line, line


class _Peer:
    """The job's key-value store as PeerWatch sees it, with process 1 beating (alive) or silent (dead)."""

    def __init__(self, alive: bool):
        import threading

        self.entries = {"mingpt_palm/alive/1": "1"}
        self.stop = threading.Event()
        if alive:
            threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self):
        beat = 1
        while not self.stop.wait(0.2):
            beat += 1
            self.entries["mingpt_palm/alive/1"] = str(beat)

    def key_value_set(self, key, value, allow_overwrite=False):
        self.entries[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in list(self.entries.items()) if k.startswith(prefix)]


@pytest.mark.parametrize("alive", [True, False], ids=["peer alive", "peer dead"])
def test_a_failure_waits_for_the_verdict_on_a_dead_peer_only(monkeypatch, alive):
    """After an error in the loop, PeerWatch.settle lets the watch name a dead process first (the error of a
    collective broken by its death would hide the cause; a survivor used to abort in orbax or gloo instead),
    and returns as soon as every other process is seen beating, so that a failure of this process's own
    is reported without waiting out --peer-timeout (600 s here: waiting it out fails the join below)."""
    import threading

    from mingpt_palm import distributed

    peer, verdicts = _Peer(alive), []
    monkeypatch.setattr(distributed, "_client", lambda: peer)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed.jax, "process_index", lambda: 0)
    with distributed.PeerWatch(timeout_s=600 if alive else 2, on_dead=verdicts.append) as watch:
        settling = threading.Thread(target=watch.settle, daemon=True)
        settling.start()
        settling.join(timeout=60)
        peer.stop.set()
        assert not settling.is_alive(), "settle waited out the peer timeout with every peer alive"
    if alive:
        assert verdicts == []
    else:
        assert verdicts == ["process 1 of 2 sent no heartbeat for 2 s (killed, or its host went down?)"]


# --- the same job with sharded state (--parallel fsdp) --------------------------------------------

# The kernels and the embedding of TINY are split over the 4 devices (the norm scales stay whole), and the job
# validates and samples, which under fsdp every process must take part in.
SHARDED = [*TWO, "--parallel", "fsdp", "--fsdp-min-bytes", 50_000, "--eval-interval", 10, "--eval-batches", 2,
           "--sample-length", 8]


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory):
    """experiments/sharded: 20 uninterrupted steps of a two-process job with SHARDED."""
    return uninterrupted_job(tmp_path_factory.mktemp("sharded"), SHARDED, "sharded")


def test_two_processes_under_fsdp_train_like_dp_and_resume_bit_exact_after_a_kill(shakespeare, tmp_path, reference,
                                                                                 sharded_reference):
    """2 processes x 2 devices with the state sharded over all 4: each process writes its own shards of every
    checkpoint, and the job's steps equal the dp job's to float rounding (2e-5 as above; measured ~1e-6).
    kill -9 of process 1 after a checkpoint: process 0 names it in one line; both restarted with
    --restore-checkpoint continue from the last complete checkpoint and end bit for bit where the
    uninterrupted sharded job did (same layout, same devices: the same program on the same numbers)."""
    ref_dir, outs = sharded_reference
    assert "4 x cpu (2 process(es))" in outs[0][0] and "step 20: val loss" in outs[0][0], outs
    for a, b in zip(leaves(load_state(ref_dir, 20)), leaves(load_state(reference[0], 20)), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)

    exp = tmp_path / "cut"
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *SHARDED, "--experiment-name", "cut"]
    procs = start_job([args, args])
    outs, _ = kill_after_a_checkpoint(procs, 1, exp / "checkpoints")
    assert procs[0].returncode == 1, outs
    assert "error: process 1 of 2 sent no heartbeat for 5 s" in one_error_line(outs[0][1])
    saved = steps_in(exp / "checkpoints")[-1]
    procs = start_job([["--experiments-dir", tmp_path, "--experiment-name", "cut", "--restore-checkpoint"]] * 2)
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"(restored from step {saved}); steps {saved} -> 20" in outs[0][0]
    assert_same_state(load_state(ref_dir, 20), load_state(exp, 20))
