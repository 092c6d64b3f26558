"""Evaluate a checkpoint, no training: top-1/top-5 of a classifier, mIoU of a segmenter (single-scale, or
multi-scale + flip on request). `recipes/evaluate.py` is its command.

The model comes from the checkpoint: this project's folders describe themselves (a fine-tuned best/ or final/, a
segmenter's); an official `.pth` or a Hugging Face `microsoft/beit-*` folder needs `--model` (its registered name;
the number of classes is read from the head). The inputs are made as the checkpoint records (mean/std, size, crop:
engine.checkpoint.read_preprocessing), else as the official evaluation (0.5/0.5, resize to size / crop_pct with
crop_pct 224/256 below 384 px, bicubic); every field can be overridden. A checkpoint whose class names disagree with
the dataset's is refused (a silently permuted label order would score as chance).
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    checkpoint: str = ""  # a save_pretrained folder (best/, final/, a segmenter's), an official .pth, an HF folder
    data_path: str = ""  # classification: class folders (val/ or test/ split); segmentation: an ADE20K-format folder
    model: str = ""  # registered model name for a checkpoint that does not describe itself (official .pth, HF)
    num_classes: int | None = None  # None: from the checkpoint's head
    input_size: int | None = None  # None: the checkpoint's (preprocessing record, else the model's image size)
    crop_pct: float | None = None  # None: the checkpoint's, else 224/256 below 384 px and 1.0 from 384
    imagenet_mean_std: bool | None = None  # None: the checkpoint's normalisation, else 0.5/0.5
    batch_size: int = 64  # classification images per batch (segmentation evaluates one image at a time)
    num_workers: int = 4  # DataLoader workers
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    precision: str = "fp32"  # fp32 or bf16 (inputs and autocast on a GPU)
    eval_scales: tuple[float, ...] = (1.0,)  # segmentation: multi-scale ratios (0.5,0.75,1,1.25,1.5,1.75; SETR_Resize)
    eval_flip: bool = False  # segmentation: also the flipped image, probabilities averaged
    eval_stride: int | None = None  # segmentation sliding-window stride (None: 2/3 of the crop: 341 at 512)
    img_scale: tuple[int, int] | None = None  # segmentation resize (long, short side); None: (4, 1) × the crop
    max_images: int = 0  # > 0: the first this many evaluation images only (a quick check)
    output: str = "eval.json"  # the results as JSON

    def validate(self) -> None:
        if not self.checkpoint or not Path(self.checkpoint).exists():
            raise ConfigError(f"--checkpoint={self.checkpoint!r}: give an existing checkpoint (a best/ or final/ "
                              "folder, an official .pth with --model, a Hugging Face folder with --model)")
        if not self.data_path:
            raise ConfigError("--data_path is required: the labelled images to evaluate on")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"--precision={self.precision}: expected fp32 or bf16")
        if self.batch_size < 1 or self.num_workers < 0 or self.max_images < 0:
            raise ConfigError("--batch_size must be >= 1, --num_workers and --max_images >= 0")


def _own_format(path: Path) -> bool:
    from engine.checkpoint import CONFIG_NAME, FORMAT_NAME
    from engine.checkpoint.read import read_json

    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    return config.is_file() and read_json(config).get("format") == FORMAT_NAME


def load_model(cfg: EvaluateConfig) -> torch.nn.Module:
    """The checkpoint's model: self-described, or `--model` with the head's class count and the weights' depth."""
    from engine.checkpoint import create_model_from_checkpoint, load_checkpoint, read_checkpoint
    from engine.factory import create_model

    path = Path(cfg.checkpoint)
    if _own_format(path):
        return create_model_from_checkpoint(path.parent if path.is_file() else path)
    if not cfg.model:
        raise ConfigError(f"--checkpoint={path} does not name its model (an official .pth or a Hugging Face "
                          "folder): add --model=NAME, e.g. --model=beit_base_patch16_224")
    try:
        state = read_checkpoint(path).state
        num_classes = cfg.num_classes or (state["head.weight"].shape[0] if "head.weight" in state else None)
        if num_classes is None:
            raise ConfigError(f"--checkpoint={path} has no classification head (head.weight): evaluate a fine-tuned "
                              "checkpoint, not a pretraining one")
        size = {"img_size": cfg.input_size} if cfg.input_size else {}
        blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.")}
        depth = {"depth": max(blocks) + 1} if blocks else {}  # as many blocks as the weights hold
        model = create_model(cfg.model, num_classes=num_classes, **size, **depth)
        load_checkpoint(model, path, strict=True)
    except ValueError as error:
        raise ConfigError(f"--checkpoint={path}: {error}") from None
    return model


def _img_side(model) -> int:
    size = model.config["img_size"]
    return size if isinstance(size, int) else size[0]


