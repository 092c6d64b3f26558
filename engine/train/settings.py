"""Dataclass settings shared by the pretraining and fine-tuning recipes.

Every leaf name is unique across sections so that a bare `--lr=1e-3` works as well as `--optim.lr=1e-3`
(see `engine.config.apply_overrides`).
"""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelSettings:
    model: str = "beit_base_patch16_224_8k_vocab"
    input_size: int = 224
    depth: int | None = None  # None: the registered depth; smaller for quick CPU runs
    drop_path: float = 0.1
    layer_scale_init_value: float = 0.1
    use_shared_rel_pos_bias: bool = True
    attn_impl: str = "sdpa"  # "eager" | "sdpa" | "triton"
    mlm_loss: str = "fused"  # pretraining: "fused" (Triton kernel on GPUs) | "reference" (PyTorch)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model before DeepSpeed wraps it


@dataclass
class OptimSettings:
    # The LR is `lr` when set (the paper's absolute value), else blr * global_batch / 256.
    lr: float | None = None
    blr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 10.0
    warmup_steps: int = -1  # > 0 overrides warmup_epochs
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # None: constant weight decay
    clip_grad: float = 3.0  # 0 disables clipping
    layer_decay: float | None = None  # fine-tuning only
    skip_rel_pos_tables_wd: bool = False  # also exempt relative position bias tables from weight decay


@dataclass
class RunSettings:
    output_dir: str = "outputs/run"
    epochs: int = 800
    max_steps: int = -1  # > 0 stops (and saves) after this many optimizer steps; the schedule still spans `epochs`
    batch_size: int = 64  # per device, per micro-step
    grad_accum: int = 1
    global_batch: int | None = None  # when set, grad_accum = global_batch / (batch_size × ranks), which must divide
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 1
    offload: bool = False  # ZeRO CPU offload of the optimizer state (stage >= 1)
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    num_workers: int = 4
    save_every: int = 1000  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    max_bad_steps: int = 20  # stop after this many consecutive non-finite / overflowed steps
    resume: bool = True  # resume from the newest complete checkpoint in output_dir
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class PretrainData:
    data_path: str = ""
    tokenizer: str = ""  # directory of a tokenizer loadable by engine.tokenizer.load_tokenizer
    second_input_size: int = 112
    num_mask_patches: int = 75
    min_mask_patches: int = 16
    max_mask_patches: int | None = None
    min_crop_scale: float = 0.08
    imagenet_mean_std: bool = True
    # A fixed batch of test-split images is scored every `heldout_every` steps next to the position prior (the most
    # common token of each grid position): see engine/train/heldout.py. 0 turns it off; so does a dataset without
    # a test split.
    heldout_images: int = 256
    heldout_every: int = 1000


@dataclass
class PretrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: PretrainData = field(default_factory=PretrainData)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)


@dataclass
class FinetuneData:
    data_path: str = ""
    finetune: str = ""  # pretrained weights for engine.checkpoint.load_checkpoint ("" trains from scratch)
    num_classes: int | None = None  # None: the dataset's number of classes
    eval_batch_size: int | None = None  # None: 1.5 × batch_size, as the official code
    crop_pct: float | None = None  # None: 224/256 below 384 px, 1.0 from 384
    min_crop_scale: float = 0.08
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" disables RandAugment (then colour jitter applies)
    color_jitter: float = 0.4
    reprob: float = 0.25
    mixup: float = 0.8  # mixup alpha (0 disables)
    cutmix: float = 1.0  # cutmix alpha (0 disables)
    smoothing: float = 0.1
    imagenet_mean_std: bool = True


@dataclass
class FinetuneExtras:
    linear_probe: bool = False  # freeze the backbone, train the head (and fc_norm) only
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    eval_every: int = 1  # epochs between evaluations (and best-checkpoint updates)


@dataclass
class FinetuneConfig:
    model: ModelSettings = field(default_factory=lambda: ModelSettings(model="beit_base_patch16_224"))
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(min_lr=1e-6, layer_decay=0.65))
    run: RunSettings = field(default_factory=RunSettings)
    extras: FinetuneExtras = field(default_factory=FinetuneExtras)
