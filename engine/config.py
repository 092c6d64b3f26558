"""Dataclass configs with `--key=value` command-line overrides (torchtitan-style recipes, nanoGPT-style overrides).

A recipe builds a (possibly nested) dataclass and calls `apply_overrides(cfg, sys.argv[1:])`. A key is either the
full dotted path (`--optim.lr=1e-3`) or, when unambiguous, the bare field name (`--lr=1e-3`). Unknown keys, ambiguous
keys and values of the wrong type are errors that list what is valid.
"""

import dataclasses
import json
import types
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A bad key or value in a config override."""


def _leaves(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Dotted path → (owning dataclass instance, field) for every non-dataclass field."""
    leaves = {}
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            leaves.update(_leaves(value, path + "."))
        else:
            field.type = hints[field.name]  # resolve string annotations once
            leaves[path] = (cfg, field)
    return leaves


def _convert(text: str, annotation: Any, key: str) -> Any:
    """Parse `text` as a value of type `annotation`; raises ConfigError naming the key and the expected type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(text, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"--{key}={text}: expected one of {args}")
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"--{key}={text}: expected one of {list(args)}")
    if origin in (tuple, list):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ConfigError(f"--{key}={text}: expected {len(args)} comma-separated values")
            item_types = args
        else:
            item_types = [args[0] if args else str] * len(parts)
        values = [_convert(p, t, key) for p, t in zip(parts, item_types)]
        return tuple(values) if origin is tuple else values
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text}: expected a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(float(text)) if annotation is int and float(text).is_integer() else annotation(text)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected {annotation.__name__}") from None
    if annotation in (str, Any):
        return text
    raise ConfigError(f"--{key}: fields of type {annotation} cannot be set from the command line")


def _resolve_key(key: str, leaves: dict) -> str:
    if key in leaves:
        return key
    matches = [path for path in leaves if path.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--{key} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    names = sorted(set(leaves) | {p.rsplit(".", 1)[-1] for p in leaves})
    hint = get_close_matches(key, names, n=3)
    raise ConfigError(
        f"unknown config key --{key}" + (f" (did you mean {', '.join('--' + h for h in hint)}?)" if hint else "")
        + f"\nvalid keys: {', '.join(sorted(leaves))}"
    )


def apply_overrides(cfg: Any, argv: list[str]) -> Any:
    """Applies `--key=value` arguments to the dataclass `cfg` in place and returns it.

    `--help`/`-h` prints every key with its current value and exits.
    """
    leaves = _leaves(cfg)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(format_config(cfg))
            raise SystemExit(0)
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            continue  # injected by the deepspeed launcher; the rank is read from the environment
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"bad argument {arg!r}: overrides are written --key=value (see --help for the keys)")
        key, text = arg[2:].split("=", 1)
        path = _resolve_key(key, leaves)
        owner, field = leaves[path]
        setattr(owner, field.name, _convert(text, field.type, key))
    return cfg


def parse_overrides(cfg: Any, argv: list[str]) -> Any:
    """`apply_overrides` for a recipe's command line: a bad override prints one clear line and exits with status 2."""
    try:
        return apply_overrides(cfg, argv)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def format_config(cfg: Any) -> str:
    return "\n".join(f"  --{path}={getattr(owner, field.name)!r}" for path, (owner, field) in _leaves(cfg).items())


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2, default=str) + "\n")
