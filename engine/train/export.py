"""Consolidated fp32 weights from a DeepSpeed checkpoint → this project's safetensors + config.json format.

CLI: `python -m engine.train.export OUTPUT_DIR/ckpt-<step> EXPORT_DIR` (or OUTPUT_DIR, which uses `latest`).
"""

import argparse
import logging
from pathlib import Path

import torch

from engine.train.checkpointing import latest_checkpoint
from engine.train.state import model_name

logger = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt

def _model_states_file(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob(f"*{MODEL_STATES}"), key=lambda p: len(p.name))  # rank 0's file has the shortest name
    return found[0] if found else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A `ckpt-<step>` dir, or a run's output dir (→ its latest complete checkpoint)."""
    path = Path(path)
    if path.is_dir() and _model_states_file(path) is not None:
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{path} is neither a DeepSpeed checkpoint dir (with {MODEL_STATES}) nor an output "
                                "dir holding a complete ckpt-<step> checkpoint")
    return found


def consolidated_state_dict(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict with the model's own names, client state). ZeRO shards are merged by DeepSpeed's
    `zero_to_fp32` from the fp32 master weights. Stage 0 checkpoints hold the module weights, which under bf16/fp16
    are a rounded copy: the fp32 masters in the optimizer state replace them (`stage0_master_weights`)."""
    states = torch.load(_model_states_file(ckpt_dir), map_location="cpu", weights_only=False)
    if any(ckpt_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # lazy: one consolidated tensor at a time, not every rank's partitions and Adam moments at once
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
        state = {name: tensor.contiguous() for name, tensor in lazy.items()}
    else:
        state = states["module"]
    state = {model_name(k): v.float() for k, v in state.items()}
    state.update(stage0_master_weights(states.get("optimizer"), states.get("master_param_names"), state))
    return state, states


def stage0_master_weights(optimizer_state: dict | None, names_by_group: list[list[str]] | None,
                          module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 masters of DeepSpeed's stage-0 mixed-precision optimizers, by parameter name: `fp32_groups` (a list of
    tensors per group) or `fp32_groups_flat` (one flat tensor per group), in the order of our parameter groups, whose
    names the trainer saves as `master_param_names`. Empty for fp32 runs (no masters)."""
    if not optimizer_state or not names_by_group:
        return {}
    if "fp32_groups" in optimizer_state:
        groups = optimizer_state["fp32_groups"]
    elif "fp32_groups_flat" in optimizer_state:
        groups = [flat.split([module_state[name].numel() for name in names])
                  for flat, names in zip(optimizer_state["fp32_groups_flat"], names_by_group)]
    else:
        return {}
    masters = {}
    for names, tensors in zip(names_by_group, groups, strict=True):
        for name, tensor in zip(names, tensors, strict=True):
            masters[name] = tensor.detach().float().reshape(module_state[name].shape)
    return masters


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes `out_dir/{model.safetensors, config.json}` from a DeepSpeed checkpoint written by our trainer."""
    from engine.checkpoint import save_pretrained
    from engine.factory import create_model, runnable_config

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    state, client = consolidated_state_dict(ckpt_dir)
    if "model_config" not in client:
        raise ValueError(f"{ckpt_dir} has no model_config in its client state: it was not written by engine.train")
    with torch.device("meta"):  # no random init and no second copy: the loaded tensors are assigned to the model
        model = create_model(**runnable_config(client["model_config"]))  # runs where the kernels cannot
    model.load_state_dict(state, strict=True, assign=True)
    save_pretrained(model, out_dir)
    logger.info("exported %s → %s", ckpt_dir, out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="ckpt-<step> directory, or a training output dir (uses its latest)")
    parser.add_argument("out_dir", help="where to write model.safetensors + config.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(export_checkpoint(args.checkpoint, args.out_dir))


if __name__ == "__main__":
    main()
