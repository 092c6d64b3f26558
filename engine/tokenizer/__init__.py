"""Visual tokenizers for BEiT: the DALL-E dVAE (architecture, safetensors I/O, pickle converter, training)."""

from engine.tokenizer.dalle import DalleDecoder, DalleEncoder, map_pixels, unmap_pixels
from engine.tokenizer.io import load_dalle, load_tokenizer, read_tokenizer_config, save_tokenizer
from engine.tokenizer.visual_tokenizer import VisualTokenizer, check_tokenizer_compatible

__all__ = [
    "DalleDecoder",
    "DalleEncoder",
    "VisualTokenizer",
    "check_tokenizer_compatible",
    "load_dalle",
    "load_tokenizer",
    "map_pixels",
    "read_tokenizer_config",
    "save_tokenizer",
    "unmap_pixels",
]
