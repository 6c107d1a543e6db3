"""Shared test setup: 4 simulated CPU devices, the real corpora beside the repo, a CLI runner."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
WIKI = DATA / "wiki_sample.xml"

# Fail fast instead of hanging if a CPU all-reduce ever gets stuck (docs/design.md, "Platform facts").
XLA_HANG_FLAGS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=3 "
                  "--xla_cpu_collective_call_terminate_timeout_seconds=6")


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {XLA_HANG_FLAGS}"


# In-process tests see 4 devices; this must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = xla_flags(4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Dozens of CLI runs compile the same tiny train and eval steps, and on 2 cores XLA's compile is half
# of each run. The suite's processes share one compilation cache, empty at the start of every session,
# so each program is still compiled for real once. Only programs that took 0.3 s to compile are kept:
# eager ops compile in ~50 ms each, thousands of them, and jax scans the whole directory on every write.
# The size limit is what makes jax lock the directory (filelock), so that a process never reads an entry
# another is halfway through writing (the two processes of a multi-process run compile the same step).
# JAX_ENABLE_COMPILATION_CACHE=false turns it off, for a bug that might live in compilation.
# Under pytest-xdist (-n) the controller makes the directory and removes it at its exit, after its
# workers, which inherit it through the environment.
_XLA_CACHE = os.environ.get("MINGPT_PALM_TESTS_XLA_CACHE") if os.environ.get("PYTEST_XDIST_WORKER") else None
if not _XLA_CACHE:
    _XLA_CACHE = tempfile.mkdtemp(prefix="mingpt-palm-tests-xla-cache-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.update(MINGPT_PALM_TESTS_XLA_CACHE=_XLA_CACHE, JAX_COMPILATION_CACHE_DIR=_XLA_CACHE,
                  JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.3")
sys.path.insert(0, str(ROOT))

# A suite started in the background by a shell without job control (`pytest ... &` in a script) starts
# with SIGINT ignored, and every trainer it spawns inherits that: the Ctrl-C tests would then wait out
# a whole run instead of testing anything. Ctrl-C gets Python's own handler back, here and in children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A model small enough that a CLI run of a few dozen steps takes seconds on 2 CPU cores.
TINY = ["--model.dim", "64", "--model.depth", "2", "--model.heads", "4", "--model.dim-head", "16",
        "--block-size", "64", "--batch-size", "8", "--optim.warmup-steps", "5",
        "--optim.learning-rate", "3e-3", "--no-progress", "--sample-length", "0"]


def cli_env(devices: int = 4) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def run_cli(script: str, *args, devices: int = 4, cwd=None, timeout: float = 300, check: bool = True):
    """Run train_char.py / eval_char.py as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=cli_env(devices),
                          capture_output=True, text=True, errors="surrogateescape", timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def need_data(path: Path) -> Path:
    """The real text beside the repo; under CI (CI=true) its absence fails the test instead of skipping it,
    so that a broken checkout layout can never turn the parity and reliability tests into silent skips."""
    if not path.is_file():
        message = f"needs {path} (shared/data beside the repo)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI=true, so this fails rather than skips")
        pytest.skip(message)
    return path


@pytest.fixture
def shakespeare() -> Path:
    return need_data(SHAKESPEARE)


@pytest.fixture
def wiki() -> Path:
    return need_data(WIKI)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in every event file of tb_dir, in file order (a restart adds a file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:  # the loader migrates simple_value into a scalar tensor
                if value.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(value.tag, []).append((event.step, value.tensor.float_val[0]))
    return out


def load_state(exp_dir: Path, step: int | None = None) -> dict:
    """The saved train state of a checkpoint (the newest when step is None), as a plain tree."""
    import orbax.checkpoint as ocp

    ckpt = exp_dir / "checkpoints"
    step = step if step is not None else max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as c:
        return c.restore((ckpt / str(step) / "state").absolute())


def leaves(tree) -> list:
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def in_process(monkeypatch, capsys):
    """run(script, *args, cwd=...): train_char.py or eval_char.py called in this process, as its command line
    would call it: a CompletedProcess of its exit code and what it printed. A refusal or a short run costs a
    fraction of a second this way, against seconds for a new Python process that imports jax."""
    import importlib

    def run(script: str, *args, cwd) -> subprocess.CompletedProcess:
        module = importlib.import_module(script.removesuffix(".py"))
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()
        code = module.main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)

    return run
