"""Writing this project's format, atomically, and converting other formats into it."""

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine.checkpoint.adapt import load_checkpoint, load_state_dict_into
from engine.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    PREPROCESSING_KEY,
    WEIGHTS_NAME,
    LoadReport,
)
from engine.checkpoint.read import own_model_config, read_checkpoint, read_json, source_from_state_dict
from engine.factory import create_model, runnable_config

logger = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _json_config(model: nn.Module, preprocessing: dict | None) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("save_pretrained needs a model built by engine.create_model (it has no `config` dict)")
    record = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": config}
    if preprocessing is not None:
        record[PREPROCESSING_KEY] = preprocessing
    try:
        return json.dumps(record, indent=2)
    except TypeError as error:
        raise ValueError(f"model.config is not JSON-serialisable ({error})") from None


def _replace_directory(staging: Path, target: Path) -> None:
    """Move the finished `staging` dir to `target`; an old `target` is swapped out first and removed afterwards."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory; choose another output path")
    previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(previous, target)
        raise
    shutil.rmtree(previous)


def write_directory(target: str | Path, tensors: dict[str, torch.Tensor], texts: dict[str, str]) -> Path:
    """`target/model.safetensors` from `tensors` and `target/<name>` from each of `texts`, atomically: written into a
    temporary sibling directory, synced, then renamed into place, so a crash or error never leaves a half-written
    checkpoint at `target` (an existing one is replaced only once the new one is complete)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the final checkpoint directory should not be
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        for name, text in texts.items():
            (staging / name).write_text(text)
        for name in (WEIGHTS_NAME, *texts):
            os.chmod(staging / name, 0o644)
            _fsync(staging / name)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_pretrained(model: nn.Module, directory: str | Path, preprocessing: dict | None = None) -> Path:
    """Write `model` as `directory/{model.safetensors, config.json}` (this project's format), atomically
    (`write_directory`); `preprocessing` (`engine.checkpoint.formats.preprocessing_record`) goes into config.json
    with the model."""
    config_text = _json_config(model, preprocessing)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    target = write_directory(directory, tensors, {CONFIG_NAME: config_text})
    logger.info("saved %s (%d tensors) to %s", model.config["name"], len(tensors), target)
    return target


def read_model_config(path: str | Path) -> dict:
    """The `create_model` arguments (`name` included) recorded by `save_pretrained` next to its weights."""
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: only directories written by save_pretrained record their "
                                f"model; for other checkpoints name the model (create_model + load_checkpoint)")
    config = read_json(config_path)
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path} is not a '{FORMAT_NAME}' config; convert the checkpoint first: "
                         "python -m engine.checkpoint convert SRC DST --model NAME")
    return runnable_config(own_model_config(config, config_path))


def create_model_from_checkpoint(path: str | Path, **overrides) -> nn.Module:
    """Build the model described by a `save_pretrained` directory (with `overrides` to `create_model`) and load it:
    an encoder (classifier, pretraining model), a segmenter (engine.segmentation.create_segmenter) or a detector
    (engine.detection.create_detector).

    Saved Triton backends become PyTorch ones where Triton cannot run (`engine.factory.runnable_config`). Without
    overrides the load is strict; with them (e.g. `num_classes=10`) mismatches are dropped and reported.
    """
    config = {**read_model_config(path), **overrides}
    if "pool_scales" in config or "fpn_channels" in config:  # heads no encoder checkpoint has: own weights, strictly
        if "pool_scales" in config:
            from engine.segmentation.model import create_segmenter as create_dense
        else:
            from engine.detection.model import create_detector as create_dense

        model = create_dense(config.pop("name"), **config)
        weights = Path(path) / WEIGHTS_NAME if Path(path).is_dir() else Path(path)
        model.load_state_dict(read_checkpoint(weights).state, strict=not overrides)
        return model
    model = create_model(**config)
    load_checkpoint(model, path, strict=not overrides)
    return model


def export_safetensors(source: Mapping[str, torch.Tensor] | str | Path, out_dir: str | Path, model_config: dict,
                       trust_pickle: bool = False) -> LoadReport:
    """Convert an official state dict / `.pth` path / Hugging Face checkpoint into this project's format.

    Builds `create_model(**model_config)` (`model_config` holds `name` and overrides), loads `source` into it with
    all conversions, and writes `save_pretrained(model, out_dir)`. `trust_pickle` allows full unpickling of a `.pth`
    (only for files you trust). Returns the `LoadReport` (missing keys keep their fresh initialisation).
    """
    if "name" not in model_config:
        raise ValueError(f"model_config needs a 'name' (a registered model), got {sorted(model_config)}")
    if isinstance(source, Mapping):
        checkpoint = source_from_state_dict(source)
    else:
        checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
    model = create_model(**model_config)
    report = load_state_dict_into(model, checkpoint)
    report.log(source if not isinstance(source, Mapping) else "<state dict>")
    save_pretrained(model, out_dir)
    return report


