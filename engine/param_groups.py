"""Parameter groups of a BEiT model for AdamW: no weight decay on 1-D parameters, norms, the cls token and the
position embedding; layer-wise LR decay. The model side (engine/segmentation) and the trainer (engine/train) share
these rules.

Layer ids follow unilm `optim_factory.get_num_layer_for_vit`: cls_token/mask_token/pos_embed/patch_embed → 0,
`blocks.b` → b + 1, everything else (head, final norms, the shared `rel_pos_bias`) → L + 1. The LR scale of layer
`i` is `layer_decay ** (L + 1 - i)`.
"""

from collections.abc import Callable

import torch

from engine.sharded import full_shape

_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Official BEiT layer id of parameter `name` in a ViT with `num_layers` blocks (0 … num_layers + 1)."""
    if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_scales(layer_decay: float, num_layers: int) -> list[float]:
    """`[num_layers + 2]` LR multipliers, `layer_decay ** (L + 1 - i)`."""
    return [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def is_no_decay(name: str, param: torch.Tensor, skip_rel_pos_tables: bool = False) -> bool:
    """Biases and other 1-D params (norms, layer-scale gammas), cls/mask token, pos embed; optionally rel-pos tables."""
    if len(full_shape(param)) <= 1 or name.endswith(".bias") or name.split(".")[-1] in _NO_DECAY_NAMES:
        return True
    return skip_rel_pos_tables and "relative_position_bias_table" in name


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    skip_rel_pos_tables: bool = False,
    layer_id: Callable[[str, int], int] = layer_id_for_vit,
) -> list[dict]:
    """AdamW groups named `layer_{id}_{decay|no_decay}`, each with `weight_decay`, `lr_scale` and `param_names`.

    `layer_decay=None` (pretraining) puts every parameter at `lr_scale` 1. Frozen parameters are left out.
    `layer_id(name, num_layers)` places a parameter (the ViT rule by default; dense models pass their own).
    """
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers (the number of transformer blocks)")
    scales = layer_scales(layer_decay, num_layers) if layer_decay is not None else None
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = is_no_decay(name, param, skip_rel_pos_tables)
        layer = layer_id(name, num_layers) if scales is not None else 0
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scales[layer] if scales is not None else 1.0,
                "params": [],
                "param_names": [],
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())
