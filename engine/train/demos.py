"""The CPU demos' settings (recipes/pretrain_demo.py, finetune_demo.py, train_tokenizer.py and the evidence run,
recipes/fashion_mnist_evidence.py, which starts from them): small models on the embedded Fashion-MNIST images that
train on two cores in minutes.

Pretraining: beit_mini_patch4_28_256_vocab (width 128, 6 blocks, 4 heads) at 28 px with 4 px patches → a 7×7 grid,
~20 of 49 patches masked (blocks of at least 4), labelled by a small DALL-E-style dVAE on the tokenizer view (the
same crop at 14 px → 7×7 tokens, 256 codes: the 2:1 ratio of BEiT's 112 px view for 224 px images). Fine-tuning: the
same encoder with light augmentation for 28 px grey images (horizontal flip only), label smoothing 0.1, layer decay
0.9 (0.75 starves the lightly pretrained lower blocks at this scale).
"""

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.tokenizer.train import TokenizerTrainConfig
from engine.train import validation
from engine.train.settings import (
    FinetuneConfig,
    FinetuneData,
    FinetuneExtras,
    ModelSettings,
    OptimSettings,
    PretrainConfig,
    PretrainData,
    PretrainModelSettings,
    RunSettings,
)


def tokenizer_config() -> TokenizerTrainConfig:
    """The demo dVAE: 14 px → 7×7 tokens, 256 codes, 1000 steps. One thread: these small convolutions gain little
    from a second one, and spin-wait badly on a shared CPU."""
    return TokenizerTrainConfig(data_path="embedded:fashion_mnist", input_size=14, group_count=2, n_hid=32,
                                vocab_size=256, steps=1000, num_threads=1, output_dir="runs/tokenizer_fashion_mnist")


@dataclass
class PretrainDemoConfig(PretrainConfig):
    # Steps of the demo tokenizer when it has to be trained (None: tokenizer_config()'s own setting). Its warmup,
    # temperature-anneal and KL-warmup lengths are scaled by the same factor, keeping the schedule's shape.
    tokenizer_steps: int | None = None
    # Where trained tokenizers are kept, keyed by their settings and data ("" → $BEIT_ENGINE_CACHE/tokenizers or
    # ~/.cache/beit-engine/tokenizers); engine/tokenizer/cache.py.
    tokenizer_cache: str = ""
    # At the end, a linear probe and k-NN of the exported weights next to a random init (recipes/linear_probe.py).
    probe: bool = True

    def validate(self) -> None:
        super().validate()
        validation.at_least("tokenizer_steps", self.tokenizer_steps, 1, optional=True)
        if not self.data.tokenizer:  # the tokenizer trains first: the data must hold one global batch before that
            validation.check_dataset_size(self.data.data_path, self.run)

    def prepare(self) -> None:
        """Before the run (engine/train/resolve.py): the cached demo tokenizer when none is given, and the tokenizer
        view at the size that tokenizer was trained at."""
        from engine.tokenizer import read_tokenizer_config

        ensure_tokenizer(self)
        self.data.second_input_size = read_tokenizer_config(self.data.tokenizer)["input_size"]


def pretrain_config() -> PretrainDemoConfig:
    """10 epochs (930 steps) of 64 images; the absolute LR 1.5e-3 with 50 warm-up steps; held-out check every 50."""
    return PretrainDemoConfig(
        model=PretrainModelSettings(model="beit_mini_patch4_28_256_vocab", input_size=28, drop_path=0.0,
                                    layer_scale_init_value=0.1, attn_impl="sdpa", mlm_loss="auto"),
        data=PretrainData(data_path="embedded:fashion_mnist", tokenizer="", second_input_size=14,
                          num_mask_patches=20, min_mask_patches=4, min_crop_scale=0.35, imagenet_mean_std=False,
                          heldout_every=50),
        optim=OptimSettings(lr=1.5e-3, min_lr=1e-5, warmup_steps=50, weight_decay=0.05, clip_grad=3.0),
        run=RunSettings(output_dir="runs/pretrain_demo", epochs=10, batch_size=64, precision="fp32", zero_stage=0,
                        device="auto", num_workers=1, save_every=100, log_every=10),
    )


