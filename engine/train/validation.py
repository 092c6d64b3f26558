"""Checks of every config value, before any work starts: when a recipe parses its command line, and again when
`train()` is given a config (so a caller from Python gets the same errors). Checks never change the config; what
`auto` stands for is filled in later, once (engine/train/resolve.py).

Each check raises `ConfigError("--key=value: what is allowed")`; `engine.config.parse_overrides` turns it into one
line on stderr and exit status 2. What can be known from the config, the file system and the launcher's variables
(the number of ranks, `engine.train.runtime.detect_launch`) is checked here; that an epoch holds `grad_accum`
micro-batches per rank is checked by the loop once the task's loader exists.
"""

import logging
import os
import time
from pathlib import Path

import torch

from engine.config import ConfigError
from engine.device import resolve_device
from engine.train.reporters import parse_report_to
from engine.train.resolve import cpu_has_native_bf16
from engine.train.runtime import detect_launch

logger = logging.getLogger(__name__)

EMBEDDED_DATASETS = ("embedded:fashion_mnist",)
MISSING_CHECKPOINT = ("checkpoint not found (a folder written by a pretraining run's export, e.g. `python "
                      "recipes/pretrain_demo.py` → runs/pretrain_demo/pretrained, or a weights file); it")


def require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"--{key}={value}: {allowed}")


def at_least(key: str, value, low, optional: bool = False) -> None:
    if optional and value is None:
        return
    require(value is not None and value >= low, key, value, f"must be >= {low}")


