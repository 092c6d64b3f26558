"""Exports of a trained model: consolidated fp32 weights from a DeepSpeed checkpoint → this project's safetensors +
config.json format (`export_checkpoint`), and any checkpoint this engine writes → a Hugging Face transformers folder
(`export_hf`, engine/checkpoint/hf_export.py; `recipes/export_hf.py` is its command).

CLI: `python -m engine.train.export OUTPUT_DIR/ckpt-<step> EXPORT_DIR` (or OUTPUT_DIR, which uses `latest`).
"""

import argparse
import importlib.util
import logging
from dataclasses import dataclass
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


def _model_from_config(config: dict) -> torch.nn.Module:
    """An empty model (meta tensors: no init, no memory) of a saved `model.config`: an encoder or a segmenter."""
    from engine.factory import create_model, runnable_config

    config = runnable_config(config)  # runs where the kernels cannot
    with torch.device("meta"):
        if "pool_scales" in config:
            from engine.segmentation.model import create_segmenter

            return create_segmenter(config.pop("name"), **config)
        return create_model(**config)


def load_trained(path: str | Path) -> tuple[torch.nn.Module, dict | None]:
    """(model, its preprocessing record or None) from any checkpoint this engine writes: a `save_pretrained`
    folder (a pretraining export, a fine-tuned best/ or final/), a DeepSpeed `ckpt-<step>` or a run's output dir."""
    from engine.checkpoint import FORMAT_NAME, create_model_from_checkpoint, read_preprocessing
    from engine.checkpoint.read import read_json

    path = Path(path)
    config = path / "config.json"
    if config.is_file() and read_json(config).get("format") == FORMAT_NAME:
        return create_model_from_checkpoint(path), read_preprocessing(path)
    ckpt_dir = resolve_checkpoint_dir(path)
    state, client = consolidated_state_dict(ckpt_dir)
    if "model_config" not in client:
        raise ValueError(f"{ckpt_dir} has no model_config in its client state: it was not written by engine.train")
    model = _model_from_config(client["model_config"])
    model.load_state_dict(state, strict=True, assign=True)
    return model, client.get("preprocessing")


def export_hf(source: str | Path, out_dir: str | Path) -> Path:
    """`source` (see `load_trained`) → `out_dir/{config.json, model.safetensors, preprocessor_config.json}` for
    transformers' BeitForMaskedImageModeling or BeitForImageClassification, atomically. A segmenter is refused with
    the reason (engine/checkpoint/hf_export.py)."""
    from engine.checkpoint import CONFIG_NAME, HF_PREPROCESSOR_NAME, preprocessing_record
    from engine.checkpoint import hf_export as hf
    from engine.checkpoint.write import write_directory

    model, preprocessing = load_trained(source)
    kind = hf.model_kind(model.config)
    if kind == hf.SEGMENTATION:
        raise ValueError(f"{source} is a segmenter: {hf.SEGMENTATION_REFUSAL}")
    if preprocessing is None:
        size = model.config["img_size"]
        side = size if isinstance(size, int) else size[0]
        preprocessing = preprocessing_record((0.5,) * 3, (0.5,) * 3, side, "bicubic")
        logger.warning("%s records no preprocessing: preprocessor_config.json assumes 0.5/0.5 at %d px, no crop",
                       source, side)
    config = hf.hf_config(model.config, kind, preprocessing.get("class_names"))
    tensors = hf.official_to_hf(model.state_dict(), kind)
    texts = {CONFIG_NAME: hf.dump(config), HF_PREPROCESSOR_NAME: hf.dump(hf.preprocessor_config(preprocessing))}
    write_directory(out_dir, tensors, texts)
    logger.info("exported %s → %s (%s, %d tensors)", source, out_dir, hf.ARCHITECTURES[kind], len(tensors))
    return Path(out_dir)


@dataclass
class ExportHFConfig:
    checkpoint: str = ""  # a save_pretrained folder (pretrained/, best/, final/), a ckpt-<step> or a run's output dir
    output_dir: str = ""  # where config.json, model.safetensors and preprocessor_config.json go
    push_to_hub: str = ""  # a hub repo id (user/name): upload the folder once written ("" : no upload)
    private: bool = False  # create the hub repo private

    def validate(self) -> None:
        from engine.config import ConfigError

        if not self.checkpoint or not Path(self.checkpoint).exists():
            raise ConfigError(f"--checkpoint={self.checkpoint!r}: give an existing checkpoint (an export folder, a "
                              "fine-tuned best/ or final/, a ckpt-<step> or a run's output dir)")
        if not self.output_dir:
            raise ConfigError("--output_dir is required: the folder transformers' from_pretrained will read")
        if self.push_to_hub and importlib.util.find_spec("huggingface_hub") is None:
            raise ConfigError(f"--push_to_hub={self.push_to_hub}: huggingface_hub is not installed; "
                              "pip install '.[hub]'")


def run_export_hf(cfg: ExportHFConfig) -> dict:
    """The export, then the upload when asked → {"output_dir", "url"}; a checkpoint that cannot be exported is a
    one-line ConfigError."""
    from engine.config import ConfigError

    try:
        out = export_hf(cfg.checkpoint, cfg.output_dir)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    url = push_to_hub(out, cfg.push_to_hub, cfg.private) if cfg.push_to_hub else None
    return {"output_dir": out, "url": url}


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Uploads an exported folder to the Hugging Face hub (needs `huggingface_hub` and a login) → the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload BEiT exported by beit-engine")
    return f"https://huggingface.co/{repo_id}"


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes `out_dir/{model.safetensors, config.json}` from a DeepSpeed checkpoint written by our trainer."""
    from engine.checkpoint import save_pretrained

    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    state, client = consolidated_state_dict(ckpt_dir)
    if "model_config" not in client:
        raise ValueError(f"{ckpt_dir} has no model_config in its client state: it was not written by engine.train")
    model = _model_from_config(client["model_config"])  # meta: the loaded tensors are assigned, no second copy
    model.load_state_dict(state, strict=True, assign=True)
    save_pretrained(model, out_dir, client.get("preprocessing"))
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
