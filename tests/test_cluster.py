"""A job formed by srun (SLURM) or mpirun (Open MPI) without hand-set addresses (mingpt_palm/launch.py).

Two local processes are given the environment srun or mpirun gives its tasks; where `srun` or `mpirun` is
installed, the real launcher starts them too (a private single-node SLURM cluster for the srun test)."""

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, cli_env, finish, free_port, spawn_trainer, steps_in
from mingpt_palm import launch
from mingpt_palm.errors import UserError

ARGS = [*TINY, "--max-steps", 4, "--checkpoint-interval", 4, "--eval-interval", 0, "--peer-timeout", 10]

# What srun gives task i of a one-node, two-task step (as slurm-wlm 22.05 does; SLURM_JOB_NODELIST and the
# like left out), and mpirun (Open MPI 4.1) rank i of `mpirun -n 2`. The batch step of an sbatch script has
# SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID too, but no SLURM_STEP_*.
BATCH = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
         "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_TASKS_PER_NODE": "2", "SLURM_NODEID": "0",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_GTIDS": "0"}


def srun_env(task: int, tasks: int = 2, nodes: int = 1) -> dict:
    per_node = tasks // nodes
    return BATCH | {"SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": str(tasks),
                    "SLURM_NTASKS": str(tasks), "SLURM_STEP_NUM_NODES": str(nodes),
                    "SLURM_STEP_NODELIST": "localhost" if nodes == 1 else f"localhost,node[2-{nodes}]",
                    "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
                    "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task % per_node),
                    "SLURM_NODEID": str(task // per_node), "SLURM_GTIDS": "0,1"}


def mpirun_env(rank: int, size: int = 2) -> dict:
    return {"OMPI_COMM_WORLD_SIZE": str(size), "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK":
            str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(size), "OMPI_UNIVERSE_SIZE": str(size),
            "OMPI_MCA_orte_hnp_uri": "1444741120.0;tcp://127.0.0.1,10.0.0.2:35581;tcp6://[fd00::2]:52457"}


LAUNCHERS = {"srun": srun_env, "mpirun": mpirun_env}


# --- which launcher, which coordinator, which devices ------------------------------------------------

@pytest.mark.parametrize("env, launcher, n, me, devices", [
    ({}, None, 0, 0, None),
    (BATCH, None, 0, 0, None),  # an sbatch script's own shell, outside srun: alone
    (srun_env(0) | {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, None, 0, 0, None),  # srun -n1
    (mpirun_env(0, size=1), None, 0, 0, None),
    (srun_env(1), "srun", 2, 1, [1]),  # two tasks on one node: one device each, as jax gives them
    (srun_env(1, nodes=2), "srun", 2, 1, None),  # one task per node: all of its devices
    (srun_env(1) | {"CUDA_VISIBLE_DEVICES": "1"}, "srun", 2, 1, None),  # srun bound one GPU to each task
    (srun_env(1) | {"CUDA_VISIBLE_DEVICES": "0,1"}, "srun", 2, 1, [1]),
    (mpirun_env(1), "mpirun", 2, 1, [1]),
    (mpirun_env(1) | {"OMPI_COMM_WORLD_LOCAL_SIZE": "1"}, "mpirun", 2, 1, None),
    # mpirun in a SLURM allocation: its ranks inherit the step of its daemons (one task per node)
    (srun_env(0, nodes=2) | mpirun_env(3, size=4), "mpirun", 4, 3, [3]),
    # explicit beats both, and takes the launcher's numbers when it gives none
    (srun_env(1) | {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"},
     "JAX_COORDINATOR_ADDRESS", 3, 2, None),
    (mpirun_env(1) | {"JAX_COORDINATOR_ADDRESS": "h:1"}, "mpirun", 2, 1, [1]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS", 1, 0, None),
], ids=["nothing", "sbatch shell", "one srun task", "one mpirun rank", "srun 2 tasks on a node",
        "srun 1 task per node", "srun bound GPUs", "srun unbound GPUs", "mpirun", "mpirun 1 rank per node",
        "mpirun under SLURM", "explicit over srun", "explicit address under mpirun", "explicit one process"])
def test_the_launcher_is_chosen_from_the_environment(env, launcher, n, me, devices):
    job = launch.detect(env)
    if launcher is None:
        assert job is None
        return
    assert (job.launcher, job.num_processes, job.process_id, job.local_device_ids) == (launcher, n, me, devices)
    if "JAX_COORDINATOR_ADDRESS" in env:
        assert job.address == "h:1"


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({k: v for k, v in mpirun_env(0).items() if k != "OMPI_MCA_orte_hnp_uri"},  # Open MPI 5 (PRRTE)
     "mpirun started 2 processes but does not say where it runs"),
], ids=["explicit without numbers", "Open MPI 5"])
def test_a_launch_that_cannot_form_a_job_is_one_clear_error(env, message):
    with pytest.raises(UserError, match=message):
        launch.detect(env)


@pytest.mark.parametrize("env", [
    srun_env(0) | {"SLURM_STEP_NODELIST": nodes} for nodes in
    ("node001", "node001,host2", "node[001-015],host2", "node[001,007-015],host2")] + [
    mpirun_env(0), mpirun_env(0) | {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp6://[fe80::b9b,2620:10d::2]:43370"},
    srun_env(0) | {"JAX_COORDINATOR_PORT": "1234"}], ids=lambda env: str(sorted(env.items()))[-60:])
def test_the_coordinator_is_where_jax_would_put_it(monkeypatch, env):
    """The same host and port as jax's own SlurmCluster and OmpiCluster (kept, since a job may mix launches)."""
    from jax._src.clusters import OmpiCluster, SlurmCluster

    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cluster = OmpiCluster if "OMPI_COMM_WORLD_SIZE" in env else SlurmCluster
    assert cluster.is_env_present()
    expected = cluster.get_coordinator_address(None, env.get("JAX_COORDINATOR_PORT"))
    assert launch.detect(env).address == expected


def test_jax_gets_the_whole_launch_with_its_detection_off(monkeypatch):
    """One task per node: local_device_ids stays None (every device of the node) only because jax's detection
    is off; with it on, jax would give the process device SLURM_LOCALID alone."""
    from mingpt_palm import distributed

    calls = []
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_"))]:
        monkeypatch.delenv(key)
    for key, value in srun_env(1, nodes=2).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "StdoutWithoutGloo", lambda: None)
    distributed.initialize(timeout_s=60)
    (kw,) = calls
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == ("localhost:61586", 2, 1)
    assert kw["local_device_ids"] is None and kw["cluster_detection_method"] == "deactivate"


# --- jobs of two local processes -------------------------------------------------------------------

def start(launcher: str, tasks, cwd, args, port: int):
    """Processes `tasks` of a two-process job launched by `launcher` (simulated), on `port`."""
    return [spawn_trainer(cli_env(devices=2) | LAUNCHERS[launcher](task) | {"JAX_COORDINATOR_PORT": str(port)},
                          args, cwd) for task in tasks]


def assert_trained(outs, returncodes, exp):
    assert returncodes == [0, 0], outs
    assert "4 x cpu (2 process(es))" in outs[0][0] and "step 4/4:" in outs[0][0], outs
    assert outs[1][0] == "" and "error" not in outs[0][1] + outs[1][1], outs
    assert steps_in(exp / "checkpoints") == [4]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_launcher_environment_forms_a_job_that_trains(shakespeare, tmp_path, launcher):
    """No JAX_COORDINATOR_ADDRESS: 2 processes x 2 devices form one job of 4 devices from what srun or
    mpirun tells each process (the old code trained each one alone, on 2 devices, into the same directory)."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *ARGS, "--experiment-name", "job"]
    procs = start(launcher, [0, 1], tmp_path, args, free_port())
    outs = finish(procs)
    assert_trained(outs, [p.returncode for p in procs], tmp_path / "job")


@pytest.mark.parametrize("launcher, present", [("srun", 0), ("mpirun", 1)])
def test_a_missing_task_is_named_within_the_distributed_timeout(shakespeare, tmp_path, launcher, present):
    """One process of two started: after --distributed-timeout 5 it names the other, the launcher and the
    coordinator's address in one line, and exits 2 (the old code trained alone)."""
    port, began = free_port(), time.monotonic()
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *ARGS, "--experiment-name", "alone",
            "--distributed-timeout", 5]
    (proc,) = start(launcher, [present], tmp_path, args, port)
    ((out, err),) = finish([proc], timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 2 and "Traceback" not in err and "Check failure" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    if present == 0:
        assert line.startswith(f"error: process 0 of 2 (srun) could not form the job within 5 s: process 1 did "
                               f"not join at localhost:{port} (the first node of srun step 4242.0, port from "
                               "JAX_COORDINATOR_PORT); start all 2 tasks of the job in one srun step, one per "
                               "node (srun --ntasks-per-node=1 "), line
    else:
        assert line.startswith(f"error: process 1 of 2 (mpirun) could not form the job within 5 s: process 0 (the "
                               f"coordinator, at 127.0.0.1:{port}: mpirun's host, port from JAX_COORDINATOR_PORT) "
                               "is not answering; start all 2 ranks with one mpirun -n 2"), line
    assert line.endswith("or raise --distributed-timeout")
    assert 5 < took < 30, took
    assert not (tmp_path / "alone").exists()


# --- the real launchers, where installed -------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("mpirun"), reason="mpirun not installed (Open MPI: apt-get install openmpi-bin)")
def test_mpirun_forms_a_job_that_trains(shakespeare, tmp_path):
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *ARGS, "--experiment-name", "mpi"]
    env = cli_env(devices=2) | {"JAX_COORDINATOR_PORT": str(free_port())}
    proc = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "--tag-output", "-x",
                           "JAX_COORDINATOR_PORT", "-x", "XLA_FLAGS", "-n", "2", sys.executable,
                           str(ROOT / "train_char.py"), *map(str, args)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 x cpu (2 process(es))" in proc.stdout and "step 4/4:" in proc.stdout, proc.stdout
    assert steps_in(tmp_path / "mpi" / "checkpoints") == [4]


def without_slurm(env) -> dict:
    """env without the variables of a SLURM job the suite itself may run in (they would point srun there)."""
    return {k: v for k, v in env.items() if not k.startswith("SLURM")}


@pytest.fixture
def slurm(tmp_path):
    """A private single-node SLURM cluster (slurmctld + slurmd on free ports, no munge), started in about a
    second where slurm-wlm is installed and this user may start its daemons; {"SLURM_CONF": its config}."""
    if not all(map(shutil.which, ("srun", "slurmctld", "slurmd"))):
        pytest.skip("srun, slurmctld or slurmd not installed (Debian: apt-get install slurm-wlm)")
    d, host, user = tmp_path / "slurm", socket.gethostname().split(".")[0], getpass.getuser()
    d.mkdir()
    (d / "slurm.conf").write_text("\n".join([
        "ClusterName=mingpt", f"SlurmctldHost={host}", f"SlurmUser={user}", f"SlurmdUser={user}",
        "AuthType=auth/none", "CredType=cred/none", f"StateSaveLocation={d}", f"SlurmdSpoolDir={d}",
        f"SlurmctldPidFile={d}/ctld.pid", f"SlurmdPidFile={d}/d.pid", f"SlurmctldLogFile={d}/ctld.log",
        f"SlurmdLogFile={d}/d.log", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE", ""]))
    env = without_slurm(os.environ) | {"SLURM_CONF": str(d / "slurm.conf")}
    daemons = [subprocess.Popen([daemon, "-D"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
               for daemon in ("slurmctld", "slurmd")]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and all(p.poll() is None for p in daemons):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            logs = " | ".join((d / f).read_text()[-300:] for f in ("ctld.log", "d.log") if (d / f).exists())
            pytest.skip(f"a single-node SLURM cluster did not start here within 60 s: {logs}")
        yield {"SLURM_CONF": env["SLURM_CONF"]}
    finally:
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_srun_forms_a_job_that_trains(shakespeare, tmp_path, slurm):
    """A real `srun -N1 -n2` (one node, two tasks) on a private SLURM cluster."""
    args = ["--dataset-path", shakespeare, "--experiments-dir", tmp_path, *ARGS, "--experiment-name", "srun"]
    env = without_slurm(cli_env(devices=2)) | slurm | {"JAX_COORDINATOR_PORT": str(free_port())}
    proc = subprocess.run(["srun", "-N1", "-n2", "--label", "--kill-on-bad-exit=1", sys.executable,
                           str(ROOT / "train_char.py"), *map(str, args)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0: " in proc.stdout and "4 x cpu (2 process(es))" in proc.stdout and "step 4/4:" in proc.stdout, proc.stdout
    assert steps_in(tmp_path / "srun" / "checkpoints") == [4]
