"""Hugging Face `microsoft/beit-*` parameter names → the official unilm names the models use."""

import re
from collections.abc import Mapping

import torch

from engine.checkpoint.formats import SHARED_TABLE

_LAYER = "beit.encoder.layer.{i}."
# (Hugging Face name, official name, the kind of model it belongs to when one official name has two HF names):
# "{i}" is a block index; a name ending in "." is a prefix (weight and bias follow). Read both ways: HF → official
# when loading, official → HF when exporting (engine/checkpoint/hf_export.py).
NAME_PAIRS = [
    ("beit.embeddings.cls_token", "cls_token", None),
    ("beit.embeddings.mask_token", "mask_token", None),
    ("beit.embeddings.patch_embeddings.projection.", "patch_embed.proj.", None),
    ("beit.embeddings.position_embeddings", "pos_embed", None),
    ("beit.encoder.relative_position_bias.relative_position_bias_table", SHARED_TABLE, None),
    (_LAYER + "attention.attention.relative_position_bias.relative_position_bias_table",
     "blocks.{i}.attn.relative_position_bias_table", None),
    (_LAYER + "attention.attention.query.bias", "blocks.{i}.attn.q_bias", None),
    (_LAYER + "attention.attention.value.bias", "blocks.{i}.attn.v_bias", None),
    (_LAYER + "attention.output.dense.", "blocks.{i}.attn.proj.", None),
    (_LAYER + "layernorm_before.", "blocks.{i}.norm1.", None),
    (_LAYER + "layernorm_after.", "blocks.{i}.norm2.", None),
    (_LAYER + "intermediate.dense.", "blocks.{i}.mlp.fc1.", None),
    (_LAYER + "output.dense.", "blocks.{i}.mlp.fc2.", None),
    (_LAYER + "lambda_1", "blocks.{i}.gamma_1", None),
    (_LAYER + "lambda_2", "blocks.{i}.gamma_2", None),
    ("beit.pooler.layernorm.", "fc_norm.", None),  # mean pooling (classification)
    ("beit.layernorm.", "norm.", "classification"),  # CLS pooling (classification)
    ("layernorm.", "norm.", "masked_image_modeling"),  # BeitForMaskedImageModeling's final norm
    ("classifier.", "head.", None),
    ("lm_head.", "lm_head.", None),
]


def name_rule(source: str, target: str) -> tuple[re.Pattern, str]:
    """A template pair → (pattern matching `source` names, replacement giving `target`'s)."""
    pattern = "^" + re.escape(source).replace(r"\{i\}", r"(\d+)") + ("" if source.endswith(".") else "$")
    return re.compile(pattern), target.replace("{i}", r"\1")


_HF_RENAMES = [name_rule(hf, official) for hf, official, _ in NAME_PAIRS]
_QKV_ORDER = ("query", "key", "value")  # the official fused weight stacks q, k, v rows in this order
_HF_QKV = re.compile(r"^beit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight$")




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


