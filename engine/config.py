"""Dataclass configs with `--key=value` command-line overrides (torchtitan-style recipes, nanoGPT-style overrides).

A recipe builds a (possibly nested) dataclass and calls `apply_overrides(cfg, sys.argv[1:])`. A key is either the
full dotted path (`--optim.lr=1e-3`) or, when unambiguous, the bare field name (`--lr=1e-3`); `--key value` is read
as `--key=value`, and a bare `--flag` of a boolean field as `--flag=true`. `--config=FILE` (TOML with tables or
dotted keys, or a run's own `config.json`) is applied before the other overrides, which win over it; its keys are
checked like the command line's. Unknown keys, ambiguous keys and values of the wrong type are errors that list what
is valid. A config class may define `validate()` (ranges,
paths, device/dtype combinations): `parse_overrides` calls it, so a bad value stops the run before any work starts,
with one line on stderr and exit status 2. `--help` lists every key by section with its type, default and the comment
written next to the field in the dataclass source.
"""

import contextlib
import dataclasses
import functools
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A bad key or value in a config, or input data that the config points to and cannot be used."""


class RunFailed(RuntimeError):
    """A run that cannot go on through no fault of its config (another rank died): one line, exit status 1."""


def exit_with_error(message: str, status: int = 2) -> typing.NoReturn:
    """One line on stderr, exit status 2 (a usage error, as argparse) unless told otherwise, no traceback."""
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep the original message only
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def join_values(argv: list[str]) -> list[str]:
    """`--key value` → `--key=value` (a value never starts with `--`); `--key=value` and a bare `--flag` unchanged."""
    joined, args = [], iter(range(len(argv)))
    for i in args:
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            joined.append(f"{arg}={argv[i + 1]}")
            next(args)
        else:
            joined.append(arg)
    return joined


def take_preset(argv: list[str], presets, default: str | None = None) -> tuple[str | None, list[str]]:
    """A recipe's `--preset=NAME` (the last one wins) and the other arguments; an unknown name exits with one line."""
    argv = join_values(argv)
    names = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--preset=")]
    if names and names[-1] not in presets:
        exit_with_error(f"--preset={names[-1]}: expected one of {', '.join(presets) or 'none (this recipe has none)'}")
    return (names[-1] if names else default), [arg for arg in argv if not arg.startswith("--preset=")]


@contextlib.contextmanager
def config_errors_exit():
    """Around a recipe's work: a `ConfigError` found later (a dataset without images, a checkpoint written with
    another batch layout) or a missing input file ends the run as a bad override does, with one line and exit
    status 2; a `RunFailed` (a lost rank) with one line and exit status 1."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as err:
        exit_with_error(str(err))
    except RunFailed as err:
        exit_with_error(str(err), status=1)


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
    """Applies `--config=FILE` and then the `--key=value` (or `--key value`) arguments to the dataclass `cfg` in place
    and returns it.

    `--help`/`-h` prints every key with its type, current value and description, and exits.
    """
    leaves = _leaves(cfg)
    argv = join_values(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(format_help(cfg))
        raise SystemExit(0)
    for arg in argv:
        if arg.startswith("--config="):
            apply_config_file(cfg, arg.split("=", 1)[1], leaves)
    for arg in argv:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank") or arg.startswith("--config="):
            continue  # the deepspeed launcher's (the rank is read from the environment); files went first
        if not arg.startswith("--"):
            raise ConfigError(f"bad argument {arg!r}: overrides are written --key=value or --key value (see --help)")
        key, has_value, text = arg[2:].partition("=")
        path = _resolve_key(key, leaves)
        owner, field = leaves[path]
        if not has_value and field.type is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
        setattr(owner, field.name, _convert(text if has_value else "true", field.type, key))
    return cfg


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """Nested tables → dotted keys: {"optim": {"lr": 1e-3}} → {"optim.lr": 1e-3}."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_text(value: Any) -> str:
    """A TOML/JSON value in the command line's spelling, so that it is checked and converted as one."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML file or a JSON object (a run's `config.json`) → {dotted key: value}; unreadable → ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config={path}: no such file (a TOML file, or the config.json of a run's output dir)")
    try:
        if path.suffix == ".json":
            table = json.loads(path.read_text())
        else:
            table = _toml_loads(path.read_text())
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError both are
        raise ConfigError(f"--config={path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})"
                          ) from None
    if not isinstance(table, dict):
        raise ConfigError(f"--config={path}: expected a table of keys, found {type(table).__name__}")
    return _flatten(table)


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (setup.py installs it there)
        import tomli as tomllib
    return tomllib.loads(text)


def apply_config_file(cfg: Any, path: str | Path, leaves: dict | None = None) -> Any:
    """Sets every key of the file on `cfg`, checked and converted like a command-line override; an unknown key is an
    error naming the file."""
    leaves = _leaves(cfg) if leaves is None else leaves
    for key, value in read_config_file(path).items():
        try:
            owner, field = leaves[_resolve_key(key, leaves)]
            setattr(owner, field.name, _convert(_as_text(value), field.type, key))
        except ConfigError as error:
            first, _, rest = str(error).partition("\n")
            raise ConfigError(f"--config={path}: {first}" + (f"\n{rest}" if rest else "")) from None
    return cfg


def parse_overrides(cfg: Any, argv: list[str]) -> Any:
    """`apply_overrides` then `cfg.validate()` (when the config defines it) for a recipe's command line: a bad key or
    value prints one clear line on stderr and exits with status 2 before any work starts."""
    with config_errors_exit():
        apply_overrides(cfg, argv)
        if hasattr(cfg, "validate"):
            cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its description in the dataclass source: the comment at the end of the field's line, else the
    comment lines right above it. Fields inherited from a base dataclass keep the base's description."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    return {**docs, **{name: doc for name, doc in _own_field_docs(cls).items() if doc}}


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    docs = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or name in docs:
            continue
        above, row = [], number - 1
        while row in comments and lines[row - 1].lstrip().startswith("#"):  # a comment block right above the field
            above.insert(0, comments[row])
            row -= 1
        docs[name] = comments.get(number) or " ".join(above)
    return docs


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"{origin.__name__} of " + ",".join(_type_name(a) for a in args if a is not Ellipsis)
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def format_help(cfg: Any) -> str:
    """Every key grouped by section: `--name` (the short form, when the bare name is unique), the dotted form, type,
    default and description."""
    leaves = _leaves(cfg)
    bare_counts: dict[str, int] = {}
    for path in leaves:
        bare_counts[path.rsplit(".", 1)[-1]] = bare_counts.get(path.rsplit(".", 1)[-1], 0) + 1
    lines = [f"{type(cfg).__name__}: override any key as --key=value or --key value (short form, or the dotted one);",
             "--config=FILE (TOML, or a run's config.json) is applied first and the other overrides on top.", ""]
    section = None
    for path, (owner, field) in leaves.items():
        head = path.rsplit(".", 1)[0] if "." in path else ""
        if head != section:
            section = head
            lines.append(f"[{head}]" if head else "[top level]")
        bare = path.rsplit(".", 1)[-1]
        name = f"--{bare} (--{path})" if bare_counts[bare] == 1 and bare != path else f"--{path}"
        doc = field_docs(type(owner)).get(field.name, "")
        line = f"  {name}: {_type_name(field.type)} = {getattr(owner, field.name)!r}"
        lines.append(f"{line}  # {doc}" if doc else line)
    return "\n".join(lines)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2, default=str) + "\n")
