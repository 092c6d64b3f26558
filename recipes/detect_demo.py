"""Object detection and instance segmentation on a CPU with real pixels: Mask R-CNN on the pretraining demo's
encoder against the same detector from scratch, same budget, then COCO box and mask AP for both.

    python recipes/pretrain_demo.py        # first: writes runs/pretrain_demo/pretrained
    python recipes/detect_demo.py [--key=value ...]

Data (engine/data/demo_detection.py, built once under runs/detect_demo/data, in COCO format so that it goes through
the same reader, pipeline and pycocotools evaluation as COCO): 32 px crops of the embedded photographs, turned grey
and darkened, with 1-3 white Fashion-MNIST garments pasted on each (0.3-0.6 of the image wide); every garment
still visible is an instance of its class (10 classes) with its mask. Training garments come from the Fashion-MNIST
training split, the validation images' from its test split.

Model: beit_mini_patch4_28 (the pretraining demo's encoder: 6 blocks of width 128, patch 4; 8 × 8 tokens at 32 px,
near its pretraining grid of 7 × 7), blocks 1/2/4/5 through BEiT's neck (strides 1/2/4/8 at patch 4), torchvision's
FPN and heads 64 channels wide (narrow: a CPU), anchors 4-64 px, 200 proposals and 64 sampled RoIs per image (a
few garments per image, and RoIAlign is most of a CPU step). Recipe: the ViTDet one scaled down (AdamW wd 0.1,
layer decay 0.8, large-scale jitter 0.5-1.5, flips, 50 warm-up steps then ×0.1 at 89% and 96%), 600 steps of 8
images per arm, fp32; COCO evaluation of the 200 validation images at the end. A first version at 64 px (16 × 16
tokens: the pretrained relative position tables stretched 2.3×) for 300 steps gave pretrained 7.50 / scratch 11.42
box AP.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train.demos import GeneratedSet, prepare_generated_set  # noqa: E402
from engine.train.detect import run_detection  # noqa: E402
from engine.train.recipe import run_arms, run_recipe  # noqa: E402
from engine.train.settings import (  # noqa: E402
    DetectionConfig,
    DetectionData,
    DetectionHead,
    ModelSettings,
    OptimSettings,
    RunSettings,
)

# Training images per second of this recipe on the project's 2-core CPU machine (img_per_s in metrics.jsonl of the
# README's run of this demo); used only for the run-time estimate printed at the start.
IMAGES_PER_SECOND_2_CORES = 9
DEMO_DATA = "runs/detect_demo/data"  # where the generated set is built (another --data_path uses that folder)


@dataclass
class DetectDemoConfig(DetectionConfig):
    demo_set: GeneratedSet = field(default_factory=lambda: GeneratedSet(garment_scale=(0.3, 0.6), max_garments=3))

    def validate(self) -> None:
        """The generated set's values, then the set itself (built once) so that the checks of the config see it."""
        from engine.data.demo_detection import build_demo_detection

        prepare_generated_set(self.demo_set, self.data.data_path, DEMO_DATA, self.model.input_size, 32,
                              build_demo_detection, "demo detection set")
        super().validate()


def config() -> DetectDemoConfig:
    return DetectDemoConfig(
        model=ModelSettings(model="beit_mini_patch4_28", input_size=32, drop_path=0.0, layer_scale_init_value=0.1,
                            attn_impl="sdpa"),
        data=DetectionData(data_path=DEMO_DATA, finetune="runs/pretrain_demo/pretrained", scale_range=(0.5, 1.5),
                           imagenet_mean_std=False),
        head=DetectionHead(fpn_channels=64, proposals_per_image=200, rois_per_image=64, eval_every=600,
                           eval_batch_size=16),
        optim=OptimSettings(lr=2e-4, min_lr=0.0, warmup_steps=50, weight_decay=0.1, layer_decay=0.8,
                            lr_schedule="step", lr_steps=(0.889, 0.963), clip_grad=3.0),
        run=RunSettings(output_dir="runs/detect_demo", steps=600, batch_size=8, precision="fp32", zero_stage=0,
                        num_workers=1, save_every=100, log_every=10),
    )


def expected_minutes(cfg: DetectDemoConfig) -> float:
    """Both arms' training images at the measured rate, plus evaluations and start-up (about 60 s per arm)."""
    steps = cfg.run.max_steps if cfg.run.max_steps > 0 else cfg.run.steps
    return (2 * steps * cfg.run.batch_size / IMAGES_PER_SECOND_2_CORES + 120) / 60


def demo(cfg: DetectDemoConfig) -> None:
    from engine.train.detect import summary as ap_summary

    started = time.time()
    print(f"detection from {cfg.data.finetune or '(no checkpoint)'} and from scratch, {cfg.run.steps} steps of "
          f"{cfg.run.batch_size} images each: expect about {expected_minutes(cfg):.0f} minutes on an idle 2-core CPU")
    results = run_arms(cfg, run_detection)
    seconds = time.time() - started
    out_dir = Path(cfg.run.output_dir)
    summary = {name: {"final": result["evals"][-1], "best": result["best"], "steps": result["step"]}
               for name, result in results.items()}
    summary["wall_seconds"] = round(seconds)
    metrics_path = out_dir / "detect_demo.json"
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n=== detection demo finished in {seconds:.0f} s ===")
    for name, result in summary.items():
        if name != "wall_seconds":
            print(f"{name:>10}: {ap_summary(result['final'])} after {result['steps']} steps")
    print(f"metrics: {metrics_path}")
    print(f"box AP pretrained={summary['pretrained']['final']['box_AP']:.2f} "
          f"scratch={summary['scratch']['final']['box_AP']:.2f}; mask AP "
          f"pretrained={summary['pretrained']['final']['mask_AP']:.2f} "
          f"scratch={summary['scratch']['final']['mask_AP']:.2f}")


if __name__ == "__main__":
    run_recipe(config(), demo)
