"""Trains the demo visual tokenizer: a small DALL-E dVAE on the embedded Fashion-MNIST subset (14 px → 7×7 tokens).

    python recipes/train_tokenizer.py [--key=value ...]    # e.g. --steps=500 --output_dir=runs/tok (--help: keys)

The result, `<output_dir>/tokenizer`, is what the pretraining recipe takes as its tokenizer path. Its tokenizer view
is 14 px (second_input_size=14) for a 28 px patch view with 4 px patches: the same 2:1 ratio as BEiT's 112 px
tokenizer view for 224 px images, and the same 7×7 grid.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.tokenizer.train import train_tokenizer  # noqa: E402
from engine.train.demos import tokenizer_config  # noqa: E402
from engine.train.recipe import run_recipe  # noqa: E402


def config():
    return tokenizer_config()


if __name__ == "__main__":
    run_recipe(config(), train_tokenizer)
