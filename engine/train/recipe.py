"""What every recipe's `__main__` does, written once: `run_recipe(cfg, job)`.

    if __name__ == "__main__":
        run_recipe(published.pretrain("large"), run_pretraining)

Logging to stderr; `--preset=NAME` (a recipe's named variants: functions of the config) applied first; the other
arguments parsed as `--key=value` overrides and checked (one line and exit status 2 on a bad one, engine/config.py);
then the job, whose config errors found later end the same way. `run_arms` runs a demo's pretrained and scratch arms.
"""

import copy
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from engine.config import config_errors_exit, parse_overrides, take_preset

ARMS = {"pretrained": "from_pretrained", "scratch": "from_scratch"}  # arm → its subfolder of --output_dir


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


def parse_recipe(cfg, argv: list[str] | None = None, presets: dict[str, Callable] | None = None,
                 default_preset: str | None = None):
    """Logging, the preset (when the recipe has any), then the checked overrides → the config to run."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    preset, argv = take_preset(argv, presets or {}, default_preset)
    if preset is not None:
        cfg = presets[preset](cfg)
    return parse_overrides(cfg, argv)


def run_recipe(cfg, job: Callable, argv: list[str] | None = None, presets: dict[str, Callable] | None = None,
               default_preset: str | None = None):
    """`job(parse_recipe(cfg, ...))` with late config errors as one line and exit status 2 → the job's summary."""
    cfg = parse_recipe(cfg, argv, presets, default_preset)
    with config_errors_exit():
        return job(cfg)


def run_arms(cfg, job: Callable) -> dict:
    """A demo's two arms, `job(cfg)` from `cfg.data.finetune` and the same from scratch, each in its folder of ARMS
    under `cfg.run.output_dir` → {arm: summary}. The first stop signal stops the whole demo (a rerun resumes the
    stopped arm, then runs the other)."""
    results = {}
    for name, folder in ARMS.items():
        arm = copy.deepcopy(cfg)
        arm.data.finetune = cfg.data.finetune if name == "pretrained" else ""
        arm.run.output_dir = str(Path(cfg.run.output_dir) / folder)
        with config_errors_exit():
            results[name] = job(arm)
        if results[name]["stopped_by"]:
            raise SystemExit(f"stopped during the {name} arm; run the same command again to resume it")
    return results
