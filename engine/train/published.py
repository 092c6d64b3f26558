"""The published settings as configs: what the BEiT paper and the official repository's commands use, one function
per job. The recipes (recipes/*.py) start from these; `--key=value` overrides go on top.

Sources: the unilm beit README commands and the paper's appendix, summarised with section numbers in
`../shared/reference/beit-official.md`. Where the official runs differ from what runs here, the comment says so.
"""

import torch

from engine.train.settings import (
    DetectionConfig,
    DetectionData,
    DetectionHead,
    FinetuneConfig,
    FinetuneData,
    ModelSettings,
    OptimSettings,
    PretrainConfig,
    PretrainData,
    PretrainModelSettings,
    RunSettings,
    SegmentationConfig,
    SegmentationData,
    SegmentationHead,
)

SIZES = ("base", "large")


def _attention() -> str:
    """The fused Triton attention on a GPU; SDPA where Triton cannot run (a CPU smoke run of a recipe)."""
    return "triton" if torch.cuda.is_available() else "sdpa"


def _check(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")


def pretrain(size: str = "base", dataset: str = "in1k") -> PretrainConfig:
    """Masked image modelling. IN-1k (README command): global batch 2048 (grad_accum follows from it, the per-device
    batch and the ranks), absolute LR 1.5e-3 (not rescaled with the batch), 10 warm-up epochs then cosine to 1e-5,
    800 epochs, AdamW wd 0.05, clip 3.0, drop path 0.1, layer scale 0.1 (Large: 1e-5), 75 of 196 patches masked in
    blocks of >= 16, a shared relative position bias. IN-22k: 10,000 warm-up steps and 150 epochs.
    bf16 on GPUs (`precision=auto`) with ZeRO stage 1: what is replicated in memory for an 86M/304M-parameter ViT is
    the optimizer state (fp32 masters + Adam moments, 12 bytes a parameter), which stage 1 shards at the
    communication cost of plain data parallelism."""
    _check(size)
    if dataset not in ("in1k", "in22k"):
        raise ValueError(f"dataset={dataset!r}: expected in1k or in22k")
    cfg = PretrainConfig(
        model=PretrainModelSettings(model=f"beit_{size}_patch16_224_8k_vocab", input_size=224, drop_path=0.1,
                                    layer_scale_init_value=0.1 if size == "base" else 1e-5,
                                    use_shared_rel_pos_bias=True, attn_impl=_attention(), mlm_loss="auto"),
        data=PretrainData(data_path="", tokenizer="", second_input_size=112, num_mask_patches=75,
                          min_mask_patches=16, imagenet_mean_std=dataset == "in1k"),  # IN-22k: 0.5/0.5
        optim=OptimSettings(lr=1.5e-3, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, clip_grad=3.0),
        run=RunSettings(output_dir=f"runs/pretrain_{size}", epochs=800, batch_size=128, global_batch=2048,
                        precision="auto", zero_stage=1, num_workers=10, save_every=5000, log_every=50),
    )
    if dataset == "in22k":
        cfg.optim.warmup_steps, cfg.run.epochs = 10_000, 150
        cfg.run.output_dir = f"runs/pretrain_in22k_{size}"
    return cfg


# intermediate fine-tuning on ImageNet-22k: (per-device batch, global batch, lr, layer decay, clip)
_IN22K_FINETUNING = {"base": (256, 4096, 3e-3, 0.65, 3.0), "large": (64, 2048, 2e-3, 0.75, 1.0)}


def finetune(size: str = "base", dataset: str = "in1k") -> FinetuneConfig:
    """Image classification from pretrained weights.

    `in1k` (README, pt22k → IN-1k): global batch 1024, absolute LR 4e-3 (Large: 1e-3), layer decay 0.65 (0.75), 100
    epochs (50) with 20 warm-up (5), cosine to 1e-6, drop path 0.1 (0.2), mixup 0.8 / cutmix 1.0, label smoothing
    0.1, wd 0.05, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; bf16 with ZeRO 1 (the official run used
    DeepSpeed fp16 without ZeRO).
    `cifar100` (paper appendix, unverified: batch 512, 150 epochs, 20 warm-up, layer decay 0.65; the LR, 2e-3, is
    ours: the IN-1k 4e-3 scaled linearly to batch 512).
    `in22k` (intermediate fine-tuning, README table): B batch 4096, lr 3e-3, layer decay 0.65, clip 3.0; L batch
    2048, lr 2e-3, layer decay 0.75, clip 1.0; 90 epochs, 5 warm-up, drop path 0.2, no evaluation split
    (`disable_eval_during_finetuning`, the official flag); the rest as `in1k`, which the table leaves unstated."""
    _check(size)
    if dataset not in ("in1k", "cifar100", "in22k"):
        raise ValueError(f"dataset={dataset!r}: expected in1k, cifar100 or in22k")
    large = size == "large"
    cfg = FinetuneConfig(
        model=ModelSettings(model=f"beit_{size}_patch16_224", input_size=224, drop_path=0.2 if large else 0.1,
                            attn_impl=_attention()),
        data=FinetuneData(data_path="", finetune="", mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25,
                          auto_augment="rand-m9-mstd0.5-inc1", imagenet_mean_std=None),  # as the weights were
        optim=OptimSettings(lr=1e-3 if large else 4e-3, min_lr=1e-6, warmup_epochs=5 if large else 20,
                            weight_decay=0.05, clip_grad=0.0, layer_decay=0.75 if large else 0.65),
        run=RunSettings(output_dir=f"runs/finetune_{size}", epochs=50 if large else 100,
                        batch_size=64 if large else 128, global_batch=1024, precision="auto", zero_stage=1,
                        num_workers=10, save_every=2000, log_every=50),
    )
    if dataset == "cifar100":
        cfg.run.global_batch, cfg.run.epochs, cfg.optim.warmup_epochs = 512, 150, 20
        cfg.optim.lr, cfg.optim.layer_decay = 2e-3, 0.65
        cfg.run.output_dir += "_cifar100"
    elif dataset == "in22k":
        batch, global_batch, lr, layer_decay, clip = _IN22K_FINETUNING[size]
        cfg.model.drop_path = 0.2
        cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.clip_grad, cfg.optim.warmup_epochs = lr, layer_decay, clip, 5
        cfg.run.batch_size, cfg.run.global_batch, cfg.run.epochs = batch, global_batch, 90
        cfg.run.output_dir = f"runs/finetune_in22k_{size}"
        cfg.extras.disable_eval_during_finetuning = True
    return cfg


def segment(size: str = "base", start: str = "pretrained") -> SegmentationConfig:
    """ADE20K semantic segmentation, UperNet (the official upernet_beit configs).

    Base: 512 crop, layer scale 0.1, drop path 0.1, AdamW wd 0.05, layer decay 0.65 at lr 7e-4 from pretraining
    (`start="in1k_finetuned"`, from weights fine-tuned on ImageNet-1k: 0.9 at 3e-5), poly schedule (power 1) after
    1500 linear warm-up iterations, 160k iterations of 16 images (2 per GPU on 8 GPUs), evaluation every 16k
    iterations by sliding window (crop 512, stride 341). Large: 640 crop (img_scale 2560×640, stride 426), layer
    scale 1e-6, drop path 0.2, layer decay 0.95 at lr 2e-5, 1500 warm-up steps. The official L-640 config runs
    1 image per GPU with update_interval 2 over schedule_320k with warmup_iters 3000: mmcv counts forward
    iterations, our steps are optimizer updates, so 320k iterations are 160k updates of 16 images and its 3000
    warm-up iterations 1500 updates (evaluation every 32k iterations: 16k updates)."""
    _check(size)
    if start not in ("pretrained", "in1k_finetuned") or (size == "large" and start != "pretrained"):
        raise ValueError(f"start={start!r}: expected pretrained (or in1k_finetuned for base)")
    cfg = SegmentationConfig(
        model=ModelSettings(model="beit_base_patch16_224", input_size=512, drop_path=0.1, layer_scale_init_value=0.1,
                            attn_impl=_attention()),
        data=SegmentationData(num_classes=150, img_scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                              eval_stride=341),
        head=SegmentationHead(decode_channels=None, aux_channels=256, aux_weight=0.4, eval_every=16000),
        optim=OptimSettings(lr=7e-4, min_lr=0.0, warmup_steps=1500, weight_decay=0.05, layer_decay=0.65,
                            lr_schedule="poly", poly_power=1.0, clip_grad=0.0),
        run=RunSettings(output_dir="runs/segment_ade20k_base", steps=160000, batch_size=2, global_batch=16,
                        precision="auto", zero_stage=1, num_workers=4, save_every=4000, log_every=50),
    )
    if start == "in1k_finetuned":
        cfg.optim.lr, cfg.optim.layer_decay = 3e-5, 0.9
        cfg.run.output_dir += "_in1k_finetuned"
    if size == "large":
        cfg.model.model, cfg.model.input_size = "beit_large_patch16_224", 640
        cfg.model.layer_scale_init_value, cfg.model.drop_path = 1e-6, 0.2
        cfg.data.img_scale, cfg.data.eval_stride = (2560, 640), 426
        cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.warmup_steps = 2e-5, 0.95, 1500  # 3000 iterations / 2
        cfg.run.output_dir = "runs/segment_ade20k_large"
    return cfg


def detect(size: str = "base") -> DetectionConfig:
    """COCO object detection and instance segmentation, Mask R-CNN on the BEiT backbone, the ViTDet recipe
    (detectron2 projects/ViTDet, `mask_rcnn_vitdet_{b,l}_100ep.py`): 1024² input with large-scale jitter
    (scale 0.1-2.0), AdamW (wd 0.1) at lr 1e-4 with layer decay 0.7 (B) / 0.8 (L), drop path 0.1 / 0.4, 250 warm-up
    iterations, 184375 iterations of 64 images (100 epochs) with ×0.1 steps at 163889 and 177546, evaluation at the
    end. Li et al. 2021 ("Benchmarking Detection Transfer Learning with Vision Transformers") report 49.8 box AP /
    44.4 mask AP for this detector from BEiT-B. Differences: ViTDet's backbone uses windowed attention with 4 global
    blocks, a simple single-scale pyramid and LayerNorm'd heads; here every block attends globally (with BEiT's
    relative position bias), the pyramid is BEiT's multi-level neck + FPN, and the heads are torchvision's."""
    _check(size)
    cfg = DetectionConfig(
        model=ModelSettings(model="beit_base_patch16_224", input_size=1024, drop_path=0.1, layer_scale_init_value=0.1,
                            attn_impl=_attention()),
        data=DetectionData(scale_range=(0.1, 2.0)),
        head=DetectionHead(fpn_channels=256, eval_every=20000, eval_batch_size=4),
        optim=OptimSettings(lr=1e-4, min_lr=0.0, warmup_steps=250, weight_decay=0.1, layer_decay=0.7,
                            lr_schedule="step", lr_steps=(163889 / 184375, 177546 / 184375), clip_grad=0.0),
        # 64 images per iteration = 8 per GPU on 8 GPUs; elsewhere --global_batch=64 (accumulation) keeps it
        run=RunSettings(output_dir="runs/detect_coco_base", steps=184375, batch_size=8, global_batch=None,
                        precision="auto", zero_stage=1, num_workers=8, save_every=5000, log_every=50),
    )
    if size == "large":
        cfg.model.model, cfg.model.layer_scale_init_value, cfg.model.drop_path = "beit_large_patch16_224", 1e-5, 0.4
        cfg.optim.layer_decay = 0.8
        cfg.run.output_dir = "runs/detect_coco_large"
    return cfg
