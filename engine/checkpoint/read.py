"""Reading a checkpoint from disk: official `.pth`, Hugging Face (sharded too) and this project's format."""

import argparse
import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    HF_BIN_NAME,
    HF_PREPROCESSOR_NAME,
    INDEX_SUFFIX,
    PREPROCESSING_KEY,
    SUPPORTED_LAYOUTS,
    WEIGHTS_NAME,
    SourceCheckpoint,
    preprocessing_record,
)
from engine.checkpoint.hf import hf_to_official

logger = logging.getLogger(__name__)


def _torch_load(path: Path, trust_pickle: bool) -> object:
    if trust_pickle:
        logger.warning("unpickling %s with weights_only=False: only do this for files you trust", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        # argparse.Namespace is the `args` entry of official training checkpoints; it holds plain values only
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            reason = detail.group(1) if detail else str(error)
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({reason}); {SUPPORTED_LAYOUTS}") from None
        raise ValueError(
            f"{path} contains pickled Python objects (e.g. {refused.group(1)}), which are refused because unpickling "
            "can run arbitrary code. If you trust the file, convert it once: "
            f"`python -m engine.checkpoint convert {path} OUT_DIR "
            "--model NAME --trust-pickle`, or load it in a trusted environment with torch.load(weights_only=False) "
            "and re-save only tensors: torch.save({'model': model_state_dict}, 'clean.pth')."
        ) from None


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint: under "model" or "module" (DeepSpeed), or the object itself."""
    if isinstance(obj, Mapping):
        for key in ("model", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()):
        found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path} holds no state dict of tensors (found {found}); {SUPPORTED_LAYOUTS}")
    return dict(obj)


def _grid_from_config(config: Mapping) -> tuple[int, int] | None:
    """Token grid (h, w) described by an own-format `model` config or an HF `config.json`, if it says."""
    image, patch = config.get("img_size", config.get("image_size")), config.get("patch_size")
    if image is None or patch is None:
        return None
    image = (image, image) if isinstance(image, int) else tuple(image)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return image[0] // patch[0], image[1] // patch[1]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path} as JSON ({error})") from None


def own_model_config(config: dict, path: Path) -> dict:
    if config.get("version") != FORMAT_VERSION or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path} is a '{FORMAT_NAME}' config of unsupported version {config.get('version')!r} "
                         f"(this code reads version {FORMAT_VERSION} with a 'model' dict)")
    return config["model"]


def _locate(path: Path) -> tuple[Path, dict | None]:
    """Weights file and the config.json next to it (None when absent) for a checkpoint file or directory."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; {SUPPORTED_LAYOUTS}")
    directory = path if path.is_dir() else path.parent
    config_path = directory / CONFIG_NAME
    config = read_json(config_path) if config_path.is_file() else None
    if path.is_file():
        return path, config
    for name in (WEIGHTS_NAME, HF_BIN_NAME, WEIGHTS_NAME + INDEX_SUFFIX, HF_BIN_NAME + INDEX_SUFFIX):
        if (path / name).is_file():
            return path / name, config
    raise ValueError(f"directory {path} has neither {WEIGHTS_NAME} nor {HF_BIN_NAME} (nor a sharded "
                     f"{WEIGHTS_NAME + INDEX_SUFFIX}); {SUPPORTED_LAYOUTS}")


def _read_weights(weights: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """One weights file (safetensors, or a torch pickle) → its state dict."""
    if weights.suffix == ".safetensors":
        try:
            return load_file(weights, device="cpu")
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{weights} is not a readable safetensors file ({error}); {SUPPORTED_LAYOUTS}") from None
    return _unwrap_state_dict(_torch_load(weights, trust_pickle), weights)


def _read_shards(index: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's index (`weight_map`: tensor name → shard file) → all its tensors in one dict."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' (tensor name → shard file); {SUPPORTED_LAYOUTS}")
    state = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise FileNotFoundError(f"{index} names the shard {shard}, which is missing from {index.parent}: "
                                    "download every shard of the checkpoint")
        state.update(_read_weights(index.parent / shard, trust_pickle))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{index} lists {len(missing)} tensor(s) that no shard holds (first: {missing[0]})")
    return state


def read_preprocessing(path: str | Path) -> dict | None:
    """The preprocessing saved with a checkpoint: this project's config.json record, or a Hugging Face
    preprocessor_config.json (its mean/std, crop and resampling); None when the checkpoint has neither (an official
    `.pth`)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if (directory / CONFIG_NAME).is_file():
        config = read_json(directory / CONFIG_NAME)
        if config.get("format") == FORMAT_NAME and config.get(PREPROCESSING_KEY):
            return config[PREPROCESSING_KEY]
    hf = directory / HF_PREPROCESSOR_NAME
    if not hf.is_file():
        return None
    processor = read_json(hf)
    crop = (processor.get("crop_size") or {}).get("height") if processor.get("do_center_crop") else None
    size = processor.get("size") or {}
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    filters = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
    return preprocessing_record(processor.get("image_mean", (0.5,) * 3), processor.get("image_std", (0.5,) * 3),
                                crop or side, filters.get(processor.get("resample"), "bicubic"),
                                crop_pct=crop / side if crop and side else 1.0,  # no centre crop: the whole image
                                class_names=None)


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> SourceCheckpoint:
    """Read any supported layout into official-named CPU tensors (no model needed)."""
    weights, config = _locate(Path(path))
    if weights.name.endswith(INDEX_SUFFIX):
        state = _read_shards(weights, trust_pickle)
    else:
        state = _read_weights(weights, trust_pickle)
    if config is not None and config.get("format") == FORMAT_NAME:
        return SourceCheckpoint(state, FORMAT_NAME, _grid_from_config(own_model_config(config, weights)))
    return source_from_state_dict(state, _grid_from_config(config) if config is not None else None)


def source_from_state_dict(state: Mapping[str, torch.Tensor], window: tuple[int, int] | None = None
                           ) -> SourceCheckpoint:
    """Wrap an in-memory official or Hugging Face state dict (detected by its names) for `load_state_dict_into`."""
    state = dict(state)
    notes = []
    if state and all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
        notes.append("module.*: DistributedDataParallel prefix removed")
    if any(key.startswith("beit.") for key in state):
        notes.append("beit.*: Hugging Face names mapped to official names (query/key/value fused into attn.qkv)")
        return SourceCheckpoint(hf_to_official(state), "huggingface", window, notes)
    return SourceCheckpoint(state, "official", window, notes)


