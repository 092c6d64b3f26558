"""Read BEiT checkpoints into this project's models, and save/convert them to this project's format.

Layouts read by `load_checkpoint` (all end up as official unilm parameter names, which the models use):
  1. official BEiT `.pth` release / training files: the state dict under "model" or "module", or a bare state dict;
  2. Hugging Face hub layout of `microsoft/beit-*`: a directory (or one of its files) with `model.safetensors` or
     `pytorch_model.bin` and `config.json`, or their sharded form (`model.safetensors.index.json` /
     `pytorch_model.bin.index.json` naming the shard of each tensor, as large checkpoints are saved); HF names
     (`beit.encoder.layer.{i}.attention.attention.query` ...) are mapped to official ones (separate
     query/key/value → fused `qkv` + `q_bias` + `v_bias`);
  3. this project's format: a directory with `model.safetensors` and a `config.json` holding
     `{"format": "beit-engine", "version": 1, "model": model.config}` (written by `save_pretrained`).

While loading, the checkpoint is adapted to the model as the official fine-tuning loader does: the shared relative
position bias of a pretraining checkpoint is copied into every block's table, relative position tables and absolute
position embeddings are resized to the model's token grid (`engine.resize`), `relative_position_index` buffers are
dropped, head/norm tensors whose shape does not fit are dropped, and tensors are cast to the model's dtype. Everything
that was converted, dropped, missing or unexpected is returned in a `LoadReport` and logged.

Security: `.pth`/`.bin` files are read with `torch.load(weights_only=True)` only. A file that needs arbitrary
unpickling is refused; `python -m engine.checkpoint convert SRC DST --model NAME --trust-pickle` is the one explicit
opt-in, meant to be run once on a file you trust.

CLI: `python -m engine.checkpoint convert SRC DST --model NAME [--set key=value ...] [--trust-pickle]`.
"""

import argparse
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from engine.factory import create_model, runnable_config
from engine.resize import NUM_CLS_ROWS, resize_abs_pos_embed, resize_rel_pos_bias_table

logger = logging.getLogger(__name__)

FORMAT_NAME = "beit-engine"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_BIN_NAME = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"  # sharded weights: {"weight_map": {tensor name: shard file}}
SUPPORTED_LAYOUTS = (
    "supported layouts: (1) an official BEiT .pth file (state dict under 'model' or 'module', or bare); "
    f"(2) a Hugging Face microsoft/beit-* directory or file ({WEIGHTS_NAME} or {HF_BIN_NAME}, with {CONFIG_NAME}); "
    f"(3) a directory written by engine.checkpoint.save_pretrained ({WEIGHTS_NAME} + {CONFIG_NAME} with "
    f"format '{FORMAT_NAME}')"
)
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
HEAD_LIKE = ("head", "lm_head", "fc_norm", "norm")  # task-specific tensors a shape mismatch may drop

# HF `microsoft/beit-*` names → official names; query/key/value weights are fused separately (_fuse_hf_qkv).
_LAYER = r"^beit\.encoder\.layer\.(\d+)\."
_HF_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"^beit\.embeddings\.cls_token$", "cls_token"),
    (r"^beit\.embeddings\.mask_token$", "mask_token"),
    (r"^beit\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^beit\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^beit\.encoder\.relative_position_bias\.relative_position_bias_table$", SHARED_TABLE),
    (_LAYER + r"attention\.attention\.relative_position_bias\.relative_position_bias_table$",
     r"blocks.\1.attn.relative_position_bias_table"),
    (_LAYER + r"attention\.attention\.query\.bias$", r"blocks.\1.attn.q_bias"),
    (_LAYER + r"attention\.attention\.value\.bias$", r"blocks.\1.attn.v_bias"),
    (_LAYER + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (_LAYER + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_LAYER + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_LAYER + r"intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (_LAYER + r"output\.dense\.", r"blocks.\1.mlp.fc2."),
    (_LAYER + r"lambda_1$", r"blocks.\1.gamma_1"),
    (_LAYER + r"lambda_2$", r"blocks.\1.gamma_2"),
    (r"^beit\.pooler\.layernorm\.", "fc_norm."),  # mean pooling (classification)
    (r"^beit\.layernorm\.", "norm."),  # CLS pooling (classification)
    (r"^layernorm\.", "norm."),  # BeitForMaskedImageModeling's final norm
    (r"^classifier\.", "head."),
    (r"^lm_head\.", "lm_head."),
]]
_QKV_ORDER = ("query", "key", "value")  # the official fused weight stacks q, k, v rows in this order
_HF_QKV = re.compile(_LAYER + r"attention\.attention\.(query|key|value)\.weight$")


