"""The README's main job: BEiT masked image modelling on the embedded Fashion-MNIST images, on a CPU in minutes,
ending with a linear probe that shows what the pretraining bought.

    python recipes/pretrain_demo.py [--key=value ...]            # --help lists every key
    deepspeed --num_gpus 2 recipes/pretrain_demo.py              # two ranks (gloo + DeepSpeed's CPU accelerator)

Model: beit_mini_patch4_28_256_vocab (width 128, 6 blocks, 4 heads) at 28 px with 4 px patches → a 7×7 grid,
~20 of 49 patches masked (blocks of at least 4). Labels: a small DALL-E-style dVAE on the tokenizer view (the same
crop at 14 px → 7×7 tokens, vocabulary 256). Without `--tokenizer` it is trained first with
the demo tokenizer's settings (engine/train/demos.py; for `--tokenizer_steps` steps) and cached by its settings and data
(engine/tokenizer/cache.py: `--tokenizer_cache`, default `$BEIT_ENGINE_CACHE/tokenizers` or
`~/.cache/beit-engine/tokenizers`), so every later run with the same inputs reuses it, whatever its `--output_dir`.
Budget: 10 epochs (930 steps). The held-out masked-token loss (logged every 50 steps) falls below the position
prior's after ~250 steps: before that the model has only learned which tokens are common where; the 186 steps of
earlier versions of this demo never got there and made a worse probe than a random init.
LR: the absolute `--lr` (1.5e-3 at global batch 64, 50 warm-up steps; blr is unused when lr is set).
At the end: the linear probe and k-NN of recipes/linear_probe.py, pretrained vs a random init (`--probe=false` skips).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.probe import ProbeConfig, run_probe, summary_line  # noqa: E402
from engine.train.demos import pretrain_config  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config():
    return pretrain_config()


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


def demo(cfg) -> None:
    """Pretraining, then (unless --probe=false) the probe of its export next to a random init, then the summary."""
    started = time.time()
    summary = run_pretraining(cfg)
    if not summary.get("first"):  # stopped before its first logged step, or not rank 0
        return
    probe = None
    if cfg.probe:
        print("linear probe and k-NN of the exported weights next to a random init (about a minute)")
        probe = run_probe(ProbeConfig(checkpoint=str(summary["export_dir"]), data_path=cfg.data.data_path,
                                      imagenet_mean_std=cfg.data.imagenet_mean_std, device=cfg.run.device,
                                      init_seed=cfg.run.seed))
    print_summary(summary, probe, started)


if __name__ == "__main__":
    run_recipe(config(), demo)
