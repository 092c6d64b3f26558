"""Process setup: which launcher started us (torchrun, deepspeed, srun, mpirun or none), the process group, the
device, seeding."""

import logging
import os
import random
import shutil
import socket
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from engine.config import ConfigError
from engine.device import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    launcher: str = "single"
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Launch:
    """Where this process stands in its job, read from the launcher's environment (`detect_launch`)."""

    launcher: str  # torchrun | deepspeed | environment | openmpi | mpich | slurm | single
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None  # None: not in the environment (`rendezvous` finds one)
    master_port: int | None
    nodelist: str = ""  # SLURM's compressed host list of the step (where MASTER_ADDR can come from)
    job_id: str = ""  # a value shared by every process of this launch and no other (derives a default port)
    ranks_on_node: int = 0  # MPI: ranks on this node (all of them on one node: no MASTER_ADDR needed)


_MPI_VARIABLES = {  # launcher → (rank, world size, local rank, local size); the first present wins
    # Before SLURM's: `mpirun` inside a SLURM allocation also leaves the SLURM variables of its daemons' step.
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI (hydra)
}
_OPENMPI_JOB_VARIABLES = ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri")


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"{name} is not set although the launcher's other variables are: start the job with "
                              "the launcher's own command (see the README, 'Running on a cluster')")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer; unset it or fix the launch script") from None


def _port(env: Mapping[str, str]) -> int | None:
    return _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None


def detect_launch(env: Mapping[str, str]) -> Launch:
    """Who started this process, and its rank, local rank and world size.

    RANK/WORLD_SIZE (torchrun, the `deepspeed` launcher with pdsh or `--no_ssh`, or set by hand) win; then OpenMPI's
    `mpirun` (OMPI_COMM_WORLD_*), MPICH/Intel MPI (PMI_*), and a SLURM job step started by `srun` (SLURM_PROCID,
    SLURM_STEP_NUM_TASKS, SLURM_LOCALID: a plain `python` inside an sbatch script is not a step and stays one rank).
    Anything else is a one-rank run. MASTER_ADDR/MASTER_PORT are taken from the environment when present."""
    addr = env.get("MASTER_ADDR") or None
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun / deepspeed run by srun, or MPI ranks (mpirun's daemons are a SLURM step of their own): their RANK
        # is not SLURM_PROCID
        own_launcher = any(name in env for name in ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "OMPI_COMM_WORLD_RANK",
                                                    "PMI_RANK"))
        if "SLURM_STEP_ID" in env and not own_launcher and env["RANK"] != env.get("SLURM_PROCID", env["RANK"]):
            raise ConfigError(f"RANK={env['RANK']} is exported but this srun task is SLURM_PROCID="
                              f"{env['SLURM_PROCID']}: unset RANK and WORLD_SIZE in the job script (srun's own "
                              "variables are read)")
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed" if "CROSS_RANK" in env
                    else "environment")
        return Launch(launcher, _int(env, "RANK"), _int(env, "LOCAL_RANK", 0), _int(env, "WORLD_SIZE"), addr,
                      _port(env), job_id=env.get("TORCHELASTIC_RUN_ID", ""))
    for launcher, (rank, size, local, local_size) in _MPI_VARIABLES.items():
        if rank in env and size in env and local in env:  # srun's PMI-2 plugin sets PMI_RANK too, not the local rank
            job_id = next((env[name] for name in _OPENMPI_JOB_VARIABLES if name in env), "") \
                if launcher == "openmpi" else env.get("PMI_KVSNAME", "")
            return Launch(launcher, _int(env, rank), _int(env, local, 0), _int(env, size), addr, _port(env),
                          job_id=job_id, ranks_on_node=_int(env, local_size, 0))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        size = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        return Launch("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID", 0), _int(env, size),
                      addr, _port(env), nodelist=env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""),
                      job_id=env.get("SLURM_JOB_ID", "") + "." + env.get("SLURM_STEP_ID", ""))
    return Launch("single", 0, 0, 1, addr, _port(env))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: `scontrol show hostnames` where it exists, else parsed here
    ("gpu-[07-09,12],cpu1" → "gpu-07")."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    text = nodelist.strip()
    host, depth = "", 0
    for char in text:  # the first comma outside brackets ends the first host group
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        host += char
    if "[" in host:  # prefix[a-b,c]suffix → prefix + a + suffix
        prefix, rest = host.split("[", 1)
        ranges, suffix = rest.split("]", 1) if "]" in rest else (rest, "")
        host = prefix + ranges.split(",")[0].split("-")[0] + suffix
    if not host:
        raise ConfigError(f"cannot read the first host of the SLURM node list {nodelist!r}: export MASTER_ADDR")
    return host


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _derived_port(job_id: str) -> int:
    """A port in [15000, 25000) that every process of one job derives alike (below Linux's ephemeral range)."""
    return 15000 + zlib.crc32(job_id.encode()) % 10000


