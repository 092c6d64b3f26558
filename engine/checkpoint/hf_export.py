"""This project's models → a Hugging Face transformers folder: `config.json` (BeitConfig), `model.safetensors` (the
hub's parameter names, which every transformers version reads) and `preprocessor_config.json` (BeitImageProcessor).

    BeitForMaskedImageModeling   ← a pretraining model (shared relative position bias, mask token, lm_head)
    BeitForImageClassification   ← a fine-tuned classifier (id2label from its class names)

Segmenters are refused (`SEGMENTATION_REFUSAL`): transformers' BeitForSemanticSegmentation has the same neck and
UperNet/FCN heads under the same names, but it cannot tap the encoder's last block, which ours (and the official
configs) always do.

No transformers import: the export only writes files (tests load them with transformers and compare outputs).
"""

import json
import math
import re

import torch

from engine.checkpoint.hf import NAME_PAIRS, name_rule

MIM, CLASSIFICATION, SEGMENTATION = "masked_image_modeling", "classification", "segmentation"
ARCHITECTURES = {MIM: "BeitForMaskedImageModeling", CLASSIFICATION: "BeitForImageClassification"}
HF_CONFIG_NAME = "config.json"
LAYER_NORM_EPS = 1e-6
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL's codes, as image processors store them
SEGMENTATION_REFUSAL = (
    "transformers' BeitForSemanticSegmentation reads hidden_states[i - 1] for each out_index i, and checks i <= depth, "
    "so it can tap block k (0-based) only as i = k + 2 <= depth: never the encoder's last block, which this segmenter "
    "taps (as the official configs do: block 11 of 12). Its neck and heads would load (same names), its features "
    "would not be ours; export the encoder instead (its best/ or final/ loads with engine.checkpoint)")


def model_kind(config: dict) -> str:
    """A model's `config` (model.config, or a segmenter's) → which transformers class it becomes."""
    if "pool_scales" in config:
        return SEGMENTATION
    return MIM if "vocab_size" in config else CLASSIFICATION


def _official_to_hf_rules(kind: str) -> list[tuple[re.Pattern, str]]:
    return [name_rule(official, hf) for hf, official, only in NAME_PAIRS if only in (None, kind)]


def official_to_hf(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Official names → the hub's: fused `qkv` split into query/key/value (the key has no bias), index buffers
    dropped (transformers builds them). A name without a counterpart is an error (it would be lost)."""
    rules = _official_to_hf_rules(kind)
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.weight$", key)
        if qkv:
            prefix = f"beit.encoder.layer.{qkv.group(1)}.attention.attention."
            for part, weight in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{prefix}{part}.weight"] = weight
            continue
        renamed = next((pattern.sub(replacement, key) for pattern, replacement in rules if pattern.match(key)), None)
        if renamed is None:
            raise ValueError(f"{key!r} has no Hugging Face counterpart: this model cannot be exported to transformers")
        out[renamed] = value
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in out.items()}


def _side(value) -> int | list[int]:
    return value if isinstance(value, int) else list(value)


def hf_config(encoder_config: dict, kind: str, class_names: list[str] | None = None) -> dict:
    """BeitConfig's fields for an encoder `config` (model.config) exported as `kind`."""
    c = encoder_config
    config = {
        "model_type": "beit", "architectures": [ARCHITECTURES[kind]],
        "hidden_size": c["embed_dim"], "num_hidden_layers": c["depth"], "num_attention_heads": c["num_heads"],
        "intermediate_size": int(c["embed_dim"] * c["mlp_ratio"]), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": c["init_std"],
        "layer_norm_eps": LAYER_NORM_EPS, "image_size": _side(c["img_size"]), "patch_size": _side(c["patch_size"]),
        "num_channels": c["in_chans"], "use_mask_token": kind == MIM,
        "use_absolute_position_embeddings": c["use_abs_pos_emb"],
        "use_relative_position_bias": c["use_rel_pos_bias"],
        "use_shared_relative_position_bias": c["use_shared_rel_pos_bias"],
        "layer_scale_init_value": c["layer_scale_init_value"] or 0.0, "drop_path_rate": c["drop_path_rate"],
        # mean pooling keeps transformers' encoder-level LayerNorm an Identity (the MIM model has its own)
        "use_mean_pooling": c.get("use_mean_pooling", True),
    }
    if kind == MIM:
        config["vocab_size"] = c["vocab_size"]
    if kind == CLASSIFICATION:
        names = class_names or [f"LABEL_{i}" for i in range(c["num_classes"])]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    return config


def preprocessor_config(preprocessing: dict) -> dict:
    """BeitImageProcessor's fields: resize to input_size / crop_pct, then centre-crop input_size (the official
    evaluation transform for square images; transformers resizes to a square, not the shorter side)."""
    size = preprocessing["input_size"]
    crop_pct = preprocessing.get("crop_pct") or 1.0
    resized = int(math.floor(size / crop_pct))
    return {
        "image_processor_type": "BeitImageProcessor", "do_resize": True,
        "size": {"height": resized, "width": resized}, "resample": RESAMPLE[preprocessing["interpolation"]],
        "do_center_crop": resized != size, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(preprocessing["mean"]), "image_std": list(preprocessing["std"]), "do_reduce_labels": False,
    }


def dump(config: dict) -> str:
    return json.dumps(config, indent=2) + "\n"
