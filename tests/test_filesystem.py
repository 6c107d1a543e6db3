"""The file system says no: a full disk, a read-only experiments directory, too little memory.

Real conditions, not mocks: a small tmpfs or a read-only bind mount in a private mount namespace
(`unshare`, as root or through a user namespace), and an address-space limit for memory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT, SHAKESPEARE, TINY, cli_env, leaves, load_state, main_ok, steps_in
from test_reliability import assert_unchanged, assert_user_error, snapshot


def in_namespace(setup: str, target, command, extra_env=None) -> subprocess.CompletedProcess:
    """Run `command` in a private mount namespace after the shell `setup` ("$0" is target): mounts made
    there vanish with the process, so nothing can leak into the machine."""
    flags = "-m" if os.geteuid() == 0 else "-Urm"
    proc = subprocess.run(["unshare", flags, "sh", "-c", setup, str(target), *map(str, command)],
                          env=cli_env() | (extra_env or {}), capture_output=True, text=True, errors="replace",
                          timeout=300)
    assert "mount:" not in proc.stderr and "unshare:" not in proc.stderr, \
        f"could not set up the mount namespace: {proc.stderr}"
    return proc


def train_args(*args):
    return [sys.executable, str(ROOT / "train_char.py"), "--dataset-path", SHAKESPEARE, *TINY,
            "--eval-interval", 0, *args]


def test_a_full_disk_stops_with_one_line_naming_the_last_complete_checkpoint(tmp_path):
    """A 3 MB tmpfs holds one checkpoint of the tiny model (1.6 MB) but not two. The run stops with one
    line; every numbered checkpoint is whole; with space again the printed command continues it."""
    disk, out = tmp_path / "disk", tmp_path / "copied"
    disk.mkdir(), out.mkdir()
    # Inside the namespace: mount, train, then copy what is on the small disk out before it vanishes.
    setup = ('mount -t tmpfs -o size=3m tmpfs "$0" && cd "$0" && shift 0 && '
             '{ "$@"; rc=$?; cp -a "$0/." "$OUT/"; exit $rc; }')
    proc = in_namespace(setup, disk, train_args("--experiments-dir", disk / "experiments", "--experiment-name", "full",
                                                "--max-steps", 30, "--checkpoint-interval", 5,
                                                "--keep-checkpoints", 10), {"OUT": str(out)})
    line = assert_user_error(proc, "the disk is full: checkpoint step 10 could not be written to",
                             "the last complete checkpoint is step 5. Free some space, then resume with: "
                             f"python train_char.py --experiments-dir {disk / 'experiments'} --experiment-name full "
                             "--restore-checkpoint", code=1)
    exp = out / "experiments" / "full"
    assert steps_in(exp / "checkpoints") == [5], line
    assert int(load_state(exp, 5)["step"]) == 5
    assert all(np.isfinite(x).all() for x in leaves(load_state(exp, 5)))

    # Space again (the copy lives on the big disk): the run continues from step 5 (in this process).
    resumed = main_ok("train_char.py", "--experiments-dir", out / "experiments", "--experiment-name", "full",
                      "--restore-checkpoint", cwd=tmp_path)
    assert "restored from step 5" in resumed.stdout
    assert "(its save was interrupted)" in resumed.stderr
    assert steps_in(exp / "checkpoints")[-1] == 30


def test_a_read_only_experiments_directory(tmp_path):
    """New run and resume refuse with one line and change nothing; evaluation, which only reads, works."""
    root = tmp_path / "ro"
    root.mkdir()
    main_ok("train_char.py", "--dataset-path", SHAKESPEARE, "--experiments-dir", root, "--experiment-name", "done",
            *TINY, "--max-steps", 2, "--eval-interval", 0, cwd=tmp_path)
    before = snapshot(root)
    setup = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    new = in_namespace(setup, root, train_args("--experiments-dir", root, "--experiment-name", "new",
                                               "--max-steps", 2))
    assert_user_error(new, f"cannot create the experiment directory {root / 'new'}: the file system is read-only")
    resume = in_namespace(setup, root, [sys.executable, ROOT / "train_char.py", "--experiments-dir", root,
                                        "--experiment-name", "done", "--restore-checkpoint", "--max-steps", 4])
    assert_user_error(resume, f"cannot open {root / 'done' / 'run.lock'} to lock the experiment: the file system "
                              "is read-only")
    ev = in_namespace(setup, root, [sys.executable, ROOT / "eval_char.py", "--experiments-dir", root,
                                    "--experiment-name", "done", "--split", "none", "--sample-steps", 5])
    assert ev.returncode == 0 and "=== sample 1 of 1" in ev.stdout, ev.stderr
    scored = in_namespace(setup, root, [sys.executable, ROOT / "eval_char.py", "--experiments-dir", root,
                                        "--experiment-name", "done", "--sample-steps", 0])
    assert_user_error(scored, f"cannot create {root / 'done' / 'eval'}: the file system is read-only")
    assert "=== val" not in scored.stdout  # refused before scoring, not after
    assert_unchanged(before, snapshot(root))


def test_out_of_memory_is_one_line_and_leaves_nothing(tmp_path):
    """A model far too big for memory (a 128 GiB kernel), under an 8 GiB address-space limit so that the
    machine itself is never at risk: XLA's RESOURCE_EXHAUSTED becomes one line naming the size."""
    shutil.copy(SHAKESPEARE, tmp_path / "corpus.txt")
    before = snapshot(tmp_path)
    proc = subprocess.run(["prlimit", f"--as={8 << 30}", sys.executable, str(ROOT / "train_char.py"),
                           "--dataset-path", "corpus.txt", "--experiment-name", "huge", *map(str, TINY),
                           "--model.dim", "65536", "--model.depth", "1", "--max-steps", "2", "--eval-interval", "0"],
                          cwd=tmp_path, env=cli_env(devices=1), capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "out of memory: XLA could not allocate 128.0 GiB (137,464,119,296 bytes); lower "
                            "--batch-size or --block-size, or use a smaller model (--model.dim, --model.depth)", code=1)
    assert_unchanged(before, snapshot(tmp_path))


