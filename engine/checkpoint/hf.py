"""Hugging Face `microsoft/beit-*` parameter names → the official unilm names the models use."""

import re
from collections.abc import Mapping

import torch

from engine.checkpoint.formats import SHARED_TABLE

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