def ensure_tokenizer(cfg: PretrainDemoConfig) -> None:
    """Sets `cfg.data.tokenizer` to the cached demo tokenizer for this data, training it first if the cache has none
    (rank 0; other ranks wait for it), unless a tokenizer was given."""
    if cfg.data.tokenizer:
        return
    from engine.tokenizer.cache import cached_tokenizer

    tok_cfg = tokenizer_config()
    tok_cfg.data_path, tok_cfg.seed = cfg.data.data_path, cfg.run.seed
    if cfg.tokenizer_steps is not None:
        factor = cfg.tokenizer_steps / tok_cfg.steps
        for key in ("warmup_steps", "temperature_anneal_steps", "kl_warmup_steps"):
            setattr(tok_cfg, key, max(1, round(getattr(tok_cfg, key) * factor)))
        tok_cfg.steps = cfg.tokenizer_steps
    tokenizer_dir = cached_tokenizer(tok_cfg, cfg.tokenizer_cache or None, int(os.environ.get("RANK", "0")) == 0)
    print(f"tokenizer: {tokenizer_dir} (metrics.json and reconstructions.png next to it)")
    cfg.data.tokenizer = str(tokenizer_dir)


def finetune_config() -> FinetuneConfig:
    """3 epochs per arm from the pretraining demo's export; the absolute LR 1e-3 at batch 64, 0.3 warm-up epochs.
    From scratch on the 6000 images these settings gave 57.3% top-1 after 3 epochs, the earlier lr 2e-3, 0.5
    warm-up epochs and random-resized crops of >= 50% 47.6%."""
    return FinetuneConfig(
        model=ModelSettings(model="beit_mini_patch4_28", input_size=28, drop_path=0.0),
        data=FinetuneData(data_path="embedded:fashion_mnist", finetune="runs/pretrain_demo/pretrained", crop_pct=1.0,
                          min_crop_scale=1.0, auto_augment="", color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0,
                          smoothing=0.1, imagenet_mean_std=False),
        optim=OptimSettings(lr=1e-3, min_lr=1e-6, warmup_epochs=0.3, weight_decay=0.05, clip_grad=3.0,
                            layer_decay=0.9),
        run=RunSettings(output_dir="runs/finetune_demo", epochs=3, batch_size=64, precision="fp32", zero_stage=0,
                        num_workers=1, save_every=0, log_every=10),
        extras=FinetuneExtras(eval_every=1),
    )


@dataclass
class GeneratedSet:
    """The dense demos' generated data (engine/data/demo_segmentation.py, demo_detection.py): photographs with
    Fashion-MNIST garments pasted on them. Each demo sets its own defaults."""

    num_train: int = 2000  # training images of the generated set
    num_val: int = 200  # validation images of the generated set
    garment_scale: tuple[float, float] = (0.75, 1.0)  # garment width as a fraction of the image (uniform in range)
    max_garments: int = 1  # garments per image: 1..max_garments
    grey: bool = True  # grey, darkened photos and white garments (Fashion-MNIST-like); false: tinted on colour


def prepare_generated_set(demo: GeneratedSet, data_path: str, demo_path: str, input_size: int, min_size: int,
                          build, what: str) -> None:
    """Checks the generated set's values, then, when the run reads it (`data_path == demo_path`), builds it once:
    rank 0 calls `build(demo_path, image_size=input_size, **fields)` (a few seconds), other ranks wait for it."""
    validation.at_least("num_train", demo.num_train, 1)
    validation.at_least("num_val", demo.num_val, 1)
    validation.at_least("max_garments", demo.max_garments, 1)
    validation.require(0 < demo.garment_scale[0] <= demo.garment_scale[1] <= 1, "garment_scale",
                       demo.garment_scale, "0 < low <= high <= 1")
    validation.require(input_size >= min_size, "input_size", input_size,
                       f"the demo set needs images of >= {min_size} px")
    if data_path != demo_path:
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"building the {what} (once; a few seconds) ...", flush=True)
        build(demo_path, image_size=input_size, **asdict(demo))
    while not Path(demo_path, ".complete").is_file():  # other ranks: rank 0 is building it
        time.sleep(1)
