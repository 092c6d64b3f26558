"""The model's own weights out of whatever wraps it: DeepSpeed (`engine.module`), a task's loss module (`model.`),
`torch.compile` (`_orig_mod.`). Export, the best/final checkpoints and resume all use these two functions."""

import copy
from pathlib import Path

import torch
from torch import nn

WRAPPER_PREFIXES = ("model.", "_orig_mod.")  # a task's loss module, torch.compile


def model_name(name: str) -> str:
    """A parameter name as the wrapped model calls it: every wrapper prefix removed, in any order and nesting."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def model_state_dict(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """fp32 CPU weights with the model's own names on rank 0, None elsewhere. Collective under ZeRO-3 (every rank
    must call it); otherwise the other ranks return at once without copying anything."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    elif rank == 0:
        state = engine.module.state_dict()
    else:
        state = None
    if rank != 0:
        return None
    return {model_name(k): v.detach().float().cpu() for k, v in state.items()}


def save_model(model: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, preprocessing: dict | None = None
               ) -> Path:
    """Writes `state` into a CPU fp32 copy of `model` and saves it (safetensors + config.json, with the
    preprocessing record when given)."""
    from engine.checkpoint import save_pretrained

    clone = copy.deepcopy(model).float().cpu()
    clone.load_state_dict(state)
    return save_pretrained(clone, out_dir, preprocessing)
