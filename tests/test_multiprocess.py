"""Two processes on localhost form one JAX job (jax.distributed, gloo collectives on CPU)."""

import signal
import subprocess
import sys
import time

import numpy as np

from conftest import ROOT, TINY, cli_env, free_port, leaves, load_state, read_scalars, run_cli


def test_two_processes_train_like_one(shakespeare, tmp_path):
    """2 processes x 2 devices == 1 process x 4 devices for the same global batch (10 steps).

    Each process feeds its own half of every global batch and the gradients are averaged over
    all 4 devices, so only the order of float additions differs (tolerance as in the parity test).
    """
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", 10,
            "--checkpoint-interval", 5, "--eval-interval", 5, "--eval-batches", 2, "--log-interval", 5]
    port = free_port()
    procs = []
    for pid in range(2):
        env = cli_env(devices=2) | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                    "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), *map(str, args),
                                       "--experiment-name", "two"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace"))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # SIGKILL: after jax.distributed.initialize SIGTERM is swallowed
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "4 x cpu (2 process(es))" in outs[0]

    run_cli("train_char.py", *args, "--experiment-name", "one", devices=4)
    for step in (5, 10):
        two, one = load_state(tmp_path / "two", step)["params"], load_state(tmp_path / "one", step)["params"]
        for a, b in zip(leaves(two), leaves(one), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    # validation covers the windows of both processes, so it matches the single process too
    val_two = read_scalars(tmp_path / "two" / "tb")["val/loss"]
    val_one = read_scalars(tmp_path / "one" / "tb")["val/loss"]
    assert [s for s, _ in val_two] == [s for s, _ in val_one] == [5, 10]
    np.testing.assert_allclose([v for _, v in val_two], [v for _, v in val_one], rtol=1e-5)


def test_a_signal_to_one_process_stops_both_after_the_same_step(shakespeare, tmp_path):
    """Ctrl-C reaching one process only: both stop after the same step and save one checkpoint."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *TINY, "--max-steps", 100000,
            "--checkpoint-interval", 20, "--eval-interval", 0, "--experiment-name", "sig"]
    port = free_port()
    procs = []
    for pid in range(2):
        env = cli_env(devices=2) | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                    "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      errors="replace"))
    try:
        ckpt = tmp_path / "sig" / "checkpoints"
        deadline = time.time() + 240
        while not (ckpt / "20").is_dir() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        assert (ckpt / "20").is_dir(), "no first checkpoint"
        procs[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1].returncode == 130 and procs[0].returncode != 0, outs
    assert "stopped by SIGINT at step" in outs[1] and "stopped by a signal to another process" in outs[0]
    step = int(outs[1].split("stopped by SIGINT at step ")[1].split(";")[0])
    assert f"at step {step};" in outs[0]  # the same step on both
    assert (ckpt / str(step)).is_dir()
