"""Dataclass settings shared by the pretraining and fine-tuning recipes.

Every leaf name is unique across sections so that a bare `--lr=1e-3` works as well as `--optim.lr=1e-3`
(see `engine.config.apply_overrides`). The comment next to each field is its `--help` text (`engine.config.field_docs`);
`validate()` checks every value before any work starts (engine/train/validation.py).
"""

from dataclasses import dataclass, field
from typing import Literal

from engine.train import validation


@dataclass
class ModelSettings:
    model: str = "beit_base_patch16_224"  # a registered name: engine.list_models()
    input_size: int = 224  # image side in pixels; a multiple of the patch size
    depth: int | None = None  # None: the registered depth; smaller for quick CPU runs
    drop_path: float = 0.1  # stochastic depth rate of the last block (grows linearly from 0)
    # LayerScale init (0 disables); None: the registered model's (0.1 up to Base, 1e-5 for Large). Loaded weights
    # replace it: it matters for a model trained from scratch.
    layer_scale_init_value: float | None = None
    attn_impl: Literal["eager", "sdpa", "triton"] = "sdpa"  # attention backend, fixed when the model is built
    grad_checkpointing: bool = False  # recompute each block in the backward pass (less memory, ~30% more compute)
    compile: bool = False  # torch.compile the model before DeepSpeed wraps it

    def create_kwargs(self) -> dict:
        """The `engine.create_model` overrides these settings give (the registered values where a setting is
        None)."""
        kwargs = dict(img_size=self.input_size, drop_path_rate=self.drop_path, attn_impl=self.attn_impl,
                      grad_checkpointing=self.grad_checkpointing, depth=self.depth,
                      layer_scale_init_value=self.layer_scale_init_value)
        return {key: value for key, value in kwargs.items() if value is not None}


@dataclass
class PretrainModelSettings(ModelSettings):
    model: str = "beit_base_patch16_224_8k_vocab"  # a registered name: engine.list_models()
    use_shared_rel_pos_bias: bool = True  # one relative position bias table for all blocks (as the paper)
    # the masked-token loss: the fused Triton kernel (GPUs), the PyTorch reference, or auto (fused on CUDA devices)
    mlm_loss: Literal["auto", "fused", "reference"] = "auto"

    def create_kwargs(self) -> dict:
        return dict(super().create_kwargs(), use_shared_rel_pos_bias=self.use_shared_rel_pos_bias,
                    mlm_loss=self.mlm_loss)


@dataclass
class OptimSettings:
    # The LR is `lr` when set (the paper's absolute value), else blr * global_batch / 256.
    lr: float | None = None
    blr: float = 1.5e-3  # base LR per 256 images, used when lr is none
    min_lr: float = 1e-5  # end of the cosine schedule
    warmup_epochs: float = 10.0  # linear LR warm-up, in epochs
    warmup_steps: int = -1  # >= 0 overrides warmup_epochs (0: no warm-up); -1: use warmup_epochs
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, tokens, position tables)
    weight_decay_end: float | None = None  # None: constant weight decay; else cosine from weight_decay to this
    clip_grad: float = 3.0  # global gradient-norm clip; 0 disables clipping
    layer_decay: float | None = None  # fine-tuning only: LR × layer_decay^(depth - layer) per block
    # after the warm-up: cosine to min_lr, mmseg's poly, or steps (×0.1 at each of lr_steps, detectron2's)
    lr_schedule: Literal["cosine", "poly", "step"] = "cosine"
    poly_power: float = 1.0  # exponent of the poly schedule
    lr_steps: tuple[float, ...] = (0.889, 0.963)  # step schedule: fractions of the schedule where the LR drops ×0.1
    skip_rel_pos_tables_wd: bool = False  # also exempt relative position bias tables from weight decay


@dataclass
class RunSettings:
    output_dir: str = "outputs/run"  # checkpoints, metrics.jsonl, curves.png, exported weights
    epochs: int = 800  # length of the LR schedule
    steps: int = -1  # > 0: the schedule spans this many optimizer steps instead of `epochs` (iteration-based recipes)
    max_steps: int = -1  # > 0 stops (and saves) after this many optimizer steps; the schedule still spans `epochs`
    batch_size: int = 64  # per device, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    global_batch: int | None = None  # when set, grad_accum = global_batch / (batch_size × ranks), which must divide
    seed: int = 0  # seeds data order, augmentation, masking and init (a rerun repeats the run exactly)
    # auto: bf16 on GPUs that run it (fp16 on older ones) and on CPUs with native bf16, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 (1 shards the optimizer state)
    offload: bool = False  # ZeRO CPU offload of the optimizer state (stage >= 1)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda when a GPU is visible, else cpu
    num_workers: int = 4  # DataLoader worker processes per rank (0: load in the main process)
    save_every: int = 1000  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir
    log_every: int = 10  # optimizer steps between metric rows
    max_bad_steps: int = 20  # stop after this many consecutive non-finite / overflowed steps
    resume: bool = True  # resume from the newest complete checkpoint in output_dir
    # a rank that makes no progress for this long (a dead or hung peer) ends its process, naming the step and the
    # silent ranks, so the whole job ends (engine/train/watchdog.py); collectives time out 60 s later
    dist_timeout_s: int = 600
    progress: bool = True  # tqdm bar on rank 0
    # besides metrics.jsonl: comma-separated tensorboard, wandb, csv, or none (engine/train/reporters.py)
    report_to: str = "none"


