"""`python -m engine.checkpoint convert SRC DST --model NAME [--set key=value ...] [--trust-pickle]`."""

import argparse
import json
import logging

from engine.checkpoint.write import export_safetensors


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as attn_impl=eager


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert an official .pth or Hugging Face checkpoint")
    convert.add_argument("src", help="official .pth file, or Hugging Face directory / file")
    convert.add_argument("dst", help="output directory (this project's format)")
    convert.add_argument("--model", required=True, help="registered model name (engine.list_models())")
    convert.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                         metavar="KEY=VALUE", help="create_model override, e.g. --set num_classes=100")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow full unpickling of SRC (runs code from the file: only for files you trust)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = export_safetensors(args.src, args.dst, {"name": args.model, **dict(args.overrides)},
                                    trust_pickle=args.trust_pickle)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {args.dst}: {len(report.converted)} converted, {len(report.dropped)} dropped, "
          f"{len(report.missing)} missing, {len(report.unexpected)} unexpected")


if __name__ == "__main__":
    main()
