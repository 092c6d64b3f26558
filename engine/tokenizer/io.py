"""Tokenizer directories: `tokenizer.json` + `encoder.safetensors` (+ `decoder.safetensors`). Never unpickles.

tokenizer.json: {"format": "beit-engine-tokenizer", "format_version": 1, "kind": "dalle_encoder",
"input_size": <pixels>, "encoder": {DalleEncoder kwargs}, "decoder": {DalleDecoder kwargs} (only with a decoder)}.
"""

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.tokenizer.dalle import DalleDecoder, DalleEncoder
from engine.tokenizer.visual_tokenizer import VisualTokenizer

logger = logging.getLogger(__name__)

FORMAT = "beit-engine-tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer.json"
_HOW_TO_GET_ONE = ("train one with `python recipes/train_tokenizer.py` or convert DALL-E's encoder.pkl with "
                   "`python -m engine.tokenizer.convert encoder.pkl OUT_DIR --trust-pickle`")


def _atomic_write(path: Path, write) -> None:
    """Calls write(tmp_path) then renames over `path`, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates files readable by their owner only; tokenizers are shared
    os.replace(tmp, path)


def save_tokenizer(out_dir: str | Path, encoder: DalleEncoder, input_size: int,
                   decoder: DalleDecoder | None = None) -> Path:
    """Writes a tokenizer directory; tokenizer.json is written last, so a complete JSON means complete weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "dalle_encoder", "input_size": input_size,
              "encoder": encoder.config}
    modules = {"encoder": encoder}
    if decoder is not None:
        config["decoder"] = decoder.config
        modules["decoder"] = decoder
    for name, module in modules.items():
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        _atomic_write(out_dir / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    _atomic_write(out_dir / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    logger.info("saved tokenizer to %s", out_dir)
    return out_dir


def read_tokenizer_config(path: str | Path) -> dict:
    """Reads and validates tokenizer.json; clear errors for a missing directory or a foreign file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist: {_HOW_TO_GET_ONE}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a tokenizer directory (no {CONFIG_FILE}): {_HOW_TO_GET_ONE}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): {_HOW_TO_GET_ONE}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} has format {found!r}, expected {FORMAT!r}: {_HOW_TO_GET_ONE}")
    if config.get("format_version") != FORMAT_VERSION or config.get("kind") != "dalle_encoder":
        raise ValueError(f"{config_path}: unsupported format_version {config.get('format_version')!r} or kind "
                         f"{config.get('kind')!r} (this engine reads version {FORMAT_VERSION}, kind 'dalle_encoder')")
    return config


def _load_weights(module: torch.nn.Module, file: Path) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer weights {file} are missing: {_HOW_TO_GET_ONE}")
    state = load_file(str(file))
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong_shape = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{file} does not match its tokenizer.json architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {sorted(wrong_shape)[:5]}")
    module.load_state_dict(state, assign=True)  # the module was built on the meta device


def _build(cls, config: dict, name: str, config_path: Path):
    try:
        with torch.device("meta"):  # no time spent on random init of weights about to be replaced
            return cls(**config[name])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: bad {name!r} architecture entry ({err})") from None


def load_dalle(path: str | Path, with_decoder: bool = False) -> tuple[dict, DalleEncoder, DalleDecoder | None]:
    """Tokenizer directory → (config, encoder, decoder or None), fp32 on CPU."""
    path = Path(path)
    config = read_tokenizer_config(path)
    encoder = _build(DalleEncoder, config, "encoder", path / CONFIG_FILE)
    _load_weights(encoder, path / "encoder.safetensors")
    decoder = None
    if with_decoder:
        if "decoder" not in config:
            raise ValueError(f"{path} holds no decoder (only an encoder), so it cannot reconstruct images")
        decoder = _build(DalleDecoder, config, "decoder", path / CONFIG_FILE)
        _load_weights(decoder, path / "decoder.safetensors")
    return config, encoder, decoder


def load_tokenizer(path: str | Path, device: torch.device | str = "cpu",
                   low_precision: torch.dtype = torch.bfloat16) -> VisualTokenizer:
    """Tokenizer directory → frozen `VisualTokenizer` ready on `device` (see `VisualTokenizer.prepare`)."""
    config, encoder, _ = load_dalle(path)
    tokenizer = VisualTokenizer(encoder, config["input_size"]).prepare(device, low_precision)
    logger.info("loaded tokenizer %s: vocab %d, %d px → %s tokens", path, tokenizer.vocab_size,
                tokenizer.input_size, tokenizer.token_grid)
    return tokenizer
