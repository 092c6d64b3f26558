"""Semantic segmentation on a CPU with real pixels: UperNet on the pretraining demo's encoder against the same model
from scratch, same budget, then mIoU for both and a picture of predictions.

    python recipes/pretrain_demo.py        # first: writes runs/pretrain_demo/pretrained
    python recipes/segment_demo.py [--key=value ...]

Data (engine/data/demo_segmentation.py, built once under runs/segment_demo/data, in ADE20K format so
that it goes through the same reader and pipeline as ADE20K): 28 px crops of eight public-domain / CC0 photographs
(engine/data/assets/photos), turned grey and darkened, each with one Fashion-MNIST garment pasted on it (21-28 px,
white, alpha = the garment's intensity); every pixel is labelled background or the garment's class (11 classes;
faint garment pixels are ignored). Training images come from the Fashion-MNIST training split, the 200 validation
images from its test split. Tinted garments on colour photos (`--grey=false`), several per image (`--max_garments`)
and smaller ones (`--garment_scale`) are harder: the first version of this demo (tinted, 1-3 garments of 0.4-0.8 of
the image) was too hard: its pretrained arm predicted background everywhere after 600 steps (mIoU 7.06).

Model: beit_mini_patch4_28 (the pretraining demo's encoder: 6 blocks of width 128, patch 4, 7 × 7 tokens at 28 px),
blocks 1/2/4/5 through the official neck (strides 1/2/4/8 at patch 4), UPerHead 32 channels, auxiliary FCN head 16
channels (narrow: at stride 1 the head costs more than the encoder on a CPU). Recipe: the official one scaled down
(AdamW wd 0.05, poly schedule after 50 warm-up steps, layer decay 0.9, random rescale 0.75-1.5, crop 28, flip,
photometric distortion), 600 steps of 32 images per arm, fp32; evaluation on the 200 validation images every 200
steps and at the end.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train.demos import GeneratedSet, prepare_generated_set  # noqa: E402
from engine.train.recipe import ARMS, run_arms, run_recipe  # noqa: E402
from engine.train.segment import run_segmentation  # noqa: E402
from engine.train.settings import (  # noqa: E402
    ModelSettings,
    OptimSettings,
    RunSettings,
    SegmentationConfig,
    SegmentationData,
    SegmentationHead,
)

# Training images per second of this recipe on the project's 2-core CPU machine (img_per_s in metrics.jsonl of the
# README's run of this demo); used only for the run-time estimate printed at the start.
IMAGES_PER_SECOND_2_CORES = 60
PICTURE_IMAGES = 6
DEMO_DATA = "runs/segment_demo/data"  # where the generated set is built (another --data_path uses that folder)


@dataclass
class SegmentDemoConfig(SegmentationConfig):
    demo_set: GeneratedSet = field(default_factory=GeneratedSet)  # one grey garment of 0.75-1.0 per image

    def validate(self) -> None:
        """The generated set's values, then the set itself (built once) so that the checks of the config see it."""
        from engine.data.demo_segmentation import build_demo_segmentation

        prepare_generated_set(self.demo_set, self.data.data_path, DEMO_DATA, self.model.input_size, 16,
                              build_demo_segmentation, "demo segmentation set")
        super().validate()


def config() -> SegmentDemoConfig:
    return SegmentDemoConfig(
        model=ModelSettings(model="beit_mini_patch4_28", input_size=28, drop_path=0.0, layer_scale_init_value=0.1,
                            attn_impl="sdpa"),
        data=SegmentationData(data_path=DEMO_DATA, finetune="runs/pretrain_demo/pretrained",
                              num_classes=11, img_scale=(112, 28), ratio_range=(0.75, 1.5), cat_max_ratio=0.75,
                              eval_stride=28, imagenet_mean_std=False),
        head=SegmentationHead(decode_channels=32, aux_channels=16, aux_weight=0.4, eval_every=200,
                              loss_average="valid"),
        optim=OptimSettings(lr=1e-3, min_lr=0.0, warmup_steps=50, weight_decay=0.05, layer_decay=0.9,
                            lr_schedule="poly", clip_grad=3.0),
        run=RunSettings(output_dir="runs/segment_demo", steps=600, batch_size=32, precision="fp32", zero_stage=0,
                        num_workers=1, save_every=100, log_every=10),
    )