def test_a_run_that_fails_at_its_first_step_leaves_no_directory(tmp_path):
    """Out of memory in the first step (~514 GiB of attention scores at block size 32768), after the
    experiment directory was made: it is removed again, so the name is free for the next command."""
    shutil.copy(SHAKESPEARE, tmp_path / "corpus.txt")
    args = ["--dataset-path", "corpus.txt", "--experiment-name", "first", *TINY, "--max-steps", 2, "--eval-interval", 0]
    proc = subprocess.run(["prlimit", f"--as={8 << 30}", sys.executable, str(ROOT / "train_char.py"),
                           *map(str, args), "--block-size", "32768", "--model.depth", "1"],
                          cwd=tmp_path, env=cli_env(devices=1), capture_output=True, text=True, timeout=300)
    assert "experiment: experiments/first (new)" in proc.stdout  # the directory existed when the step failed
    line = assert_user_error(proc, "out of memory: XLA could not allocate ", code=1)
    # Several hundred GiB: the attention scores or probabilities of the first step, not something small.
    assert float(re.search(r"allocate ([\d,.]+) GiB", line).group(1).replace(",", "")) > 100, line
    assert not (tmp_path / "experiments" / "first").exists()
    main_ok("train_char.py", *args, cwd=tmp_path)  # the same name just works now


def test_only_orbax_s_echoes_of_an_abandoned_save_are_dropped_from_stderr():
    """A full disk makes tensorstore report into orbax's closed event loop once per array (the full-disk
    test above catches them only when its timing makes them happen): exactly those are dropped; any
    other unraisable exception still prints."""
    program = """if True:
        import _testcapi, asyncio, sys
        import mingpt_palm.errors
        mingpt_palm.errors.install()  # as the scripts do; importing the package changes nothing process-wide

        def report_from_c(error):  # as tensorstore's C++ threads do: PyErr_WriteUnraisable(NULL)
            _testcapi.write_unraisable_exc(error, None, None)

        loop = asyncio.new_event_loop()
        loop.close()
        try:
            loop.call_soon_threadsafe(print)
        except RuntimeError as e:
            report_from_c(e)
        try:
            raise RuntimeError(sys.argv[1])
        except RuntimeError as e:
            report_from_c(e)
    """
    proc = subprocess.run([sys.executable, "-c", program, "a real problem"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Event loop is closed" not in proc.stderr, proc.stderr
    assert "RuntimeError: a real problem" in proc.stderr, proc.stderr