@dataclass
class LoadReport:
    """What `load_checkpoint` did. `dropped` and `converted` entries are `"key: reason"` lines."""

    layout: str
    loaded: list[str] = field(default_factory=list)  # model keys filled from the checkpoint
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def log(self, source: str | Path) -> None:
        logger.info("loaded %s checkpoint %s: %d tensors loaded, %d converted, %d dropped, %d missing, %d unexpected",
                    self.layout, source, len(self.loaded), len(self.converted), len(self.dropped), len(self.missing),
                    len(self.unexpected))
        for line in self.converted:
            logger.info("converted %s", line)
        for line in self.dropped:
            logger.warning("dropped %s", line)
        if self.missing:
            logger.warning("missing keys (left as initialised): %s", ", ".join(self.missing))
        if self.unexpected:
            logger.warning("unexpected keys (ignored): %s", ", ".join(self.unexpected))


@dataclass
class SourceCheckpoint:
    """A checkpoint read from disk: official-named tensors, the layout, and the source token grid when known."""

    state: dict[str, torch.Tensor]
    layout: str  # "official", "huggingface" or FORMAT_NAME
    window: tuple[int, int] | None  # (h, w) token grid of the model that wrote it, from its config.json
    notes: list[str] = field(default_factory=list)  # conversions already applied while reading


# ---------------------------------------------------------------------------------------------------------- reading


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path} as JSON ({error})") from None


def _own_model_config(config: dict, path: Path) -> dict:
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
    config = _read_json(config_path) if config_path.is_file() else None
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
    weight_map = _read_json(index).get("weight_map")
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


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> SourceCheckpoint:
    """Read any supported layout into official-named CPU tensors (no model needed)."""
    weights, config = _locate(Path(path))
    if weights.name.endswith(INDEX_SUFFIX):
        state = _read_shards(weights, trust_pickle)
    else:
        state = _read_weights(weights, trust_pickle)
    if config is not None and config.get("format") == FORMAT_NAME:
        return SourceCheckpoint(state, FORMAT_NAME, _grid_from_config(_own_model_config(config, weights)))
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


