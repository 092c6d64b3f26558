"""Trains the demo visual tokenizer: a small DALL-E dVAE on the embedded Fashion-MNIST subset (28 px → 7×7 tokens).

    python recipes/train_tokenizer.py [--key=value ...]    # e.g. --steps=500 --output_dir=runs/tok (--help: keys)

The result, `<output_dir>/tokenizer`, is what the pretraining recipe takes as its tokenizer path (its tokenizer view
is 28 px, second_input_size=28, and its patch grid 7×7).
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import apply_overrides  # noqa: E402
from engine.tokenizer.train import TokenizerTrainConfig, train_tokenizer  # noqa: E402


def config() -> TokenizerTrainConfig:
    return TokenizerTrainConfig(data_path="embedded:fashion_mnist", input_size=28, group_count=3, n_hid=32,
                                vocab_size=512, output_dir="runs/tokenizer_fashion_mnist")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train_tokenizer(apply_overrides(config(), sys.argv[1:]))
