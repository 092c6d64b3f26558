"""Export a trained model to Hugging Face transformers (and, on request, to the hub).

    python recipes/export_hf.py --checkpoint=runs/finetune_demo/from_pretrained/best --output_dir=hf/finetuned
    python recipes/export_hf.py --checkpoint=runs/pretrain_demo --output_dir=hf/pretrained --push_to_hub=me/beit-demo

Any checkpoint the engine writes: a save_pretrained folder (a pretraining export, a fine-tuned best/ or final/, a
segmenter's), a DeepSpeed ckpt-<step>, or a run's output dir (its latest checkpoint). Writes config.json (BeitConfig),
model.safetensors (the hub's names) and preprocessor_config.json (the mean/std, size and crop the model was trained
with), so that BeitForMaskedImageModeling / BeitForImageClassification / BeitForSemanticSegmentation
`.from_pretrained(DIR)` loads it with no missing or unexpected keys and gives this engine's outputs
(tests/test_export_hf.py). `--push_to_hub` needs `pip install '.[hub]'` and a `huggingface-cli login`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.train.export import ExportHFConfig, run_export_hf  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def export(cfg: ExportHFConfig) -> None:
    result = run_export_hf(cfg)
    print(f"exported {cfg.checkpoint} → {result['output_dir']}" + (f"; uploaded to {result['url']}"
                                                                    if result["url"] else ""))


if __name__ == "__main__":
    run_recipe(ExportHFConfig(), export)
