"""Process setup: device choice, process group (deepspeed launcher, torchrun or a plain single process), seeding."""

import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use --device=cpu (or auto)")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected auto, cuda or cpu")
    return device


def init_distributed(device: str) -> DistInfo:
    """Joins (or creates) the process group: NCCL on CUDA, gloo on CPU.

    Launchers (`deepspeed`, `torchrun`) export RANK/WORLD_SIZE/MASTER_*; a plain `python recipe.py` gets a 1-rank
    group on a free local port, so the same DeepSpeed code path runs everywhere.
    """
    import deepspeed
    import torch.distributed as dist

    device_type = resolve_device(device)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if int(os.environ["RANK"]) == 0:  # the first run on a machine compiles DeepSpeed's shared-memory op (~30 s)
            logger.info("joining the process group (%s; a first run also builds DeepSpeed's communication op)",
                        "nccl" if device_type == "cuda" else "gloo")
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(),
                    torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu"))
    logger.info("rank %d/%d on %s", info.rank, info.world_size, info.device)
    return info


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