@dataclass
class PretrainData:
    data_path: str = ""  # image folder (flat or class subfolders), IDX directory, embedded:fashion_mnist
    tokenizer: str = ""  # directory of a tokenizer loadable by engine.tokenizer.load_tokenizer
    second_input_size: int = 112  # tokenizer input side (the dVAE sees half the model's resolution)
    num_mask_patches: int = 75  # masked patches per image (75 of 196 = 40% at 224 px)
    min_mask_patches: int = 16  # smallest masking block, in patches
    max_mask_patches: int | None = None  # largest masking block (None: num_mask_patches)
    min_crop_scale: float = 0.08  # random-resized-crop area range [min_crop_scale, 1]
    imagenet_mean_std: bool = True  # normalise with ImageNet mean/std (else 0.5/0.5)
    # who decodes and resamples: DataLoader workers with PIL/torch ("pil"), or NVIDIA DALI on the GPU ("dali",
    # optional install; engine/data/dali.py)
    data_backend: Literal["pil", "dali"] = "pil"
    # A fixed batch of test-split images is scored every `heldout_every` steps next to the position prior (the most
    # common token of each grid position): see engine/train/heldout.py. 0 turns it off; so does a dataset without
    # a test split.
    heldout_images: int = 256
    heldout_every: int = 1000  # optimizer steps between held-out checks


@dataclass
class PretrainConfig:
    model: PretrainModelSettings = field(default_factory=PretrainModelSettings)
    data: PretrainData = field(default_factory=PretrainData)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def validate(self) -> None:
        validation.check_model(self.model)
        # a config with a prepare() step (the demo's) finds or trains its tokenizer when none is given
        validation.check_pretrain_data(self.data, self.model, tokenizer_required=not hasattr(self, "prepare"))
        validation.check_mlm_loss(self.model, self.run)
        validation.check_optim(self.optim)
        validation.require(self.optim.layer_decay is None, "layer_decay", self.optim.layer_decay,
                           "fine-tuning and segmentation only (pretraining trains every layer at one LR)")
        validation.check_run(self.run)
        validation.check_attention(self.model, self.run)


@dataclass
class FinetuneData:
    data_path: str = ""  # labelled data: class subfolders (train/ and val/ or test/), IDX directory, embedded:...
    finetune: str = ""  # pretrained weights for engine.checkpoint.load_checkpoint ("" trains from scratch)
    num_classes: int | None = None  # None: the dataset's number of classes
    eval_batch_size: int | None = None  # None: 1.5 × batch_size, as the official code
    crop_pct: float | None = None  # None: 224/256 below 384 px, 1.0 from 384
    min_crop_scale: float = 0.08  # random-resized-crop area range [min_crop_scale, 1]
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" disables RandAugment (then colour jitter applies)
    color_jitter: float = 0.4  # brightness/contrast/saturation jitter when RandAugment is off
    reprob: float = 0.25  # random-erasing probability
    mixup: float = 0.8  # mixup alpha (0 disables)
    cutmix: float = 1.0  # cutmix alpha (0 disables)
    smoothing: float = 0.1  # label smoothing
    # normalise with ImageNet mean/std (true) or 0.5/0.5 (false); None: as the --finetune checkpoint records it
    # (its preprocessing), else 0.5/0.5 (the official fine-tuning default, the pt22k weights' normalisation)
    imagenet_mean_std: bool | None = None


@dataclass
class FinetuneExtras:
    linear_probe: bool = False  # freeze the backbone, train the head (and fc_norm) only
    model_ema: bool = False  # keep an exponential moving average of the weights and evaluate it too
    model_ema_decay: float = 0.9999  # EMA decay per optimizer step
    eval_every: int = 1  # epochs between evaluations (and best-checkpoint updates)
    # no evaluation split, no evaluation, no best/ (the official flag; ImageNet-22k intermediate fine-tuning)
    disable_eval_during_finetuning: bool = False


@dataclass
class FinetuneConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(min_lr=1e-6, layer_decay=0.65))
    run: RunSettings = field(default_factory=RunSettings)
    extras: FinetuneExtras = field(default_factory=FinetuneExtras)

    def validate(self) -> None:
        validation.check_model(self.model)
        validation.check_finetune_data(self.data)
        validation.check_finetune_extras(self.extras, self.run)
        validation.check_optim(self.optim)
        validation.check_run(self.run)
        validation.check_attention(self.model, self.run)