def rendezvous(launch: Launch) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT for this launch: the environment's, else
    - one rank: 127.0.0.1 and a free port;
    - SLURM: the step's first host, and a port derived from the job and step ids;
    - MPI: 127.0.0.1 when every rank is on this node (no MASTER_ADDR needed), a port derived from the MPI job id;
      several nodes need MASTER_ADDR (e.g. `mpirun -x MASTER_ADDR=$(hostname)`)."""
    if launch.world_size == 1:
        return launch.master_addr or "127.0.0.1", launch.master_port or _free_port()
    addr, port = launch.master_addr, launch.master_port
    if addr is None:
        if launch.launcher == "slurm" and launch.nodelist:
            addr = first_host(launch.nodelist)
        elif launch.ranks_on_node == launch.world_size:  # MPI, every rank on this node
            addr = "127.0.0.1"
        else:
            raise ConfigError(f"MASTER_ADDR is not set for a {launch.world_size}-rank {launch.launcher} launch across "
                              "nodes: export the host name of rank 0 (e.g. `mpirun -x MASTER_ADDR=<host of rank 0> "
                              "-x MASTER_PORT=29500 ...`)")
    if port is None:
        if not launch.job_id:
            raise ConfigError(f"MASTER_PORT is not set for a {launch.world_size}-rank {launch.launcher} launch: "
                              "export a free port number, the same on every rank (e.g. MASTER_PORT=29500)")
        port = _derived_port(launch.job_id)
    return addr, port


def _cuda_index(local_rank: int) -> int:
    """The GPU of this local rank: local_rank, or 0 where the launcher gave each task its own single GPU
    (`srun --gpus-per-task=1` sets CUDA_VISIBLE_DEVICES per task)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise ConfigError(f"local rank {local_rank} but {count} GPUs are visible: start one process per GPU (e.g. "
                      "`srun --ntasks-per-node=<GPUs per node>` or `--nproc_per_node=<GPUs per node>`)")


def init_distributed(device: str, timeout_s: float = 600.0) -> DistInfo:
    """Joins (or creates) the process group of this launch (`detect_launch`): NCCL on CUDA, gloo on CPU.

    The launcher's rank variables become RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (what DeepSpeed and
    torch's env:// read); a plain `python recipe.py` gets a 1-rank group on a free local port, so the same DeepSpeed
    code path runs everywhere. A collective that waits longer than `timeout_s` for another rank fails (a dead or hung
    rank ends the job instead of stalling it; engine/train/watchdog.py names it first). Rank 0 logs the launcher,
    the world size and the ranks per node.
    """
    import deepspeed
    import torch.distributed as dist

    device_type = resolve_device(device)
    launch = detect_launch(os.environ)
    if not dist.is_initialized():
        addr, port = rendezvous(launch)
        os.environ.update(RANK=str(launch.rank), LOCAL_RANK=str(launch.local_rank),
                          WORLD_SIZE=str(launch.world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", launch.local_rank))
    cuda_index = _cuda_index(local_rank) if device_type == "cuda" else 0
    if device_type == "cuda":
        torch.cuda.set_device(cuda_index)
    if not dist.is_initialized():
        if launch.rank == 0:  # the first run on a machine compiles DeepSpeed's shared-memory op (~30 s)
            logger.info("joining the process group of %d rank(s) at %s:%s (%s; a first run also builds DeepSpeed's "
                        "communication op)", launch.world_size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"],
                        "nccl" if device_type == "cuda" else "gloo")
        try:
            deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                       timeout=timedelta(seconds=timeout_s))
        except dist.DistNetworkError as err:
            if "EADDRINUSE" not in str(err):
                raise
            raise ConfigError(f"the rendezvous port {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is in "
                              "use (another job on this node?): export MASTER_PORT=<a free port>, the same for every "
                              "rank") from None
    hosts = [socket.gethostname()]
    if dist.get_world_size() > 1:
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
    info = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(),
                    torch.device("cuda", cuda_index) if device_type == "cuda" else torch.device("cpu"),
                    launch.launcher, len(set(hosts)))
    if info.is_main:
        per_node = sorted({hosts.count(host) for host in hosts})
        logger.info("launcher: %s; %d rank(s) on %d node(s), %s per node; collective timeout %g s", launch.launcher,
                    info.world_size, info.nodes, "/".join(map(str, per_node)), timeout_s)
    logger.debug("rank %d/%d on %s (%s)", info.rank, info.world_size, info.device, hosts[info.rank])
    return info


MMAP_THRESHOLD_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def unmap_large_frees() -> bool:
    """Gives every CPU allocation of 4 MiB or more its own mapping, returned to the system when freed. glibc otherwise
    raises its mmap threshold to the largest block freed (up to 32 MiB) and keeps such blocks in a heap that
    fragments: on CPU ranks, ZeRO's transient gathers and buckets stayed resident (benchmarks/bench_memory.py; smaller
    blocks, such as the CPU demo's activations, stay in the heap, which is faster). False where the C library is not
    glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
