"""Atomic DeepSpeed checkpoints with auto-resume.

Layout in `output_dir`: `ckpt-<step>/` (DeepSpeed files, sharded under ZeRO, plus `rng_state_rank<r>.pt`) and
`latest` (a small text file naming the newest complete checkpoint). A checkpoint is written to `ckpt-<step>.tmp/`,
renamed once every rank has finished, and only then is `latest` replaced (write-temp + `os.replace`). A SIGKILL at any
moment therefore leaves either the previous checkpoint or the new one, never a half-written one named by `latest`.
"""

import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from engine.train.runtime import rng_state, set_rng_state

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs in `output_dir`, oldest first (`.tmp` dirs are incomplete by construction)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by `latest`, or the newest complete one when `latest` is missing or stale."""
    root = Path(output_dir)
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text().strip()
        if _CKPT_RE.match(named.name) and named.is_dir():
            return named
        logger.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest,
                       named.name)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict, rank: int, keep: int = 2,
                    rank0_files: dict[str, object] | None = None, overwrite: bool = False) -> Path:
    """Collective: every rank calls it. `rank0_files` (name → object, e.g. EMA weights) are `torch.save`d into the
    checkpoint by rank 0. Returns the final checkpoint dir. A checkpoint of this step that exists already is kept,
    unless `overwrite` (its client state changed): the new one is then written beside it and swapped in."""
    root = Path(output_dir)
    final = root / checkpoint_name(step)
    if final.is_dir() and not overwrite:  # already saved at this step (e.g. a stop signal right after a save)
        return final
    tmp_name = checkpoint_name(step) + ".tmp"
    if rank == 0:
        shutil.rmtree(root / tmp_name, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tmp_name / f"rng_state_rank{rank}.pt")
    if rank == 0:
        for name, obj in (rank0_files or {}).items():
            torch.save(obj, root / tmp_name / name)
    _barrier()
    if rank == 0:
        if final.is_dir():  # overwrite: a kill between the renames leaves the older checkpoints to resume from
            os.rename(final, root / (checkpoint_name(step) + ".old.tmp"))
        os.rename(root / tmp_name, final)
        shutil.rmtree(root / (checkpoint_name(step) + ".old.tmp"), ignore_errors=True)
        _write_atomic(root / LATEST, final.name + "\n")
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    _barrier()
    return final


def remove_incomplete(output_dir: str | Path) -> None:
    """Deletes `ckpt-*.tmp` leftovers of a save that was killed (rank 0 only, before training starts)."""
    for tmp in Path(output_dir).glob("ckpt-*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info("removed incomplete checkpoint %s", tmp)


def load_checkpoint(engine, ckpt_dir: Path, rank: int) -> dict:
    """Restores model, optimizer, loss scaler and this rank's RNG state; returns the client state."""
    path, client_state = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt_dir}")
    rng_file = ckpt_dir / f"rng_state_rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: the checkpoint was written by fewer ranks than this run has")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
