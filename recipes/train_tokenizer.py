"""Trains the demo visual tokenizer: a small DALL-E dVAE on the embedded Fashion-MNIST subset (14 px → 7×7 tokens).

    python recipes/train_tokenizer.py [--key=value ...]    # e.g. --steps=500 --output_dir=runs/tok (--help: keys)

The result, `<output_dir>/tokenizer`, is what the pretraining recipe takes as its tokenizer path. Its tokenizer view
is 14 px (second_input_size=14) for a 28 px patch view with 4 px patches: the same 2:1 ratio as BEiT's 112 px
tokenizer view for 224 px images, and the same 7×7 grid.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import parse_overrides  # noqa: E402
from engine.tokenizer.train import TokenizerTrainConfig, train_tokenizer  # noqa: E402


def config() -> TokenizerTrainConfig:
    # One thread: these small convolutions gain little from a second one, and spin-wait badly on a shared CPU.
    return TokenizerTrainConfig(data_path="embedded:fashion_mnist", input_size=14, group_count=2, n_hid=32,
                                vocab_size=256, steps=1000, num_threads=1, output_dir="runs/tokenizer_fashion_mnist")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train_tokenizer(parse_overrides(config(), sys.argv[1:]))
