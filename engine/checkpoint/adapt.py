"""Adapting a read checkpoint to a model (as the official fine-tuning loader does) and loading it."""

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from engine.checkpoint.formats import HEAD_LIKE, SHARED_TABLE, LoadReport, SourceCheckpoint
from engine.checkpoint.read import read_checkpoint
from engine.resize import NUM_CLS_ROWS, resize_abs_pos_embed, resize_rel_pos_bias_table


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


