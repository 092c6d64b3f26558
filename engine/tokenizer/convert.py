"""Converts OpenAI's released DALL-E dVAE pickles (encoder.pkl, decoder.pkl) to a safetensors tokenizer directory.

    python -m engine.tokenizer.convert encoder.pkl OUT_DIR --trust-pickle [--decoder decoder.pkl] [--input-size 112]

The .pkl files are `torch.save`s of whole `dall_e.encoder.Encoder` / `dall_e.decoder.Decoder` modules (attrs classes,
convs with parameters `w` and `b`). This is the only place in the engine that unpickles, and only with
--trust-pickle: unpickling can run arbitrary code from the file. The `dall_e` package is not needed: its classes
are mapped to empty stand-in modules that just receive the pickled state, and any class outside torch and a few
containers is refused, in zip-format files and legacy (pre-1.6) `torch.save` files alike.
"""

import argparse
import logging
import pickle
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from engine.tokenizer.dalle import DalleDecoder, DalleEncoder
from engine.tokenizer.io import save_tokenizer

logger = logging.getLogger(__name__)

# Constructor arguments stored on the pickled instances (attrs fields). `group_count` is not among them: DALL-E
# declares it as a plain class attribute, so it is not pickled; it is counted from the weights instead.
ENCODER_FIELDS = ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")
DECODER_FIELDS = ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size")
# BEiT feeds DALL-E 112 px images (its 8× downsampling gives the 14×14 grid of a 224 px, patch-16 ViT).
DALLE_INPUT_SIZE = 112


class _StandIn(nn.Module):
    """Receives the pickled state of one DALL-E module; nn.Module's __setstate__ restores params and children."""


_STAND_INS = {name: type(name, (_StandIn,), {}) for name in ("Encoder", "Decoder", "EncoderBlock", "DecoderBlock",
                                                            "Conv2d")}
_ALLOWED = {"collections": {"OrderedDict"}, "_codecs": {"encode"}, **{  # protocol 2 writes Python 2 module names
    builtins: {"set", "object"} for builtins in ("builtins", "__builtin__")}, **{
    copyreg: {"_reconstructor"} for copyreg in ("copyreg", "copy_reg")}}


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names a class outside the allow-list (it may run code): nothing of it was executed."""


class _DalleUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "dall_e" and name in _STAND_INS:
            return _STAND_INS[name]
        if module == "torch" or module.startswith("torch.") or name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise RefusedPickle(f"{module}.{name} is not part of a DALL-E dVAE pickle; refusing to load it")


def _restricted_load(file, **kwargs):
    return _DalleUnpickler(file, **kwargs).load()


def _unpickle_module(path: Path, expected: str) -> _StandIn:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    # Both entry points restricted: zip files go through `Unpickler`, legacy (pre-1.6, non-zip) files through `load`
    pickle_module = types.SimpleNamespace(Unpickler=_DalleUnpickler, load=_restricted_load, __name__="dalle_unpickler")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # source-change warnings about the stand-in classes
            obj = torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
    except RefusedPickle as err:
        raise ValueError(f"{path}: {err} (nothing from the file was run)") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"{path} is not a DALL-E {expected} pickle ({err}). Note: `wget -o` writes wget's log to "
                         "the file; download with `wget -O`.") from None
    if type(obj) is not _STAND_INS[expected]:
        raise ValueError(f"{path} holds a {type(obj).__module__}.{type(obj).__name__}, expected dall_e {expected}")
    return obj


def _convert_module(obj: _StandIn, cls: type[nn.Module], fields: tuple[str, ...], path: Path) -> nn.Module:
    missing = [f for f in fields if f not in vars(obj)]
    if missing:
        raise ValueError(f"{path}: the pickled module lacks the DALL-E attributes {missing}")
    state = {k: v.detach().float() for k, v in obj.state_dict().items()}
    group_count = len({k.split(".")[1] for k in state if k.startswith("blocks.group_")})
    with torch.device("meta"):
        module = cls(group_count=group_count, **{f: int(getattr(obj, f)) for f in fields})
    try:
        module.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the DALL-E architecture: {err}") from None
    return module


def convert_dalle_pickles(encoder_pkl: str | Path, out_dir: str | Path, trust_pickle: bool = False,
                          decoder_pkl: str | Path | None = None, input_size: int = DALLE_INPUT_SIZE) -> Path:
    """encoder.pkl (+ decoder.pkl) → tokenizer directory (tokenizer.json + safetensors). Unpickles: trusted only."""
    if not trust_pickle:
        raise PermissionError(f"refusing to unpickle {encoder_pkl}: loading a pickle runs code stored in the file. "
                              "If it comes from a source you trust (e.g. cdn.openai.com/dall-e/encoder.pkl), pass "
                              "--trust-pickle (trust_pickle=True)")
    encoder_pkl = Path(encoder_pkl)
    encoder = _convert_module(_unpickle_module(encoder_pkl, "Encoder"), DalleEncoder, ENCODER_FIELDS, encoder_pkl)
    decoder = None
    if decoder_pkl is not None:
        decoder_pkl = Path(decoder_pkl)
        decoder = _convert_module(_unpickle_module(decoder_pkl, "Decoder"), DalleDecoder, DECODER_FIELDS, decoder_pkl)
    return save_tokenizer(out_dir, encoder, input_size, decoder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder_pkl", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--decoder", type=Path, default=None, help="decoder.pkl, to keep the decoder as well")
    parser.add_argument("--input-size", type=int, default=DALLE_INPUT_SIZE, help="tokenizer view size in pixels")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = convert_dalle_pickles(args.encoder_pkl, args.out_dir, args.trust_pickle, args.decoder, args.input_size)
    except (PermissionError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
