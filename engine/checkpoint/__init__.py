"""Read BEiT checkpoints into this project's models, and save/convert them to this project's format.

Layouts read by `load_checkpoint` (all end up as official unilm parameter names, which the models use):
  1. official BEiT `.pth` release / training files: the state dict under "model" or "module", or a bare state dict;
  2. Hugging Face hub layout of `microsoft/beit-*`: a directory (or one of its files) with `model.safetensors` or
     `pytorch_model.bin` and `config.json`, or their sharded form (`model.safetensors.index.json` /
     `pytorch_model.bin.index.json` naming the shard of each tensor, as large checkpoints are saved); HF names
     (`beit.encoder.layer.{i}.attention.attention.query` ...) are mapped to official ones (separate
     query/key/value → fused `qkv` + `q_bias` + `v_bias`);
  3. this project's format: a directory with `model.safetensors` and a `config.json` holding
     `{"format": "beit-engine", "version": 1, "model": model.config}` (written by `save_pretrained`).

While loading, the checkpoint is adapted to the model as the official fine-tuning loader does: the shared relative
position bias of a pretraining checkpoint is copied into every block's table, relative position tables and absolute
position embeddings are resized to the model's token grid (`engine.resize`), `relative_position_index` buffers are
dropped, head/norm tensors whose shape does not fit are dropped, and tensors are cast to the model's dtype. Everything
that was converted, dropped, missing or unexpected is returned in a `LoadReport` and logged.

Security: `.pth`/`.bin` files are read with `torch.load(weights_only=True)` only. A file that needs arbitrary
unpickling is refused; `python -m engine.checkpoint convert SRC DST --model NAME --trust-pickle` is the one explicit
opt-in, meant to be run once on a file you trust.

CLI: `python -m engine.checkpoint convert SRC DST --model NAME [--set key=value ...] [--trust-pickle]`.

Modules: `read` (the three layouts from disk), `hf` (Hugging Face names → official), `adapt` (to a model, and the
load), `write` (this project's format, atomically; conversions), `formats` (names and records), `__main__` (the CLI).
"""

from engine.checkpoint.adapt import adapt_state_dict, load_checkpoint, load_state_dict_into
from engine.checkpoint.formats import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    HF_PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    LoadReport,
    SourceCheckpoint,
    preprocessing_record,
)
from engine.checkpoint.hf import hf_to_official
from engine.checkpoint.read import read_checkpoint, read_preprocessing, source_from_state_dict
from engine.checkpoint.write import create_model_from_checkpoint, export_safetensors, read_model_config, save_pretrained

__all__ = [
    "CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "HF_PREPROCESSOR_NAME", "WEIGHTS_NAME", "LoadReport",
    "SourceCheckpoint",
    "adapt_state_dict", "create_model_from_checkpoint", "export_safetensors", "hf_to_official", "load_checkpoint",
    "load_state_dict_into", "preprocessing_record", "read_checkpoint", "read_model_config", "read_preprocessing",
    "save_pretrained", "source_from_state_dict",
]