@dataclass
class SegmentationData:
    data_path: str = ""  # an ADE20K-format folder: images/{training,validation}/*.jpg + annotations/.../*.png
    finetune: str = ""  # pretrained encoder weights for engine.checkpoint.load_checkpoint ("" trains from scratch)
    num_classes: int = 150  # classes after label 0 → ignore and the shift by one (ADE20K: 150)
    img_scale: tuple[int, int] = (2048, 512)  # resize target (long, short side) before the random ratio and the crop
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random rescale of img_scale in training
    cat_max_ratio: float = 0.75  # re-draw a crop (up to 10 times) where one class covers more of its labelled pixels
    eval_stride: int = 341  # sliding-window stride at evaluation (341 for 512 crops, 426 for 640)
    # multi-scale evaluation ratios (official: 0.5,0.75,1.0,1.25,1.5,1.75): each resizes the original image to the
    # short side max(crop, int(min(img_scale) · ratio)), as BEiT's SETR_Resize
    eval_scales: tuple[float, ...] = (1.0,)
    eval_flip: bool = False  # also evaluate the horizontally flipped image (averaged probabilities)
    max_eval_images: int = 0  # > 0: evaluate on the first this many validation images only (quick runs)
    # normalise with ImageNet mean/std (true) or 0.5/0.5 (false); None: as the --finetune checkpoint records it,
    # else 0.5/0.5 (what the released ADE20K weights take: the image processor published with them)
    imagenet_mean_std: bool | None = None


@dataclass
class SegmentationHead:
    decode_channels: int | None = None  # UPerHead width (None: the encoder width, as the official configs)
    aux_channels: int = 256  # auxiliary FCN head width (on the stride-16 level)
    aux_weight: float = 0.4  # auxiliary loss weight (0 drops the auxiliary head)
    eval_every: int = 16000  # optimizer steps between evaluations (and best-checkpoint updates); also at the end
    # the pixel loss's mean: over all pixels, ignored ones included ("all", mmseg 0.x, so the official runs), or over
    # the labelled pixels only ("valid")
    loss_average: Literal["all", "valid"] = "all"


@dataclass
class SegmentationConfig:
    model: ModelSettings = field(default_factory=lambda: ModelSettings(
        model="beit_base_patch16_224", input_size=512, layer_scale_init_value=0.1))
    data: SegmentationData = field(default_factory=SegmentationData)
    head: SegmentationHead = field(default_factory=SegmentationHead)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(
        lr=7e-4, min_lr=0.0, warmup_steps=1500, weight_decay=0.05, layer_decay=0.65, lr_schedule="poly",
        clip_grad=0.0))
    run: RunSettings = field(default_factory=lambda: RunSettings(steps=160000, batch_size=16, save_every=4000))

    def validate(self) -> None:
        validation.check_model(self.model)
        validation.check_segmentation(self)
        validation.check_optim(self.optim)
        validation.check_run(self.run)
        validation.check_attention(self.model, self.run)


@dataclass
class DetectionData:
    data_path: str = ""  # a COCO-format folder: train2017/, val2017/, annotations/instances_{train,val}2017.json
    finetune: str = ""  # pretrained encoder weights for engine.checkpoint.load_checkpoint ("" trains from scratch)
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter: the image fits input_size × U(low, high)
    max_eval_images: int = 0  # > 0: evaluate on the first this many validation images only (quick runs)
    # normalise with ImageNet mean/std (true) or 0.5/0.5 (false); None: as the --finetune checkpoint records it,
    # else 0.5/0.5
    imagenet_mean_std: bool | None = None


@dataclass
class DetectionHead:
    fpn_channels: int = 256  # width of the feature pyramid and of torchvision's box and mask heads
    proposals_per_image: int = 2000  # RPN proposals kept per image in training (half at evaluation)
    rois_per_image: int = 512  # proposals sampled per image for the box head's loss
    eval_every: int = 20000  # optimizer steps between COCO evaluations (and best-checkpoint updates); also at the end
    eval_batch_size: int = 4  # images per evaluation batch (per rank)


@dataclass
class DetectionConfig:
    model: ModelSettings = field(default_factory=lambda: ModelSettings(
        model="beit_base_patch16_224", input_size=1024, layer_scale_init_value=0.1))
    data: DetectionData = field(default_factory=DetectionData)
    head: DetectionHead = field(default_factory=DetectionHead)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(
        lr=1e-4, min_lr=0.0, warmup_steps=250, weight_decay=0.1, layer_decay=0.7, lr_schedule="step",
        clip_grad=0.0))
    run: RunSettings = field(default_factory=lambda: RunSettings(steps=184375, batch_size=2, save_every=5000))

    def validate(self) -> None:
        validation.check_model(self.model)
        validation.check_detection(self)
        validation.check_optim(self.optim)
        validation.check_run(self.run)
        validation.check_attention(self.model, self.run)
