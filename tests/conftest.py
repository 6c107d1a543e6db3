"""Shared test setup: 4 simulated CPU devices, the suite's own corpora, a CLI runner and an in-process one."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import io
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
# The suite's corpus, shipped with it (tests/data/README.md), so that it needs nothing beside the checkout;
# ../shared/data (all of tinyshakespeare, a Wikipedia excerpt) is for the benchmarks only.
SHAKESPEARE = Path(__file__).resolve().parent / "data" / "shakespeare.txt"

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
    # A suite run inside an srun step or under mpirun: its single-process runs must not try to form a job.
    for key in [k for k in env if k.startswith(("SLURM_", "OMPI_", "PMIX_"))]:
        del env[key]
    return env


def run_cli(script: str, *args, devices: int = 4, cwd=None, timeout: float = 300, check: bool = True):
    """Run train_char.py / eval_char.py as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=cli_env(devices),
                          capture_output=True, text=True, errors="surrogateescape", timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def spawn_trainer(env: dict, args, cwd=None) -> subprocess.Popen:
    """train_char.py started in the background with `env`, as one process of a job; see `finish`."""
    return subprocess.Popen([sys.executable, str(ROOT / "train_char.py"), *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")


def finish(procs, timeout=300):
    """What each process printed, (stdout, stderr); any still running at the timeout is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # SIGKILL: after jax.distributed.initialize SIGTERM is swallowed
            if p.poll() is None:
                p.kill()
                p.wait()


def steps_in(ckpt_dir: Path) -> list[int]:
    """The numbered (complete) checkpoints in ckpt_dir, as a user listing the directory sees them."""
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []


def need_data(path: Path) -> Path:
    """The path of a corpus the suite ships (tests/data): a checkout without it is broken, never a skip."""
    assert path.is_file(), f"{path} is missing: it is part of the test suite (tests/data/README.md)"
    return path


@pytest.fixture
def shakespeare() -> Path:
    return need_data(SHAKESPEARE)


# Words for generated text: ASCII, Latin with diacritics, Greek, Cyrillic, CJK, Hangul and an emoji (1 to 4
# bytes a character in UTF-8), mixed as a Wikipedia dump mixes them.
_WORDS = ("the of and in to a is was for on as with by he that at from his it an were are which this be also "
          "has had first one their its new after who they have her she two been other when there all during into "
          "school time may years more most only over city some world would where later up such used many can "
          "state about national out known university united then made king war river game season born "
          "café naïve Zürich São Paulo Ærø Kraków Ελλάδα Αθήνα Москва Россия 日本 東京 北京 中国 한국 😀").split()


@functools.lru_cache(maxsize=None)
def xml_text(size: int = 400_000, seed: int = 0) -> bytes:
    """A MediaWiki-export-like XML document of at least `size` bytes, the same bytes for the same arguments:
    pages of markup (<page>, <title>, <text xml:space="preserve">, [[links]], {{templates}}, bold, &amp;
    entities) around paragraphs of words in several scripts, lines from a few bytes to ~3.6 KB. The suite's
    stand-in for enwik8-like text: Wikipedia's own text is CC BY-SA, and the suite ships none of it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    header = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">\n'
    out, length, page = [header], len(header), 0
    while length < size:
        page += 1
        title = " ".join(rng.choice(_WORDS, rng.integers(1, 4))).title()
        lines = ["  <page>", f"    <title>{title}</title>", "    <ns>0</ns>", f"    <id>{page}</id>", "    <revision>",
                 f"      <timestamp>20{rng.integers(3, 17):02d}-0{rng.integers(1, 10)}-1{rng.integers(0, 10)}"
                 "T12:00:00Z</timestamp>", '      <text xml:space="preserve">{{Infobox ' + title.lower() + "}}"]
        for _ in range(rng.integers(2, 12)):
            n = int(rng.choice([3, 12, 40, 120, 600]))  # a heading, short and long paragraphs
            words = [str(w) for w in rng.choice(_WORDS, n)]
            for i in rng.integers(0, n, max(1, n // 15)):
                words[i] = f"[[{words[i]}]]" if rng.random() < 0.6 else f"'''{words[i]}'''"
            text = " ".join(words)
            lines += [f"== {text} ==" if n == 3 else f"{text[0].upper()}{text[1:]}. &amp; &lt;ref&gt;", ""]
        lines += ["[[Category:" + " ".join(rng.choice(_WORDS, 2)).title() + "]]</text>", "    </revision>",
                  "  </page>"]
        chunk = "\n".join(lines) + "\n"
        out.append(chunk)
        length += len(chunk.encode())
    return ("".join(out) + "</mediawiki>\n").encode()


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


def load_state(exp_dir: Path, step: int | None = None, step_dir: Path | None = None) -> dict:
    """The saved train state of a checkpoint (the newest when step is None, or the one in step_dir), as a
    plain tree on one device, whatever layout and device count saved it."""
    import jax
    import orbax.checkpoint as ocp

    if step_dir is None:
        ckpt = exp_dir / "checkpoints"
        step = step if step is not None else max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
        step_dir = ckpt / str(step)
    path = (step_dir / "state").absolute()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        saved = c.metadata(path).item_metadata
        return c.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved))


def leaves(tree) -> list:
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _captured(out, err):
    """File descriptors 1 and 2, and sys.stdout and sys.stderr over them, into the files out and err, as a
    pipe takes a CLI's output (C++ logging included); all put back afterwards."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved, streams = {fd: os.dup(fd) for fd in (1, 2)}, (sys.stdout, sys.stderr)
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False)),
                                                   encoding="utf-8", errors="surrogateescape", write_through=True)
                                  for fd in (1, 2))
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def call_main(script: str, *args, cwd) -> subprocess.CompletedProcess:
    """train_char.py or eval_char.py called in this process as its command line calls it: main(), from cwd,
    with sys.argv. Returns what run_cli returns for a child: a CompletedProcess of the exit code and what it
    wrote to stdout and stderr (file descriptors included). A refusal or a short run costs a fraction of a
    second this way, against seconds for a new Python process that imports jax. It shares this process's
    jax (4 simulated devices) and signal handlers: a test that needs another device count, a signal, or a
    process of its own (a lock held by a live run) runs the script as a process (run_cli)."""
    module = importlib.import_module(script.removesuffix(".py"))
    argv, here, previous_argv = [script, *map(str, args)], os.getcwd(), sys.argv
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            os.chdir(cwd)
            sys.argv = argv
            with _captured(out, err):
                try:
                    code = module.main()
                except SystemExit as e:  # the argument parser's refusals and --help
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            sys.argv = previous_argv
            os.chdir(here)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "surrogateescape"))
    return subprocess.CompletedProcess(argv, code, *texts)


def main_ok(script: str, *args, cwd) -> subprocess.CompletedProcess:
    """call_main of a run that must succeed (a fixture's training run, say)."""
    proc = call_main(script, *args, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def in_process():
    """run(script, *args, cwd=...) -> CompletedProcess: call_main, for a test (a module-scoped fixture calls
    call_main or main_ok itself)."""
    return call_main
