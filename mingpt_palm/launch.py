"""Which processes form one job, read from the environment a launcher gives them (a pure function of it).

Three launchers, the first that applies wins:

1. JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID): set by hand, the original contract.
   Under srun or mpirun the two numbers may be left out: the launcher's are taken.
2. Open MPI's mpirun (OMPI_COMM_WORLD_SIZE > 1). It goes before SLURM, as in jax's own detection, because
   mpirun inside a SLURM allocation starts its daemons with srun: its ranks inherit a SLURM step that
   describes the daemons (one per node), not the ranks. A program srun starts directly has no OMPI_
   variables before MPI_Init, which this program never calls.
3. SLURM's srun (SLURM_STEP_ID present and more than one task in the step). An sbatch script's own shell
   (the batch step) and salloc's have SLURM_JOB_ID and SLURM_NTASKS but no SLURM_STEP_ID: they are not
   tasks of a step and run alone, as does a step of one task.

The coordinator (hosted by process 0) is where jax's cluster detection puts it: the first node of
SLURM_STEP_NODELIST, or the host of mpirun (OMPI_MCA_orte_hnp_uri); its port derived from the job id,
or JAX_COORDINATOR_PORT.

Devices: this program's design is one process per node that drives all of its devices. jax's detection
instead gives each process only the device numbered by its local rank whenever a launcher names one, which
would leave 7 of 8 GPUs idle under `srun --ntasks-per-node=1`. So the launch is passed to jax whole, its
detection off: a process alone on its node sees every device; several tasks on one node (one per GPU) see
one each, as jax would give them, unless the launcher already bound one GPU to each (CUDA_VISIBLE_DEVICES
names a single device; its number would then be 0, not the local rank). On CPUs the choice is ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from mingpt_palm.errors import UserError

# jax's port for a job: in the ephemeral range [65535 - 2**12 + 1, 65535], from the job id (two jobs whose ids
# differ by a multiple of 4096 clash on a shared node: JAX_COORDINATOR_PORT chooses another).
_PORTS = 2**12
_FIRST_PORT = 65535 - _PORTS + 1


@dataclasses.dataclass(frozen=True)
class Launch:
    launcher: str  # "JAX_COORDINATOR_ADDRESS", "srun" or "mpirun"
    address: str | None  # the coordinator's host:port (None: the launcher does not say; see detect)
    num_processes: int
    process_id: int
    local_device_ids: list[int] | None  # None: every device this process sees
    origin: str = ""  # where the address comes from, for messages ("" when given by hand)
    hint: str = ""  # how to start every process of the job, for the message of a job that does not form


def detect(env: Mapping[str, str]) -> Launch | None:
    """The job this process belongs to, or None when it runs alone (one process: nothing to join)."""
    launched = _ompi(env) or _slurm(env)
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if address:
        if launched and "JAX_NUM_PROCESSES" not in env and "JAX_PROCESS_ID" not in env:
            return dataclasses.replace(launched, address=address, origin="")
        try:
            n, me = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be too "
                            f"(whole numbers; now {env.get('JAX_NUM_PROCESSES')!r} and {env.get('JAX_PROCESS_ID')!r})"
                            ", or leave all three out under srun or mpirun") from None
        return Launch("JAX_COORDINATOR_ADDRESS", address, n, me, None,
                      hint=f"start all {n} processes with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES")
    if launched and launched.address is None:
        raise UserError(f"mpirun started {launched.num_processes} processes but does not say where it runs "
                        "(no OMPI_MCA_orte_hnp_uri: Open MPI 5 sets none); pass the coordinator's address: "
                        "mpirun -x JAX_COORDINATOR_ADDRESS=HOST_OF_RANK_0:PORT ...")
    return launched


def _slurm(env: Mapping[str, str]) -> Launch | None:
    if "SLURM_STEP_ID" not in env or "SLURM_JOB_ID" not in env:  # not a task of an srun step
        return None
    n = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if n < 2:
        return None
    port, port_from = _port(env, int(env["SLURM_JOB_ID"]), "SLURM_JOB_ID")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", "")
    here = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"),
                          int(env.get("SLURM_NODEID", 0)))
    step = f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    return Launch("srun", f"{_first_host(nodes)}:{port}", n, int(env["SLURM_PROCID"]),
                  _devices(int(env.get("SLURM_LOCALID", 0)), here, env),
                  origin=f"the first node of srun step {step}, {port_from}",
                  hint=f"start all {n} tasks of the job in one srun step, one per node "
                       "(srun --ntasks-per-node=1 python train_char.py ...)")


def _ompi(env: Mapping[str, str]) -> Launch | None:
    n = int(env.get("OMPI_COMM_WORLD_SIZE") or 1)
    if n < 2:
        return None
    uri, address, origin = env.get("OMPI_MCA_orte_hnp_uri"), None, ""
    if uri:
        # "JOBID.0;tcp://10.0.0.1,10.1.0.1:34911;tcp6://[...]": mpirun's host; a job id is a multiple of 2**12
        host = re.search(r"tcp://([^,:;]+)|tcp6://\[([^,\]]+)", uri)
        if host is None:
            raise UserError(f"cannot read mpirun's host from OMPI_MCA_orte_hnp_uri={uri!r}; pass "
                            "mpirun -x JAX_COORDINATOR_ADDRESS=HOST_OF_RANK_0:PORT ...")
        port, port_from = _port(env, int(uri.split(".", 1)[0]) // _PORTS, "mpirun's job id")
        address, origin = f"{host.group(1) or host.group(2)}:{port}", f"mpirun's host, {port_from}"
    here = int(env["OMPI_COMM_WORLD_LOCAL_SIZE"]) if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None
    return Launch("mpirun", address, n, int(env["OMPI_COMM_WORLD_RANK"]),
                  _devices(int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), here, env), origin=origin,
                  hint=f"start all {n} ranks with one mpirun -n {n}, one per node (--npernode 1)")


def _port(env: Mapping[str, str], job: int, what: str) -> tuple[str, str]:
    if env.get("JAX_COORDINATOR_PORT"):
        return env["JAX_COORDINATOR_PORT"], "port from JAX_COORDINATOR_PORT"
    return str(job % _PORTS + _FIRST_PORT), f"port from {what} (JAX_COORDINATOR_PORT sets another)"


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[003-010,012],cpu1" -> "gpu003", "r[1-2]-n[01-04]" -> "r1-n01"."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist).group(0)  # up to the first comma outside brackets
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", first)  # each range: its first number, zero padding kept


def _tasks_on_node(spec: str | None, node: int) -> int | None:
    """Tasks on node number `node`, from SLURM's "2(x3),1" (3 nodes of 2 tasks, then one of 1); None if unknown."""
    counts = []
    for part in (spec or "").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else None


def _devices(local_rank: int, tasks_here: int | None, env: Mapping[str, str]) -> list[int] | None:
    if tasks_here == 1:
        return None  # alone on its node: all of them
    bound = [env[v] for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES") if env.get(v)]
    if bound and all(len(v.split(",")) == 1 for v in bound):
        return None  # the launcher gave this task one GPU already (srun --gpus-per-task=1, --gpu-bind)
    return [local_rank]  # one device per task, as jax does