def in_unit_interval(key: str, value, closed_low: bool, closed_high: bool, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = (0 <= value if closed_low else 0 < value) and (value <= 1 if closed_high else value < 1)
    low, high = "[" if closed_low else "(", "]" if closed_high else ")"
    require(ok, key, value, f"must be in {low}0, 1{high}")


def existing_path(key: str, value: str, what: str) -> None:
    if value:
        require(Path(value).expanduser().exists(), key, value, f"{what} does not exist")


def data_path(key: str, value: str) -> None:
    """An embedded dataset name, `fashion_mnist_full` or an existing folder."""
    require(bool(value), key, value, "required: an image folder, a directory of IDX files or embedded:fashion_mnist")
    if value.startswith("embedded:"):
        require(value in EMBEDDED_DATASETS, key, value, f"expected one of {', '.join(EMBEDDED_DATASETS)}")
    elif value != "fashion_mnist_full":
        require(Path(value).expanduser().is_dir(), key, value,
                "no such folder (an image folder, a directory of IDX files, embedded:fashion_mnist or "
                "fashion_mnist_full)")


def check_dataset_size(data_path: str, run) -> None:
    """Lists the training split (cheap: no image is decoded) and checks that it holds one global batch."""
    from engine.data.datasets import build_dataset

    world_size = detect_launch(os.environ).world_size
    global_batch = run.global_batch or run.batch_size * run.grad_accum * world_size
    size = len(build_dataset(data_path, "train"))
    require(size >= global_batch, "data_path", data_path,
            f"holds {size} training images, fewer than one global batch of {global_batch}: lower --batch_size")


def _triton_runs_on(device: str) -> bool:
    from beit_kernels._dispatch import triton_runs_on

    return triton_runs_on(torch.device(device))


def _needs_triton(key: str, value: str, device: str, fix: str) -> None:
    require(_triton_runs_on(device), key, value,
            f"runs Triton kernels, which need a CUDA device (this run's device is {device}): use {fix}")


def bf16_slowdown_on_cpu(size: int = 384, repeats: int = 5) -> float:
    """Time of a bf16 matmul over an fp32 one of the same shape on this CPU (median of `repeats`, ~0.2 s)."""
    def median_time(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    return median_time(torch.bfloat16) / median_time(torch.float32)


def check_attention(model, run) -> None:
    """attn_impl='triton' runs Triton kernels: refused where Triton cannot run (a CPU device without
    TRITON_INTERPRET=1)."""
    if model.attn_impl == "triton":
        _needs_triton("attn_impl", model.attn_impl, resolve_device(run.device), "--attn_impl=sdpa")


def check_model(model) -> None:
    from engine.factory import list_models, registered_config

    require(model.model in list_models(), "model", model.model, "not a registered model (engine.list_models())")
    patch = registered_config(model.model)["patch_size"]
    require(model.input_size >= patch and model.input_size % patch == 0, "input_size", model.input_size,
            f"must be a positive multiple of {model.model}'s patch size {patch}")
    at_least("depth", model.depth, 1, optional=True)
    in_unit_interval("drop_path", model.drop_path, closed_low=True, closed_high=False)
    at_least("layer_scale_init_value", model.layer_scale_init_value, 0, optional=True)


def check_optim(optim) -> None:
    require(optim.lr is None or optim.lr > 0, "lr", optim.lr, "must be > 0 (or none: blr × global_batch / 256)")
    require(optim.blr > 0, "blr", optim.blr, "must be > 0")
    at_least("min_lr", optim.min_lr, 0)
    at_least("warmup_epochs", optim.warmup_epochs, 0)
    require(optim.warmup_steps == -1 or optim.warmup_steps >= 0, "warmup_steps", optim.warmup_steps,
            "must be >= 0 (or -1: use warmup_epochs)")
    at_least("weight_decay", optim.weight_decay, 0)
    at_least("weight_decay_end", optim.weight_decay_end, 0, optional=True)
    at_least("clip_grad", optim.clip_grad, 0)
    in_unit_interval("layer_decay", optim.layer_decay, closed_low=False, closed_high=True, optional=True)
    require(optim.poly_power > 0, "poly_power", optim.poly_power, "must be > 0")
    require(all(0 < f < 1 for f in optim.lr_steps) and list(optim.lr_steps) == sorted(optim.lr_steps), "lr_steps",
            optim.lr_steps, "increasing fractions of the schedule in (0, 1)")


def check_run(run) -> None:
    """Ranges, the device/precision/ZeRO combination, and the batch layout against the launcher's world size."""
    for key, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("num_workers", 0), ("save_every", 0),
                     ("keep_checkpoints", 1), ("log_every", 1), ("max_bad_steps", 1), ("dist_timeout_s", 10)):
        at_least(key, getattr(run, key), low)
    require(run.max_steps == -1 or run.max_steps > 0, "max_steps", run.max_steps, "must be > 0 (or -1: no limit)")
    require(run.steps == -1 or run.steps > 0, "steps", run.steps, "must be > 0 (or -1: the schedule spans epochs)")
    parse_report_to(run.report_to)  # names known, libraries installed
    require(run.zero_stage in (0, 1, 2, 3), "zero_stage", run.zero_stage, "expected 0, 1, 2 or 3")
    require(not run.offload or run.zero_stage >= 1, "offload", run.offload, "needs --zero_stage=1, 2 or 3")
    require(bool(run.output_dir) and not Path(run.output_dir).is_file(), "output_dir", run.output_dir,
            "must name a directory (it is created when missing)")
    require(run.device in ("auto", "cpu", "cuda"), "device", run.device, "expected auto, cpu or cuda")
    require(run.device != "cuda" or torch.cuda.is_available(), "device", run.device,
            "no CUDA device is visible; use --device=cpu (or auto)")
    world_size = detect_launch(os.environ).world_size  # srun and mpirun set no WORLD_SIZE before the group forms
    if run.global_batch is not None:
        per_step = run.batch_size * world_size
        require(run.global_batch >= per_step and run.global_batch % per_step == 0, "global_batch", run.global_batch,
                f"must be a multiple of batch_size × ranks = {run.batch_size} × {world_size}")
    on_cpu = resolve_device(run.device) == "cpu"  # the device was checked just above
    require(not (on_cpu and run.precision == "fp16"), "precision", run.precision,
            "fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16): use auto, bf16 or fp32")
    if on_cpu and run.precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("precision=bf16 on a CPU without native bf16: a bf16 matmul measured %.0f× slower than fp32 "
                       "here just now; --precision=auto (or fp32) trains faster", bf16_slowdown_on_cpu())


def check_mlm_loss(model, run) -> None:
    """mlm_loss='fused' runs a Triton kernel: refused where Triton cannot run."""
    if model.mlm_loss == "fused":
        _needs_triton("mlm_loss", model.mlm_loss, resolve_device(run.device), "--mlm_loss=reference (or auto)")


def check_pretrain_data(data, model, tokenizer_required: bool = True) -> None:
    """`tokenizer_required=False`: a config whose `prepare()` finds or trains one (engine/train/demos.py)."""
    from engine.factory import registered_config

    data_path("data_path", data.data_path)
    require(bool(data.tokenizer) or not tokenizer_required, "tokenizer", data.tokenizer,
            "required: a tokenizer directory (engine.tokenizer format: the DALL-E dVAE converted with `python -m "
            "engine.tokenizer.convert`, or one trained by recipes/train_tokenizer.py)")
    if data.tokenizer:
        from engine.tokenizer import read_tokenizer_config

        try:
            read_tokenizer_config(data.tokenizer)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--tokenizer={data.tokenizer}: {err}") from None
    patch = registered_config(model.model)["patch_size"]
    num_patches = (model.input_size // patch) ** 2
    at_least("second_input_size", data.second_input_size, 1)
    require(0 < data.num_mask_patches < num_patches, "num_mask_patches", data.num_mask_patches,
            f"must be in [1, {num_patches - 1}] ({num_patches} patches at input_size={model.input_size})")
    require(1 <= data.min_mask_patches <= data.num_mask_patches, "min_mask_patches", data.min_mask_patches,
            f"must be in [1, num_mask_patches={data.num_mask_patches}]")
    require(data.max_mask_patches is None or data.max_mask_patches >= data.min_mask_patches, "max_mask_patches",
            data.max_mask_patches, f"must be >= min_mask_patches={data.min_mask_patches} (or none)")
    in_unit_interval("min_crop_scale", data.min_crop_scale, closed_low=False, closed_high=True)
    at_least("heldout_images", data.heldout_images, 0)
    at_least("heldout_every", data.heldout_every, 1)
    if data.data_backend == "dali":
        from engine.data.dali import require_dali

        require_dali()


def check_finetune_data(data) -> None:
    from engine.data.randaugment import RandAugmentConfig

    data_path("data_path", data.data_path)
    existing_path("finetune", data.finetune, MISSING_CHECKPOINT)
    at_least("num_classes", data.num_classes, 1, optional=True)
    at_least("eval_batch_size", data.eval_batch_size, 1, optional=True)
    in_unit_interval("crop_pct", data.crop_pct, closed_low=False, closed_high=True, optional=True)
    in_unit_interval("min_crop_scale", data.min_crop_scale, closed_low=False, closed_high=True)
    if data.auto_augment:
        try:
            RandAugmentConfig.parse(data.auto_augment)
        except ValueError as err:
            raise ConfigError(f"--auto_augment={data.auto_augment}: {err}") from None
    for key in ("color_jitter", "mixup", "cutmix"):
        at_least(key, getattr(data, key), 0)
    in_unit_interval("reprob", data.reprob, closed_low=True, closed_high=True)
    in_unit_interval("smoothing", data.smoothing, closed_low=True, closed_high=False)


def check_finetune_extras(extras, run) -> None:
    in_unit_interval("model_ema_decay", extras.model_ema_decay, closed_low=False, closed_high=False)
    require(not (extras.model_ema and run.zero_stage == 3), "model_ema", extras.model_ema,
            "needs --zero_stage=0, 1 or 2 (ZeRO-3 partitions the weights the average is taken of)")
    at_least("eval_every", extras.eval_every, 1)


def check_segmentation(cfg) -> None:
    data, head = cfg.data, cfg.head
    require(bool(data.data_path) and Path(data.data_path).expanduser().is_dir(), "data_path", data.data_path,
            "an ADE20K-format folder (images/training, annotations/training, images/validation, "
            "annotations/validation) is required")
    existing_path("finetune", data.finetune, MISSING_CHECKPOINT)
    require(1 <= data.num_classes <= 255, "num_classes", data.num_classes,
            "must be in [1, 255] (label maps are 8-bit and 255 is the ignore index)")
    require(cfg.run.zero_stage <= 2 or detect_launch(os.environ).world_size == 1, "zero_stage", cfg.run.zero_stage,
            "segmentation on several ranks supports ZeRO 0-2 (its evaluation runs a different number of windows per "
            "rank, which ZeRO-3's per-forward parameter gathers cannot match)")
    require(min(data.img_scale) >= 1, "img_scale", data.img_scale, "two positive sizes (long, short)")
    require(0 < data.ratio_range[0] <= data.ratio_range[1], "ratio_range", data.ratio_range, "0 < low <= high")
    in_unit_interval("cat_max_ratio", data.cat_max_ratio, closed_low=False, closed_high=True)
    require(1 <= data.eval_stride <= cfg.model.input_size, "eval_stride", data.eval_stride,
            f"must be in [1, input_size={cfg.model.input_size}] (windows must overlap or touch)")
    require(len(data.eval_scales) >= 1 and min(data.eval_scales) > 0, "eval_scales", data.eval_scales,
            "one or more positive scales")
    at_least("max_eval_images", data.max_eval_images, 0)
    at_least("decode_channels", head.decode_channels, 1, optional=True)
    at_least("aux_channels", head.aux_channels, 1)
    at_least("aux_weight", head.aux_weight, 0)
    at_least("eval_every", head.eval_every, 1)


def check_detection(cfg) -> None:
    data, head = cfg.data, cfg.head
    require(bool(data.data_path) and Path(data.data_path).expanduser().is_dir(), "data_path", data.data_path,
            "a COCO-format folder (train2017/, val2017/, annotations/instances_{train,val}2017.json) is required")
    existing_path("finetune", data.finetune, MISSING_CHECKPOINT)
    require(cfg.model.input_size % 32 == 0, "input_size", cfg.model.input_size,
            "must be a multiple of 32 (the stride of the pyramid's p5 level)")
    require(cfg.run.zero_stage <= 2, "zero_stage", cfg.run.zero_stage,
            "detection supports ZeRO 0-2 (its pyramid and heads compute in fp32 from views of their parameters taken "
            "before ZeRO-3 would gather them; and ranks evaluate different numbers of batches)")
    require(0 < data.scale_range[0] <= data.scale_range[1], "scale_range", data.scale_range, "0 < low <= high")
    at_least("max_eval_images", data.max_eval_images, 0)
    at_least("fpn_channels", head.fpn_channels, 1)
    at_least("proposals_per_image", head.proposals_per_image, 2)
    at_least("rois_per_image", head.rois_per_image, 1)
    at_least("eval_every", head.eval_every, 1)
    at_least("eval_batch_size", head.eval_batch_size, 1)
