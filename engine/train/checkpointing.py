"""Atomic DeepSpeed checkpoints with auto-resume, also on another number of ranks.

Layout in `output_dir`: `ckpt-<step>/` (DeepSpeed files, sharded under ZeRO, plus `rng_state_rank<r>.pt` and
`layout.json`: the world size, global batch and ZeRO stage that wrote it) and `latest` (a small text file naming the
newest complete checkpoint). A checkpoint is written to `ckpt-<step>.tmp/`,
renamed once every rank has finished, and only then is `latest` replaced (write-temp + `os.replace`). A SIGKILL at any
moment therefore leaves either the previous checkpoint or the new one, never a half-written one named by `latest`.

Another world size: ZeRO-0 checkpoints hold the whole optimizer state and load on any number of ranks. ZeRO 1-3
shards are first converted by rank 0 into DeepSpeed's universal format (`ckpt-<step>-universal/`, one folder of fp32
weights and Adam moments per parameter; `universal_checkpoint`), which any world size loads; the folder is deleted
once loaded. Weights, moments and the step carry over exactly (tests/test_cluster.py).
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from engine.train.runtime import rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
LATEST = "latest"
LAYOUT_FILE = "layout.json"
UNIVERSAL_SUFFIX = "-universal"


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


def read_layout(ckpt_dir: Path) -> dict | None:
    """{"world_size", "global_batch", "steps_per_epoch", "zero_stage"} of the run that wrote `ckpt_dir` (None for
    checkpoints written before the file existed)."""
    path = ckpt_dir / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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
        layout = {key: client_state[key] for key in ("world_size", "global_batch", "steps_per_epoch")}
        (root / tmp_name / LAYOUT_FILE).write_text(json.dumps({**layout, "zero_stage":
                                                               engine.zero_optimization_stage()}) + "\n")
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
    """Rank 0, before a run picks its checkpoint: puts back a checkpoint an overwrite had moved aside when the kill
    came before its replacement was in place, then deletes `ckpt-*.tmp` leftovers of killed saves and conversions and
    `-universal` copies (derived data, made again when needed)."""
    root = Path(output_dir)
    for old in root.glob("ckpt-*.old.tmp"):
        final = root / old.name.removesuffix(".old.tmp")
        if old.is_dir() and not final.exists():
            os.rename(old, final)
            logger.info("restored %s (a rewrite of it was killed)", final)
    for leftover in [*root.glob("ckpt-*.tmp"), *root.glob("ckpt-*" + UNIVERSAL_SUFFIX)]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            logger.info("removed %s", leftover)


def convert_to_universal(ckpt_dir: Path) -> Path:
    """Rank 0: `ckpt-<step>/` → `ckpt-<step>-universal/` (DeepSpeed's ds_to_universal, in a process of its own: its
    worker pool must not fork this multi-threaded one; written to a `.tmp` folder and renamed, so a kill leaves
    nothing that looks complete). Returns the folder."""
    out = ckpt_dir.with_name(ckpt_dir.name + UNIVERSAL_SUFFIX)
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converting %s to DeepSpeed's universal format for another number of ranks", ckpt_dir)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt_dir), "--output_folder", str(tmp), "--num_extract_workers", workers,
                           "--num_merge_workers", workers, "--inject_missing_state"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting {ckpt_dir} for another number of ranks failed:\n{done.stderr[-3000:]}")
    (ckpt_dir.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; ours is `latest`
    os.rename(tmp, out)
    return out


def _fix_stage3_universal_load(engine, universal_dir: Path) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every param group the settings of saved group 0 and one shared
    `step` tensor (which AdamW then increments once per group): restore each group's settings and its own step."""
    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):  # ZeRO wrapper → the torch AdamW
        optimizer = optimizer.optimizer
    if len(saved_groups) != len(optimizer.param_groups):
        raise RuntimeError(f"{universal_dir}: {len(saved_groups)} saved parameter groups, the optimizer has "
                           f"{len(optimizer.param_groups)}")
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = optimizer.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_checkpoint(engine, ckpt_dir: Path, rank: int, universal: bool = False, seed: int = 0) -> dict:
    """Restores model, optimizer, loss scaler and this rank's RNG state; returns the client state. `universal`: load
    the `-universal` folder `convert_to_universal` wrote (the engine was built with `load_universal`). A rank the
    checkpoint has no RNG state for (more ranks than wrote it) seeds its generators from (seed, rank, step)."""
    source = ckpt_dir.with_name(ckpt_dir.name + UNIVERSAL_SUFFIX) if universal else ckpt_dir
    path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {source}")
    if universal and engine.zero_optimization_stage() == 3:
        _fix_stage3_universal_load(engine, source)
    rng_file = ckpt_dir / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        seed_everything(seed + 1000 * rank + 7 * client_state["step"])
        logger.info("rank %d: no RNG state in %s (written by fewer ranks); generators seeded anew", rank, ckpt_dir)
    return client_state
