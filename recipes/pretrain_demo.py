"""The README's main job: BEiT masked image modelling on the embedded Fashion-MNIST images, on a CPU in minutes,
ending with a linear probe that shows what the pretraining bought.

    python recipes/pretrain_demo.py [--key=value ...]            # --help lists every key
    deepspeed --num_gpus 2 recipes/pretrain_demo.py              # two ranks (gloo + DeepSpeed's CPU accelerator)

Model: beit_mini_patch4_28_256_vocab (width 128, 6 blocks, 4 heads) at 28 px with 4 px patches → a 7×7 grid,
~20 of 49 patches masked (blocks of at least 4). Labels: a small DALL-E-style dVAE on the tokenizer view (the same
crop at 14 px → 7×7 tokens, vocabulary 256). Without `--tokenizer` it is trained first with
recipes/train_tokenizer.py's settings (for `--tokenizer_steps` steps) and cached by its settings and data
(engine/tokenizer/cache.py: `--tokenizer_cache`, default `$BEIT_ENGINE_CACHE/tokenizers` or
`~/.cache/beit-engine/tokenizers`), so every later run with the same inputs reuses it, whatever its `--output_dir`.
Budget: 10 epochs (930 steps). The held-out masked-token loss (logged every 50 steps) falls below the position
prior's after ~250 steps: before that the model has only learned which tokens are common where; the 186 steps of
earlier versions of this demo never got there and made a worse probe than a random init.
LR: the absolute `--lr` (1.5e-3 at global batch 64, 50 warm-up steps; blr is unused when lr is set).
At the end: the linear probe and k-NN of recipes/linear_probe.py, pretrained vs a random init (`--probe=false` skips).
"""

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import config_errors_exit, parse_overrides  # noqa: E402
from engine.probe import ProbeConfig, run_probe, summary_line  # noqa: E402
from engine.tokenizer import read_tokenizer_config  # noqa: E402
from engine.train import validation  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.settings import (  # noqa: E402
    OptimSettings,
    PretrainConfig,
    PretrainData,
    PretrainModelSettings,
    RunSettings,
)


@dataclass
class DemoConfig(PretrainConfig):
    # Steps of the demo tokenizer when it has to be trained (None: recipes/train_tokenizer.py's own setting). Its
    # warmup, temperature-anneal and KL-warmup lengths are scaled by the same factor, keeping the schedule's shape.
    tokenizer_steps: int | None = None
    # Where trained tokenizers are kept, keyed by their settings and data ("" → $BEIT_ENGINE_CACHE/tokenizers or
    # ~/.cache/beit-engine/tokenizers); engine/tokenizer/cache.py.
    tokenizer_cache: str = ""
    # At the end, a linear probe and k-NN of the exported weights next to a random init (recipes/linear_probe.py).
    probe: bool = True

    prepares_tokenizer = True

    def validate(self) -> None:
        super().validate()
        validation.at_least("tokenizer_steps", self.tokenizer_steps, 1, optional=True)
        if not self.data.tokenizer:  # the tokenizer trains first: the data must hold one global batch before that
            validation.check_dataset_size(self.data.data_path, self.run)

    def prepare(self) -> None:
        """Before the run (engine/train/resolve.py): the cached demo tokenizer when none is given, and the tokenizer
        view at the size that tokenizer was trained at."""
        ensure_tokenizer(self)
        self.data.second_input_size = read_tokenizer_config(self.data.tokenizer)["input_size"]


def config() -> DemoConfig:
    return DemoConfig(
        model=PretrainModelSettings(model="beit_mini_patch4_28_256_vocab", input_size=28, drop_path=0.0,
                            layer_scale_init_value=0.1, attn_impl="sdpa",
                            mlm_loss="auto"),
        data=PretrainData(data_path="embedded:fashion_mnist", tokenizer="", second_input_size=14,
                          num_mask_patches=20, min_mask_patches=4, min_crop_scale=0.35, imagenet_mean_std=False,
                          heldout_every=50),
        optim=OptimSettings(lr=1.5e-3, min_lr=1e-5, warmup_steps=50, weight_decay=0.05, clip_grad=3.0),
        run=RunSettings(output_dir="runs/pretrain_demo", epochs=10, batch_size=64, precision="fp32", zero_stage=0,
                        device="auto", num_workers=1, save_every=100, log_every=10),
    )


def ensure_tokenizer(cfg: DemoConfig) -> None:
    """Sets `cfg.data.tokenizer` to the cached demo tokenizer for this data, training it first if the cache has none
    (rank 0; other ranks wait for it), unless --tokenizer was given."""
    if cfg.data.tokenizer:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_tokenizer import config as tokenizer_config

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


def print_summary(summary: dict, probe: dict | None, started: float) -> None:
    first, last, heldout = summary["first"], summary["last"], summary["heldout"]
    print("\n=== BEiT pretraining demo finished in %.0f s ===" % (time.time() - started))
    print(f"masked-token loss went from {first['loss']:.3f} (step {first['step']}) to {last['loss']:.3f} "
          f"(step {last['step']}); mlm_acc {first['mlm_acc']:.3f} → {last['mlm_acc']:.3f}")
    if heldout:
        verdict = "below" if heldout["heldout_loss"] < heldout["prior_loss"] else "NOT below"
        print(f"held-out masked-token loss {heldout['heldout_loss']:.3f} (accuracy {heldout['heldout_acc']:.3f}), "
              f"{verdict} the position prior's {heldout['prior_loss']:.3f} ({heldout['prior_acc']:.3f})")
    if probe:
        print(summary_line(probe))
        print(f"probe:       {probe['output']}")
    print(f"metrics:     {summary['metrics_file']}")
    print(f"curves:      {summary['curves_png']}")
    print(f"checkpoint:  {summary['checkpoint']} (DeepSpeed, resumable)")
    print(f"fp32 weights: {summary['export_dir']} (engine.checkpoint.create_model_from_checkpoint)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    cfg = parse_overrides(config(), sys.argv[1:])
    with config_errors_exit():
        summary = run_pretraining(cfg)
    if summary.get("first"):
        probe = None
        if cfg.probe:
            print("linear probe and k-NN of the exported weights next to a random init (about a minute)")
            probe = run_probe(ProbeConfig(checkpoint=str(summary["export_dir"]), data_path=cfg.data.data_path,
                                          imagenet_mean_std=cfg.data.imagenet_mean_std, device=cfg.run.device,
                                          init_seed=cfg.run.seed))
        print_summary(summary, probe, started)
