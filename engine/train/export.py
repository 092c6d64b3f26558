"""Consolidated fp32 weights from a DeepSpeed checkpoint → this project's safetensors + config.json format.

CLI: `python -m engine.train.export OUTPUT_DIR/ckpt-<step> EXPORT_DIR` (or OUTPUT_DIR, which uses `latest`).
"""

import argparse
import logging
from pathlib import Path

import torch

from engine.train.checkpointing import latest_checkpoint

logger = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt
_WRAPPER_PREFIXES = ("model.", "_orig_mod.")  # our loss wrapper, torch.compile


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


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
    `zero_to_fp32` from the fp32 master weights; stage 0 checkpoints hold the module weights directly."""
    states = torch.load(_model_states_file(ckpt_dir), map_location="cpu", weights_only=False)
    if any(ckpt_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    else:
        state = states["module"]
    state = {_strip_prefixes(k): v.float() for k, v in state.items()}
    return state, states


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes `out_dir/{model.safetensors, config.json}` from a DeepSpeed checkpoint written by our trainer."""
    from engine.checkpoint import save_pretrained
    from engine.factory import create_model

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    state, client = consolidated_state_dict(ckpt_dir)
    if "model_config" not in client:
        raise ValueError(f"{ckpt_dir} has no model_config in its client state: it was not written by engine.train")
    model = create_model(**client["model_config"])
    model.load_state_dict(state, strict=True)
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