def _fuse_hf_qkv(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Move HF query/key/value weights `[C, C]` ×3 of each layer into one official `qkv.weight` `[3C, C]`."""
    parts: dict[str, dict[str, str]] = {}
    for key in state:
        match = _HF_QKV.match(key)
        if match:
            parts.setdefault(match.group(1), {})[match.group(2)] = key
    for layer, names in parts.items():
        if set(names) != {"query", "key", "value"}:
            continue  # incomplete: leave the HF names in place so they are reported as unexpected
        out[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([state.pop(names[part]) for part in _QKV_ORDER])


def hf_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face `Beit*` state dict to official unilm names; unknown names are kept as they are."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    _fuse_hf_qkv(state, out)
    for key, value in state.items():
        new_key = next((pattern.sub(replacement, key) for pattern, replacement in _HF_RENAMES if pattern.match(key)),
                       key)
        if new_key in out:  # e.g. both `beit.layernorm` and `layernorm` of an MIM model without mean pooling
            raise ValueError(f"two Hugging Face tensors map to the official name {new_key!r} (the second is {key!r}); "
                             "this BEiT variant has no official counterpart")
        out[new_key] = value
    return out


# ------------------------------------------------------------------------------------------------------- adapting


def _square_side(count: int, what: str) -> int:
    """Side s of a square source grid of `count` cells (the checkpoint alone cannot describe other shapes)."""
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"cannot infer the source token grid of {what} ({count} grid cells is not a square); "
                         "save the source with a config.json (Hugging Face or save_pretrained) that gives its size")
    return side


def _expand_shared_table(state: dict, model_state: Mapping, report: LoadReport) -> None:
    """Official shared → per-layer conversion: add the pretraining model's shared table to every block's table."""
    model_per_layer = [key for key in model_state if key.endswith("attn.relative_position_bias_table")]
    if SHARED_TABLE in model_state:
        if not model_per_layer and any(key.endswith("attn.relative_position_bias_table") for key in state):
            raise ValueError(
                "the checkpoint has per-layer relative position bias tables (a fine-tuned model) but the model has "
                "only one shared table (a pretraining model); per-layer tables cannot be merged into one. Load it "
                "into a classification model (use_rel_pos_bias=True, use_shared_rel_pos_bias=False)")
        return
    if SHARED_TABLE not in state or not model_per_layer:
        return
    shared = state.pop(SHARED_TABLE)
    for key in model_per_layer:
        # summed tables give summed biases (same index), which is what a model with both kinds computes
        state[key] = shared.clone() if key not in state else state[key] + shared
    report.converted.append(f"{SHARED_TABLE}: shared table expanded into every blocks.{{i}}.attn table")


def _resize_positions(state: dict, model: nn.Module, model_state: Mapping, src_window: tuple[int, int] | None,
                      report: LoadReport) -> None:
    """Resize relative position tables and the absolute position embedding to the model's token grid."""
    dst_window = tuple(model.patch_embed.patch_shape)
    # (3, 5) and (5, 3) grids have tables of the same shape, so a known source grid decides, not only shapes
    def needs_resize(key: str) -> bool:
        same_grid = src_window is None or tuple(src_window) == dst_window
        return key in state and key in model_state and (state[key].shape != model_state[key].shape or not same_grid)

    for key, value in list(state.items()):
        if not key.endswith("relative_position_bias_table") or not needs_resize(key):
            continue
        if value.ndim != 2 or value.shape[1] != model_state[key].shape[1]:
            raise ValueError(f"{key}: checkpoint table {tuple(value.shape)} does not fit the model's "
                             f"{tuple(model_state[key].shape)} (different number of heads: a different model size)")
        # a table of a square window (w, w) has (2w - 1)^2 offset rows
        window = src_window or ((_square_side(value.shape[0] - NUM_CLS_ROWS, key) + 1) // 2,) * 2
        state[key] = resize_rel_pos_bias_table(value, window, dst_window)
        report.converted.append(f"{key}: relative position table resized from window {window} to {dst_window}")
    if needs_resize("pos_embed"):
        value = state["pos_embed"]
        grid = src_window or (_square_side(value.shape[1] - 1, "pos_embed"),) * 2
        state["pos_embed"] = resize_abs_pos_embed(value, grid, dst_window)
        report.converted.append(f"pos_embed: resized bicubically from grid {grid} to {dst_window}")


def _drop_mismatched(state: dict, model_state: Mapping, report: LoadReport) -> None:
    """Drop head/norm tensors whose shape does not fit (e.g. another class count); any other mismatch is an error."""
    wrong = []
    for key, value in list(state.items()):
        if key not in model_state or value.shape == model_state[key].shape:
            continue
        if key.split(".")[0] in HEAD_LIKE:
            del state[key]
            report.dropped.append(f"{key}: shape {tuple(value.shape)} != model {tuple(model_state[key].shape)}")
        else:
            wrong.append(f"{key} {tuple(value.shape)} vs model {tuple(model_state[key].shape)}")
    if wrong:
        raise ValueError("checkpoint does not fit the model (a different architecture or size?): " + "; ".join(wrong))


def adapt_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, src_window: tuple[int, int] | None,
                     report: LoadReport) -> dict[str, torch.Tensor]:
    """Official-named checkpoint tensors → tensors `model.load_state_dict` accepts (see the module docstring).

    `src_window` is the source token grid when its config says so; otherwise square grids are inferred from shapes.
    """
    state = dict(state)
    model_state = model.state_dict()
    for key in [key for key in state if key.endswith("relative_position_index")]:
        del state[key]
        report.dropped.append(f"{key}: index buffer, rebuilt by the model")
    _expand_shared_table(state, model_state, report)
    _resize_positions(state, model, model_state, src_window, report)
    _drop_mismatched(state, model_state, report)
    for key, value in state.items():
        target = model_state.get(key)
        if target is not None and value.is_floating_point() and value.dtype != target.dtype:
            state[key] = value.to(target.dtype)
    return state


def load_state_dict_into(model: nn.Module, source: SourceCheckpoint, strict: bool = False) -> LoadReport:
    """Adapt `source` to `model` and load it; with `strict`, missing or unexpected keys raise ValueError."""
    report = LoadReport(source.layout, converted=list(source.notes))
    state = adapt_state_dict(source.state, model, source.window, report)
    result = model.load_state_dict(state, strict=False)
    report.missing, report.unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    report.loaded = sorted(set(state) - set(result.unexpected_keys))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict load failed: missing keys {report.missing}, unexpected keys {report.unexpected}")
    return report


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Load a checkpoint of any supported layout (official .pth, Hugging Face, this project's) into `model`.

    Converts shared → per-layer relative position tables, resizes position tables/embeddings to the model's grid,
    drops `relative_position_index` buffers and head/norm tensors of the wrong shape, casts to the model's dtype.
    Returns (and logs) a `LoadReport`. Raises FileNotFoundError / ValueError naming the problem.
    """
    report = load_state_dict_into(model, read_checkpoint(path), strict=strict)
    report.log(path)
    return report


# -------------------------------------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _json_config(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("save_pretrained needs a model built by engine.create_model (it has no `config` dict)")
    try:
        return json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": config}, indent=2)
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


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` as `directory/{model.safetensors, config.json}` (this project's format), atomically.

    Files are written into a temporary sibling directory, synced, then renamed into place, so a crash or error never
    leaves a half-written checkpoint at `directory` (an existing one is replaced only once the new one is complete).
    """
    target = Path(directory)
    config_text = _json_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the final checkpoint directory should not be
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(config_text)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(staging / name, 0o644)
            _fsync(staging / name)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s (%d tensors) to %s", model.config["name"], len(tensors), target)
    return target


def read_model_config(path: str | Path) -> dict:
    """The `create_model` arguments (`name` included) recorded by `save_pretrained` next to its weights."""
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: only directories written by save_pretrained record their "
                                f"model; for other checkpoints name the model (create_model + load_checkpoint)")
    config = _read_json(config_path)
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path} is not a '{FORMAT_NAME}' config; convert the checkpoint first: "
                         "python -m engine.checkpoint convert SRC DST --model NAME")
    return runnable_config(_own_model_config(config, config_path))


