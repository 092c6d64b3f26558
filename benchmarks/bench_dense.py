"""Dense tasks: one training step (forward + backward) of BEiT-B UperNet at 512² and of BEiT-B Mask R-CNN at 1024²,
with the parameters in bf16 as DeepSpeed's bf16 mode casts them (buffers, e.g. BatchNorm statistics, stay fp32) and
bf16 inputs: the precision `--precision=auto` gives the segmentation and detection recipes on a GPU. Time and peak
memory of the step (the optimizer and its fp32 master weights are not included).

    python benchmarks/bench_dense.py   # GPU: the published sizes; CPU: tiny models in fp32 (a check of the path)
Rows go to benchmarks/results/dense.jsonl, or DIR/dense.jsonl with `--out=DIR`; `--shapes=segment_base_512` runs a
subset. A task whose library is missing (detection: torchvision) writes a row with its error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    append_rows,
    environment,
    measure_ms,
    measure_row,
    parse_bench_args,
    peak_memory_mb,
    select_shapes,
    use_interpreter_on_cpu,
)

ON_CPU = use_interpreter_on_cpu()

import torch  # noqa: E402

GPU_SHAPES = [  # name, task, model, input size, batch, overrides
    ("segment_base_512", "segment", "beit_base_patch16_224", 512, 2, {}),
    ("detect_base_1024", "detect", "beit_base_patch16_224", 1024, 2, {}),
]
CPU_SHAPES = [
    ("segment_tiny_cpu", "segment", "beit_mini_patch4_28", 32, 2, {"depth": 2}),
    ("detect_tiny_cpu", "detect", "beit_mini_patch4_28", 64, 2,
     {"depth": 2, "fpn_channels": 32, "proposals_per_image": 100, "rois_per_image": 32}),
]
NUM_CLASSES = {"segment": 150, "detect": 80}  # ADE20K, COCO


def _targets(batch: int, size: int, device: str) -> list[dict]:
    """Three boxes per image with their box-shaped masks and random classes."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        corners = torch.rand(3, 2, generator=generator) * size * 0.6
        sides = torch.rand(3, 2, generator=generator) * size * 0.3 + size * 0.05
        boxes = torch.cat([corners, corners + sides], dim=1)
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist(), strict=True):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(device), "masks": masks.to(device),
                        "labels": torch.randint(1, NUM_CLASSES["detect"] + 1, (3,), generator=generator).to(device)})
    return targets


def call(shape, device: str):
    """One training step of the task's loss module, parameters cast as DeepSpeed's bf16 casts them."""
    _, task, model_name, size, batch, overrides = shape
    attn_impl = "sdpa" if ON_CPU else "triton"
    if task == "segment":
        from engine.segmentation.model import SegmentationLoss, create_segmenter

        model = create_segmenter(model_name, NUM_CLASSES[task], img_size=size, attn_impl=attn_impl, **overrides)
        module = SegmentationLoss(model)
        labels = torch.randint(0, NUM_CLASSES[task], (batch, size, size), device=device)
        inputs = (torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16), labels)
    else:
        from engine.detection.model import DetectionLoss, create_detector

        model = create_detector(model_name, NUM_CLASSES[task], input_size=size, attn_impl=attn_impl, **overrides)
        module = DetectionLoss(model)
        inputs = (torch.rand(batch, 3, size, size, device=device, dtype=torch.bfloat16),
                  _targets(batch, size, device))
    module.to(device).train()
    if device == "cuda":  # a CPU without native bf16 runs it ~35x slower: the CPU rows check the path in fp32
        for parameter in module.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)  # deepspeed/runtime/engine.py: parameters only
    else:
        inputs = tuple(x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)

    def step():
        loss, _ = module(*inputs)
        loss.backward()

    return step, {"task": task, "model": model_name, "input_size": size, "batch": batch, **overrides}


def bench_one(shape, device: str) -> dict:
    step, info = call(shape, device)
    median, p20, p80 = measure_ms(step, device, cpu_repeats=1)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "images_per_s": info["batch"] / median * 1e3,
            "peak_mb": peak_memory_mb(step, device), **info}


def main(argv: list[str] | None = None) -> None:
    args = parse_bench_args(argv, __doc__.splitlines()[0], GPU_SHAPES)
    device = "cpu" if ON_CPU else "cuda"
    env = environment(device)
    for shape in select_shapes(GPU_SHAPES, CPU_SHAPES, ON_CPU, args.shapes):
        base = {"bench": "dense", "shape": shape[0], "provider": "ours", "mode": "fwd+bwd",
                "dtype": "float32" if ON_CPU else "bf16 parameters (DeepSpeed's cast)", **env}
        append_rows("dense", [measure_row(base, lambda: bench_one(shape, device), False)], args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