def _preprocessing(cfg: EvaluateConfig, model) -> dict:
    """The checkpoint's record with the command line's overrides on top."""
    from engine.checkpoint import preprocessing_record, read_preprocessing
    from engine.data.transforms import default_crop_pct, mean_std

    record = read_preprocessing(cfg.checkpoint) or {}
    side = cfg.input_size or record.get("input_size") or _img_side(model)
    if cfg.imagenet_mean_std is not None or "mean" not in record:
        mean, std = mean_std(bool(cfg.imagenet_mean_std))
    else:
        mean, std = record["mean"], record["std"]
    crop_pct = cfg.crop_pct or record.get("crop_pct") or default_crop_pct(side)
    return preprocessing_record(mean, std, side, record.get("interpolation") or "bicubic", crop_pct,
                                record.get("class_names"))


def _check_classes(checkpoint_names: list[str] | None, dataset_names: list[str], path: str) -> None:
    if checkpoint_names and dataset_names and list(checkpoint_names) != list(dataset_names):
        first = next(i for i, (a, b) in enumerate(zip(checkpoint_names, dataset_names)) if a != b) \
            if len(checkpoint_names) == len(dataset_names) else min(len(checkpoint_names), len(dataset_names))
        raise ConfigError(f"--data_path={path}: its classes differ from the checkpoint's ({len(dataset_names)} vs "
                          f"{len(checkpoint_names)}, first difference at index {first}); evaluate on the data the "
                          "model was trained to label")


def evaluate_classifier(cfg: EvaluateConfig, model, device: torch.device, dtype: torch.dtype) -> dict:
    from engine.data import ClassificationDataset, EvalTransform, build_dataset, build_loader
    from engine.train.finetune import evaluate

    record = _preprocessing(cfg, model)
    try:
        dataset = build_dataset(cfg.data_path, "test")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data_path={cfg.data_path}: {error}") from None
    _check_classes(record["class_names"], list(getattr(dataset, "classes", [])), cfg.data_path)
    transform = EvalTransform(record["input_size"], record["crop_pct"], mean=record["mean"], std=record["std"],
                              interpolation=record["interpolation"])
    if cfg.max_images:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.max_images, len(dataset))))
    loader = build_loader(ClassificationDataset(dataset, transform), cfg.batch_size, num_workers=cfg.num_workers,
                          drop_last=False, shuffle=False)
    scores = evaluate(model, loader, device, dtype)
    return {"task": "classification", "images": len(dataset), "preprocessing": record, **scores}


def evaluate_segmenter(cfg: EvaluateConfig, model, device: torch.device, dtype: torch.dtype) -> dict:
    from engine.data.loader import SegmentationSamples
    from engine.data.segmentation import ADE20KDataset, SegEvalTransform
    from engine.train.resolve import checkpoint_uses_imagenet_mean_std
    from engine.train.segment import score_segmenter

    crop = _img_side(model)
    imagenet = cfg.imagenet_mean_std if cfg.imagenet_mean_std is not None else \
        checkpoint_uses_imagenet_mean_std(cfg.checkpoint)
    transform = SegEvalTransform(cfg.img_scale or (4 * crop, crop), imagenet_mean_std=imagenet,  # (2048, 512) at 512
                                 scales=cfg.eval_scales, crop_size=crop)
    num_classes = model.config["num_classes"]
    try:
        dataset = ADE20KDataset(cfg.data_path, "validation", num_classes=num_classes)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data_path={cfg.data_path}: {error}") from None
    count = min(len(dataset), cfg.max_images) if cfg.max_images else len(dataset)
    loader = torch.utils.data.DataLoader(SegmentationSamples(dataset, transform), batch_size=1,
                                         sampler=list(range(count)), num_workers=cfg.num_workers)
    stride = cfg.eval_stride or (2 * crop) // 3  # the official 341 at 512, 426 at 640
    scores = score_segmenter(model, loader, transform, crop, stride, cfg.eval_flip, num_classes, device, dtype)
    return {"task": "segmentation", "images": count, "scales": list(cfg.eval_scales), "flip": cfg.eval_flip,
            "stride": stride, **scores}


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Loads, evaluates, writes `cfg.output` → the results (with the seconds it took)."""
    from engine.device import resolve_device

    device = torch.device(resolve_device(cfg.device))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    start = time.perf_counter()
    model = load_model(cfg).to(device).eval()
    kind = "segmentation" if "pool_scales" in model.config else "classification"
    if kind == "classification" and "num_classes" not in model.config:
        raise ConfigError(f"--checkpoint={cfg.checkpoint} is a pretraining model (no classifier): fine-tune it "
                          "first, or probe it (recipes/linear_probe.py)")
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        evaluate = evaluate_segmenter if kind == "segmentation" else evaluate_classifier
        result = {"checkpoint": cfg.checkpoint, "data_path": cfg.data_path, **evaluate(cfg, model, device, dtype)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def summary_line(result: dict) -> str:
    if result["task"] == "classification":
        return (f"top-1 {result['acc1']:.3f}%  top-5 {result['acc5']:.3f}%  loss {result['eval_loss']:.4f}  "
                f"({result['images']} images, {result['seconds']} s)")
    how = "single-scale" if result["scales"] == [1.0] and not result["flip"] else \
        f"scales {result['scales']}{' + flip' if result['flip'] else ''}"
    return (f"mIoU {result['mIoU']:.2f}%  mAcc {result['mAcc']:.2f}%  aAcc {result['aAcc']:.2f}%  ({how}, "
            f"{result['images']} images, {result['seconds']} s)")