def create_model_from_checkpoint(path: str | Path, **overrides) -> nn.Module:
    """Build the model described by a `save_pretrained` directory (with `overrides` to `create_model`) and load it.

    Saved Triton backends become PyTorch ones where Triton cannot run (`engine.factory.runnable_config`). Without
    overrides the load is strict; with them (e.g. `num_classes=10`) mismatches are dropped and reported.
    """
    model = create_model(**{**read_model_config(path), **overrides})
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


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as attn_impl=eager


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert an official .pth or Hugging Face checkpoint")
    convert.add_argument("src", help="official .pth file, or Hugging Face directory / file")
    convert.add_argument("dst", help="output directory (this project's format)")
    convert.add_argument("--model", required=True, help="registered model name (engine.list_models())")
    convert.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                         metavar="KEY=VALUE", help="create_model override, e.g. --set num_classes=100")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow full unpickling of SRC (runs code from the file: only for files you trust)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = export_safetensors(args.src, args.dst, {"name": args.model, **dict(args.overrides)},
                                    trust_pickle=args.trust_pickle)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {args.dst}: {len(report.converted)} converted, {len(report.dropped)} dropped, "
          f"{len(report.missing)} missing, {len(report.unexpected)} unexpected")


if __name__ == "__main__":
    main()