def expected_minutes(cfg: SegmentDemoConfig) -> float:
    """Both arms' training images at the measured rate, plus evaluations and start-up (about 40 s per arm)."""
    steps = cfg.run.max_steps if cfg.run.max_steps > 0 else cfg.run.steps
    return (2 * steps * cfg.run.batch_size / IMAGES_PER_SECOND_2_CORES + 80) / 60


def load_trained(run_dir: Path):
    """The segmenter saved in `run_dir/final` (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    from engine.segmentation.model import create_segmenter

    config = json.loads((run_dir / "final" / "config.json").read_text())["model"]
    model = create_segmenter(config.pop("name"), **config)
    model.load_state_dict(load_file(run_dir / "final" / "model.safetensors"))
    return model.eval()


def save_picture(cfg: SegmentDemoConfig, run_dirs: dict[str, Path], out: Path) -> Path:
    """Image / ground truth / each arm's prediction for the first validation images, with a class legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from matplotlib.patches import Patch

    from engine.data.demo_segmentation import DEMO_CLASSES
    from engine.data.segmentation import ADE20KDataset, SegEvalTransform
    from engine.segmentation.model import slide_inference

    dataset = ADE20KDataset(cfg.data.data_path, "validation", num_classes=cfg.data.num_classes)
    transform = SegEvalTransform(cfg.data.img_scale, imagenet_mean_std=cfg.data.imagenet_mean_std)
    models = {name: load_trained(path) for name, path in run_dirs.items()}
    palette = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: len(DEMO_CLASSES)]
    palette[0] = (0.15, 0.15, 0.15, 1.0)  # background dark grey

    def colour(labels: np.ndarray) -> np.ndarray:
        rgb = np.ones(labels.shape + (3,))  # ignored pixels white
        valid = labels < len(DEMO_CLASSES)
        rgb[valid] = palette[labels[valid], :3]
        return rgb

    columns = ["image", "ground truth"] + [f"{name} prediction" for name in models]
    fig, axes = plt.subplots(PICTURE_IMAGES, len(columns), figsize=(2.2 * len(columns), 2.2 * PICTURE_IMAGES))
    for row in range(PICTURE_IMAGES):
        image, label = dataset[row]
        pixels, label_map = transform(image, label)
        cells = [np.asarray(image), colour(label_map.numpy())]
        with torch.no_grad():
            inputs = transform.model_inputs(pixels[None])
            for model in models.values():
                logits = slide_inference(model, inputs, cfg.data.num_classes, cfg.model.input_size,
                                         cfg.data.eval_stride)
                cells.append(colour(logits.argmax(dim=1)[0].numpy()))
        for col, cell in enumerate(cells):
            axes[row, col].imshow(cell, interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=10)
    fig.legend(handles=[Patch(color=palette[i], label=name) for i, name in enumerate(DEMO_CLASSES)],
               loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def demo(cfg: SegmentDemoConfig) -> None:
    started = time.time()
    print(f"segmentation from {cfg.data.finetune or '(no checkpoint)'} and from scratch, {cfg.run.steps} steps of "
          f"{cfg.run.batch_size} images each: expect about {expected_minutes(cfg):.0f} minutes on an idle 2-core CPU")
    results = run_arms(cfg, run_segmentation)
    seconds = time.time() - started
    out_dir = Path(cfg.run.output_dir)
    summary = {name: {"final": result["evals"][-1], "best": result["best"], "steps": result["step"]}
               for name, result in results.items()}
    summary["wall_seconds"] = round(seconds)
    metrics_path = out_dir / "segment_demo.json"
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    picture = save_picture(cfg, {name: out_dir / folder for name, folder in ARMS.items()}, out_dir / "predictions.png")
    print(f"\n=== segmentation demo finished in {seconds:.0f} s ===")
    for name, result in summary.items():
        if name != "wall_seconds":
            final = result["final"]
            print(f"{name:>10}: mIoU {final['mIoU']:.2f}%, mAcc {final['mAcc']:.2f}%, pixel accuracy "
                  f"{final['aAcc']:.2f}% after {result['steps']} steps")
    print(f"metrics: {metrics_path}\npicture: {picture}")
    print(f"mIoU pretrained={summary['pretrained']['final']['mIoU']:.2f} "
          f"scratch={summary['scratch']['final']['mIoU']:.2f}")


if __name__ == "__main__":
    run_recipe(config(), demo)
