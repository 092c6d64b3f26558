"""Model FLOPs per training image and the device peak, for MFU = flops_per_image × img/s ÷ peak.

Counted: matmul FLOPs only (2 per multiply-add) of the forward pass — patch embedding, per block qkv (3·N·D²),
attention scores and weighted sum (2·N²·D), output projection (N·D²), MLP (2·N·D·D_mlp) — plus the LM head on the
masked tokens only (M·D·V), then ×3 for forward + backward (backward = 2× forward). Softmax, norms, the tokenizer and
attention tile padding are not counted. For BEiT-L at 224 px with 75 masked patches this gives 373.1 GFLOP/image
(performance-anchors.md rounds from 61.6 GMAC to 373.4).
"""

import torch

# Dense peak TFLOP/s per (device-name fragment, precision); the first matching fragment wins.
_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),  # SXM; fp32 counts TF32 tensor cores
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
)


def forward_flops_per_image(config: dict, num_masked: float | None = None) -> float:
    """Forward matmul FLOPs of one image for a model built from `config` (`model.config`).

    `num_masked` (MIM only): masked patches per image, which the LM head sees; None for classification (the head
    sees one pooled token).
    """
    img = config["img_size"] if isinstance(config["img_size"], int) else config["img_size"][0]
    patch = config["patch_size"] if isinstance(config["patch_size"], int) else config["patch_size"][0]
    dim, depth = config["embed_dim"], config["depth"]
    hidden = int(dim * config["mlp_ratio"])
    patches = (img // patch) ** 2
    tokens = patches + 1
    flops = 2 * patches * (config["in_chans"] * patch * patch) * dim
    per_block = 2 * tokens * dim * (3 * dim) + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim
    per_block += 2 * 2 * tokens * dim * hidden
    flops += depth * per_block
    if num_masked is not None:
        flops += 2 * num_masked * dim * config["vocab_size"]
    elif "num_classes" in config:
        flops += 2 * dim * config["num_classes"]
    return float(flops)


def train_flops_per_image(config: dict, num_masked: float | None = None) -> float:
    return 3.0 * forward_flops_per_image(config, num_masked)


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of `device` at `precision`; None on CPU or an unknown GPU (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in _PEAK_TFLOPS:
        if fragment in name:
            return peaks[precision] * 1e12
    return None
