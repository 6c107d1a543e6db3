"""How several processes form one job, agree before they start, and notice when one of them dies. If
this is your first read through, skip this file: a single process (the usual case) uses none of it.

jax.distributed forms the job from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or from
the environment srun (SLURM) or mpirun (Open MPI) gives each process (launch.py: which launcher wins, and
why each process drives all devices of its node); the coordination service's key-value store carries our
own messages (settings, barriers, failures, heartbeats), because a wait on it has a timeout where a
collective has none.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np

from mingpt_palm import errors, launch
from mingpt_palm.errors import UserError
from mingpt_palm.logs import StdoutWithoutGloo


def initialize(timeout_s: int = 300, peer_timeout_s: int = 60) -> None:
    """Join a multi-process job when a launcher says so: JAX_COORDINATOR_ADDRESS and friends, srun (SLURM) or
    mpirun (Open MPI); launch.py says which wins, where the coordinator is and which devices each process
    drives (all of its node's when it is alone there).

    A single process (the usual case) needs nothing and skips this. A process that cannot form the job
    within timeout_s gives up with one line that says who is missing, instead of waiting forever. jax's
    own detection of a dead process ends the survivors with a C++ stack trace: it is set to act only
    after every wait of ours (timeout_s, and PeerWatch's peer_timeout_s) has spoken.
    """
    # Must run before anything touches a JAX backend (jax.process_count() would).
    if jax.distributed.is_initialized():
        return
    job = launch.detect(os.environ)
    if job is None:
        return
    joined = threading.Event()
    threading.Thread(target=_give_up, args=(job, timeout_s, joined), daemon=True).start()
    try:
        with _coordinator_in_a_child_process(grace_s=peer_timeout_s + 30, job=job):
            # Detection off: jax's own would give each process of an srun or mpirun job one device (launch.py).
            jax.distributed.initialize(coordinator_address=job.address, num_processes=job.num_processes,
                                       process_id=job.process_id, local_device_ids=job.local_device_ids,
                                       cluster_detection_method="deactivate",
                                       initialization_timeout=timeout_s + 60,
                                       heartbeat_timeout_seconds=max(timeout_s, peer_timeout_s) + 60)
    finally:
        joined.set()
    if jax.default_backend() == "cpu":
        StdoutWithoutGloo()


def _give_up(job: launch.Launch, timeout_s: int, joined: threading.Event) -> None:
    # When its own timeout expires, XLA aborts the process with a C++ stack trace, which no Python code
    # can catch: this watchdog speaks first (the call releases the GIL while it waits).
    if joined.wait(timeout_s):
        return
    n, me = job.num_processes, job.process_id
    at = f"{job.address}: {job.origin}" if job.origin else job.address
    if me == 0:
        where = f"{job.address} ({job.origin})" if job.origin else job.address
        who = (f"process 1 did not join at {where}" if n == 2 else
               f"not every one of processes 1-{n - 1} joined at {where}")
    else:
        host, _, port = job.address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            who = f"process 0 (the coordinator, at {at}) answers, but not every process joined"
        except OSError:
            who = f"process 0 (the coordinator, at {at}) is not answering"
    task = "" if job.launcher == "JAX_COORDINATOR_ADDRESS" else f" ({job.launcher})"
    print(f"error: process {me} of {n}{task} could not form the job within {timeout_s} s: {who}; {job.hint}, "
          "or raise --distributed-timeout", file=sys.stderr, flush=True)
    errors.exit_now(2)


# jax's coordination service, run by a child of process 0 rather than inside it: when process 0 dies
# (kill -9, the OOM killer), the others' jax clients would otherwise abort at once with a C++ stack
# trace. The child outlives its parent by grace_s, long enough for PeerWatch in the survivors to name
# the dead process in one line; it ignores the signals a terminal or scheduler sends the whole group,
# since the training processes stop themselves cleanly and it must serve them while they do.
_SERVE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from jax._src.lib import _jax
address, n, heartbeat, shutdown, grace = sys.argv[1], *map(int, sys.argv[2:])
try:
    service = _jax.get_distributed_runtime_service(address, n, heartbeat_timeout=heartbeat, shutdown_timeout=shutdown)
except Exception as e:
    print("error: " + " ".join(str(e).split()), flush=True)
    sys.exit(1)
print("ready", flush=True)
if not sys.stdin.readline():  # end of file: the parent died without a clean shutdown
    time.sleep(grace)
service.shutdown()
"""


class _CoordinatorProcess:
    """Stands in for the service object jax keeps; `shutdown` ends the child cleanly."""

    def __init__(self, address: str, num_nodes: int, grace_s: int, port_hint: str, heartbeat_timeout: int = 100,
                 shutdown_timeout: int = 300, **_):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, address, str(num_nodes), str(heartbeat_timeout), str(shutdown_timeout),
             str(grace_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.wait()
            raise UserError(f"process 0 could not start the job's coordinator at {address}: "
                            f"{line.removeprefix('error: ') or 'it exited'}; is the port in use?{port_hint}")

    def shutdown(self) -> None:
        self.proc.stdin.write("shutdown\n")
        self.proc.stdin.flush()
        self.proc.wait()


@contextlib.contextmanager
def _coordinator_in_a_child_process(grace_s: int, job: launch.Launch):
    from jax._src import distributed

    lib = getattr(distributed, "_jax", None)
    if lib is None or not hasattr(lib, "get_distributed_runtime_service"):  # another jax: its own way
        yield
        return
    original = lib.get_distributed_runtime_service
    # The port of srun's or mpirun's coordinator comes from the job id, the same for every job whose id is
    # the same modulo 4096 (launch.py): another job on this node may hold it.
    port_hint = " (by another job on this node? JAX_COORDINATOR_PORT chooses another)" if job.origin else ""
    lib.get_distributed_runtime_service = lambda address, num_nodes, **kw: _CoordinatorProcess(
        address, num_nodes, grace_s, port_hint, **kw)
    try:
        yield
    finally:
        lib.get_distributed_runtime_service = original


_KEYS = "mingpt_palm"  # our corner of the job's key-value store
_FAILED = f"{_KEYS}/failed/"


def _client():
    # The coordination service's key-value store (jax.distributed has no public API for it yet):
    # unlike a collective, a wait on it has a timeout, and a failed peer can leave word there.
    from jax._src import distributed

    return distributed.global_state.client


def agree(tag: str, payload: str, timeout_s: float) -> list[tuple[int, str]]:
    """Publish this process's payload under `tag`; return [(process, payload)] of every other process.

    Waits at most timeout_s; a process that never reports is named, and one that failed first (see
    `report_failure`) stops this one at once with its reason.
    """
    n, me = jax.process_count(), jax.process_index()
    if n == 1:
        return []
    client = _client()
    client.key_value_set(f"{_KEYS}/{tag}/{me}", payload)
    deadline = time.monotonic() + timeout_s
    while True:
        entries = dict(client.key_value_dir_get(f"{_KEYS}/"))
        for key, reason in entries.items():
            if key.startswith(_FAILED):
                raise UserError(f"process {key[len(_FAILED):]} stopped ({reason}); stopping too")
        others = {pid: entries.get(f"{_KEYS}/{tag}/{pid}") for pid in range(n) if pid != me}
        missing = [pid for pid, value in others.items() if value is None]
        if not missing:
            return sorted(others.items())
        if time.monotonic() > deadline:
            raise UserError(f"process(es) {', '.join(map(str, missing))} of {n} did not reach '{tag}' within "
                            f"{timeout_s:g} s (stopped, or much slower?); raise --distributed-timeout if they are "
                            "only slow")
        time.sleep(0.05)


def barrier(tag: str, timeout_s: float) -> None:
    """Wait until every process gets here (at most timeout_s; nothing to wait for in a single process)."""
    agree(f"barrier/{tag}", "", timeout_s)


def report_failure(message: str) -> None:
    """Leave word in the job's key-value store, so that processes waiting in `agree` stop at once."""
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        try:
            _client().key_value_set(f"{_FAILED}{jax.process_index()}", message, allow_overwrite=True)
        except Exception:  # the job may be going down already; the message is printed locally anyway
            pass


class PeerWatch:
    """Every process of a training job sends a heartbeat each second through the job's key-value store
    and watches the others' (a thread). A process that goes silent for timeout_s (killed, its host
    gone), one that reports a failure (`report_failure`), or a coordinator that stops answering ends
    this process with `on_dead(reason)`: its collectives would otherwise wait for the dead one until
    jax aborts the job with a C++ stack trace. A process that finished says so and is not waited for.
    """

    def __init__(self, timeout_s: float, on_dead):
        self.timeout_s, self.on_dead = timeout_s, on_dead
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peer-watch")

    def __enter__(self) -> "PeerWatch":
        if jax.process_count() > 1:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(Exception):  # the job may be going down already
                self._beat("done")

    def settle(self) -> None:
        """After a failure: wait for the verdict on the other processes, until each has beaten twice since (it
        is alive: the failure is this process's own) or at most timeout_s + 5 s. A collective with a process
        that died fails here, often before the silence is long enough to name it; reported as the
        collective's error (or ended by orbax waiting for the dead one) it would hide the cause."""
        if not self._thread.is_alive():  # a single process, or the verdict is in
            return
        before, deadline = self._beats(), time.monotonic() + self.timeout_s + 5
        while self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
            now = self._beats()
            if before and now and len(now) == jax.process_count() - 1 and all(
                    value == "done" or (value.isdigit() and before.get(pid, "").isdigit()
                                        and int(value) >= int(before[pid]) + 2) for pid, value in now.items()):
                return

    def _beats(self) -> dict | None:
        """The others' heartbeats as they are now (None if the coordinator does not answer)."""
        try:
            entries = _client().key_value_dir_get(f"{_KEYS}/alive/")
        except Exception:
            return None
        me = f"{_KEYS}/alive/{jax.process_index()}"
        return {key: value for key, value in entries if key != me}

    def _beat(self, value: str) -> None:
        _client().key_value_set(f"{_KEYS}/alive/{jax.process_index()}", value, allow_overwrite=True)

    def _run(self) -> None:
        n, me = jax.process_count(), jax.process_index()
        last = {pid: (None, time.monotonic()) for pid in range(n) if pid != me}  # (heartbeat, when it changed)
        unanswered_since, beat = None, 0
        while not self._stop.wait(1.0):
            now = time.monotonic()
            try:
                beat += 1
                self._beat(str(beat))
                entries = dict(_client().key_value_dir_get(f"{_KEYS}/"))
                unanswered_since = None
            except Exception:  # the coordinator (process 0) is gone, or its host is
                unanswered_since = unanswered_since or now
                if now - unanswered_since > min(self.timeout_s, 10):
                    return self.on_dead(f"process 0 (the coordinator) of {n} stopped answering")
                continue
            for key, reason in entries.items():
                # A failure every process meets (a non-finite streak halts all after the same step) is this
                # process's to report too: the verdict waits a little for its own main thread to get there.
                if key.startswith(_FAILED) and not self._stop.wait(5):
                    return self.on_dead(f"process {key[len(_FAILED):]} of {n} stopped ({reason})")
            for pid, (seen, since) in last.items():
                value = entries.get(f"{_KEYS}/alive/{pid}")
                if value == "done":
                    continue
                if value != seen:
                    last[pid] = (value, now)
                elif now - since > self.timeout_s:
                    return self.on_dead(f"process {pid} of {n} sent no heartbeat for {self.timeout_s:g} s "
                                        "(killed, or its host went down?)")


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Elementwise sum of a host array over all processes (identity in a single process)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)

