"""Model registry: `create_model(name, **overrides)` builds a registered BEiT with the official argument names.

`*_8k_vocab` names are pretraining (masked image modelling) models with a shared relative position bias; the others
are classification models with per-layer tables and mean pooling, as in the official fine-tuning code.
"""

import difflib
import logging

import torch.nn as nn

from engine.model import BeitEncoder, BeitForImageClassification, BeitForMaskedImageModeling

logger = logging.getLogger(__name__)

# name: (dim, depth, heads, layer scale) as in the official README (layer scale 0.1 up to Base, 1e-5 for Large)
_SIZES = {
    "tiny": (192, 12, 3, 0.1),
    "small": (384, 12, 6, 0.1),
    "base": (768, 12, 12, 0.1),
    "large": (1024, 24, 16, 1e-5),
    "huge": (1280, 32, 16, 1e-5),  # ViT-H's width and depth at patch 16 (no published BEiT-H): for scaling runs
}
_COMMON = dict(in_chans=3, mlp_ratio=4.0, drop_path_rate=0.0, use_abs_pos_emb=False, attn_impl="sdpa",
               init_std=0.02, grad_checkpointing=False)
_MIM = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, vocab_size=8192, mlm_loss="reference",
            max_masked_per_image=None)
_CLASSIFIER = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, num_classes=1000, use_mean_pooling=True)


def _arch(size: str, img_size: int, patch_size: int) -> dict:
    embed_dim, depth, num_heads, layer_scale = _SIZES[size]
    return dict(_COMMON, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, layer_scale_init_value=layer_scale)


def _registry() -> dict[str, tuple[type[BeitEncoder], dict]]:
    models = {}
    for size in _SIZES:
        models[f"beit_{size}_patch16_224_8k_vocab"] = (BeitForMaskedImageModeling, dict(_arch(size, 224, 16), **_MIM))
        models[f"beit_{size}_patch16_224"] = (BeitForImageClassification, dict(_arch(size, 224, 16), **_CLASSIFIER))
    for size, img_size in (("base", 384), ("large", 384), ("large", 512)):
        models[f"beit_{size}_patch16_{img_size}"] = (BeitForImageClassification,
                                                     dict(_arch(size, img_size, 16), **_CLASSIFIER))
    # small-image variants that train on a CPU in seconds (CIFAR-sized inputs, 8x8 token grid)
    models["beit_tiny_patch4_32_8k_vocab"] = (BeitForMaskedImageModeling, dict(_arch("tiny", 32, 4), **_MIM))
    models["beit_tiny_patch4_32"] = (BeitForImageClassification, dict(_arch("tiny", 32, 4), **_CLASSIFIER))
    # the CPU demos' model: 28 px Fashion-MNIST, 7x7 token grid, 6 blocks of width 128 (narrower than tiny, so a
    # 2-core CPU runs more steps in the same time), 256 visual tokens as the demo tokenizer
    mini = dict(_COMMON, img_size=28, patch_size=4, embed_dim=128, depth=6, num_heads=4, layer_scale_init_value=0.1)
    models["beit_mini_patch4_28_256_vocab"] = (BeitForMaskedImageModeling, dict(mini, **{**_MIM, "vocab_size": 256}))
    models["beit_mini_patch4_28"] = (BeitForImageClassification, dict(mini, **_CLASSIFIER))
    return models


_MODELS = _registry()


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def registered_config(name: str) -> dict:
    """The architecture arguments `name` is built with (before overrides), e.g. `["patch_size"]`."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}{_did_you_mean(str(name), list_models())}")
    return dict(_MODELS[name][1])


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# Run-time choices, not architecture. A saved config keeps them, but where the Triton kernels cannot run the PyTorch
# ones replace them when a model is rebuilt from it (logged), so a checkpoint trained with the kernels loads, exports
# and probes on any machine with identical weights.
PYTORCH_BACKENDS = {"attn_impl": ("triton", "sdpa"), "mlm_loss": ("fused", "reference")}


def runnable_config(config: dict) -> dict:
    """A saved model config with its Triton backends swapped for PyTorch ones where Triton cannot run here."""
    from beit_kernels._dispatch import triton_available

    if triton_available():
        return dict(config)
    config = dict(config)
    for key, (triton_choice, pytorch_choice) in PYTORCH_BACKENDS.items():
        if config.get(key) == triton_choice:
            logger.info("%s=%s saved with the model cannot run here (no CUDA GPU): rebuilt with %s=%s (same weights)",
                        key, triton_choice, key, pytorch_choice)
            config[key] = pytorch_choice
    return config


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered BEiT. Overrides use the official argument names (e.g. `img_size=384`,
    `drop_path_rate=0.1`, `num_classes=100`, `attn_impl="triton"`); `name` must be registered, so
    `create_model(**model.config)` rebuilds a model with the same architecture."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}{_did_you_mean(str(name), list_models())}; "
                         f"registered models: {', '.join(list_models())}")
    model_cls, defaults = _MODELS[name]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        hints = "".join(_did_you_mean(key, sorted(defaults)) for key in unknown)
        raise ValueError(f"unknown argument(s) {unknown} for {name!r}{hints}; valid: {', '.join(sorted(defaults))}")
    return model_cls(name=name, **{**defaults, **overrides})
