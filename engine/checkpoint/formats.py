"""Names, layouts and the records of a checkpoint being read and loaded."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)




FORMAT_NAME = "beit-engine"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HF_BIN_NAME = "pytorch_model.bin"
HF_PREPROCESSOR_NAME = "preprocessor_config.json"  # a Hugging Face image processor's settings
INDEX_SUFFIX = ".index.json"  # sharded weights: {"weight_map": {tensor name: shard file}}
SUPPORTED_LAYOUTS = (
    "supported layouts: (1) an official BEiT .pth file (state dict under 'model' or 'module', or bare); "
    f"(2) a Hugging Face microsoft/beit-* directory or file ({WEIGHTS_NAME} or {HF_BIN_NAME}, with {CONFIG_NAME}); "
    f"(3) a directory written by engine.checkpoint.save_pretrained ({WEIGHTS_NAME} + {CONFIG_NAME} with "
    f"format '{FORMAT_NAME}')"
)
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
PREPROCESSING_KEY = "preprocessing"  # in config.json next to "model": how the model's inputs were made


def preprocessing_record(mean, std, input_size: int, interpolation: str, crop_pct: float | None = None,
                         class_names: list[str] | None = None) -> dict:
    """What travels with the weights so that whoever loads them feeds the same inputs: normalisation, input side,
    the evaluation crop (resize to input_size / crop_pct, centre-crop input_size; None: no crop), the resampling
    filter, and the classes' names (index order) when the model classifies."""
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "input_size": int(input_size),
            "crop_pct": crop_pct, "interpolation": interpolation,
            "class_names": list(class_names) if class_names is not None else None}
HEAD_LIKE = ("head", "lm_head", "fc_norm", "norm")  # task-specific tensors a shape mismatch may drop



@dataclass
class LoadReport:
    """What `load_checkpoint` did. `dropped` and `converted` entries are `"key: reason"` lines."""

    layout: str
    loaded: list[str] = field(default_factory=list)  # model keys filled from the checkpoint
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)

    def log(self, source: str | Path) -> None:
        logger.info("loaded %s checkpoint %s: %d tensors loaded, %d converted, %d dropped, %d missing, %d unexpected",
                    self.layout, source, len(self.loaded), len(self.converted), len(self.dropped), len(self.missing),
                    len(self.unexpected))
        for line in self.converted:
            logger.info("converted %s", line)
        for line in self.dropped:
            logger.warning("dropped %s", line)
        if self.missing:
            logger.warning("missing keys (left as initialised): %s", ", ".join(self.missing))
        if self.unexpected:
            logger.warning("unexpected keys (ignored): %s", ", ".join(self.unexpected))


@dataclass
class SourceCheckpoint:
    """A checkpoint read from disk: official-named tensors, the layout, and the source token grid when known."""

    state: dict[str, torch.Tensor]
    layout: str  # "official", "huggingface" or FORMAT_NAME
    window: tuple[int, int] | None  # (h, w) token grid of the model that wrote it, from its config.json
    notes: list[str] = field(default_factory=list)  # conversions already applied while reading

