"""The task interface of the training loop: what differs between pretraining, fine-tuning, linear probing (and any
dense task) is a `Task`; DeepSpeed, resume, schedules, logging, signals and checkpoints live in `engine/train/loop.py`.

A task builds its model, its training loader and `module`, the `nn.Module` DeepSpeed wraps. Per micro-batch the loop
calls `module(*task.inputs(batch, step))`, which returns `(loss, stats)`: the scalar loss to back-propagate and a
1-D device tensor of sums whose last entry is their weight (masked tokens, images, pixels). The loop adds the stats
of micro-batches and ranks and logs `sum / weight` under `stat_names`, so every logged mean is weighted exactly.
Nothing here may read a device value on the host outside the hooks the loop calls at log, evaluation and save steps.
"""

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from engine.train.deepspeed_config import build_deepspeed_config
from engine.train.metrics import EVAL_FILE, read_metrics, truncate_after
from engine.train.runtime import DistInfo
from engine.train.state import model_state_dict, save_model

BEST_DIR = "best"
FINAL_DIR = "final"


class Task(ABC):
    """Base class; subclasses set the attributes in `__init__`, implement the abstract methods (a task missing one
    fails when it is built, not mid-run) and override the hooks they need."""

    stat_names: tuple[str, ...]  # names of stats[:-1], then the name of the weight stats[-1]
    curve_panels: tuple = ("loss",)  # panels of curves.png (see engine.train.metrics.plot_curves)
    # how the model's inputs are made (engine.checkpoint.preprocessing_record), saved with every export of it
    preprocessing: dict | None = None
    model: nn.Module  # the BEiT model: parameter groups, config, the weights that are saved
    module: nn.Module  # what DeepSpeed wraps: module(*inputs) → (loss, stats)
    loader: torch.utils.data.DataLoader

    def __init__(self, cfg, dist_info: DistInfo):
        self.cfg = cfg
        self.dist_info = dist_info
        self.output_dir = Path(cfg.run.output_dir)

    def build_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        """`build()`, under `deepspeed.zero.Init` at ZeRO stage 3: each parameter is partitioned over the ranks as
        soon as its module exists, so no rank ever holds the whole model (code that needs whole parameters uses
        engine/sharded.py). Build only the trained model this way, not a frozen tokenizer."""
        if self.cfg.run.zero_stage != 3:
            return build()
        import deepspeed

        config = build_deepspeed_config(self.cfg.run, self.cfg.optim, self.dist_info.world_size)
        with deepspeed.zero.Init(config_dict_or_path=config):
            return build()

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """AdamW parameter groups (engine.param_groups.param_groups) of the parameters to train."""

    @abstractmethod
    def inputs(self, batch, step: int) -> tuple:
        """A loader batch → the module's arguments, on the device (normalisation, labels, mixing happen here)."""

    @abstractmethod
    def flops_per_image(self, weight_per_image: float) -> float:
        """Training FLOPs of one image, given this step's mean stats weight per image (e.g. masked patches)."""

    def client_state(self) -> dict:
        """Task state saved in every checkpoint (JSON-like)."""
        return {}

    def checkpoint_files(self) -> dict[str, object]:
        """Objects rank 0 `torch.save`s into every checkpoint (e.g. EMA weights)."""
        return {}

    def resume(self, client: dict, ckpt_dir: Path) -> None:
        """Restores what `client_state` and `checkpoint_files` saved."""

    def after_step(self, engine, step: int) -> None:
        """After every optimizer step (e.g. the EMA update). Device work only."""

    def log_due(self, step: int, plan) -> bool:
        """Whether step `step` must write a log row even off the `log_every` grid (e.g. a held-out check). `plan`:
        engine.train.loop.Plan."""
        return False

    def log_extras(self, engine, step: int, plan) -> dict:
        """Extra values for the log row of step `step` (host syncs allowed: this is a logging step)."""
        return {}

    def evaluation_due(self, step: int, plan) -> bool:
        """Whether to evaluate after step `step`; a function of its arguments only (a resumed run redoes an
        evaluation that a stop interrupted without asking again)."""
        return False

    def evaluate(self, engine, step: int, plan, stop) -> dict | None:
        """The evaluation after step `step` (collective on every rank) → its row for the --report_to targets (None:
        nothing to report). Its batches go through `stop.iterate(loader, count)` (engine/stop_signal.py), so a stop
        signal ends it within a batch or two on every rank (EvaluationStopped); the loop then saves and the
        evaluation is redone on resume."""
        return None

    def finish(self, engine, ckpt_dir: Path) -> dict:
        """After the final checkpoint of a run that was not stopped (every rank): exports and summary values."""
        return {}


class EvaluatedTask(Task):
    """A task scored on held-out data (classification, segmentation): `record` appends each evaluation to
    `eval.jsonl` and saves the weights to `best/` when `best_keys[0]` improves (higher is better); `finish` saves
    `final/`. The best score survives a resume, and rows past the resumed step are dropped (they will be redone)."""

    best_keys: tuple[str, ...]  # the score first, then other values kept with it (e.g. top-5)

    def __init__(self, cfg, dist_info: DistInfo):
        super().__init__(cfg, dist_info)
        self.best = {self.best_keys[0]: -1.0}

    def client_state(self) -> dict:
        return {"best": self.best}

    def resume(self, client: dict, ckpt_dir: Path) -> None:
        self.best = client["best"]
        if self.dist_info.is_main:
            truncate_after(self.output_dir / EVAL_FILE, client["step"])

    def record(self, engine, row: dict) -> dict:
        """Every rank, after an evaluation: `row` (step, epoch, scores) to eval.jsonl, best/ if it improved → row."""
        score = self.best_keys[0]
        improved = row[score] > self.best[score]
        state = model_state_dict(engine, self.dist_info.rank) if improved else None  # collective under ZeRO-3
        if improved:
            self.best = {**{key: row[key] for key in self.best_keys}, "step": row["step"]}
        if self.dist_info.is_main:
            with open(self.output_dir / EVAL_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            if state is not None:
                save_model(self.model, state, self.output_dir / BEST_DIR, self.preprocessing)
        return row

    def finish(self, engine, ckpt_dir: Path) -> dict:
        state = model_state_dict(engine, self.dist_info.rank)  # collective under ZeRO-3
        evaluated = "step" in self.best  # False: no evaluation ran (e.g. evaluation switched off)
        summary = {"best": self.best if evaluated else None}
        if self.dist_info.is_main:
            save_model(self.model, state, self.output_dir / FINAL_DIR, self.preprocessing)
            summary.update(evals=read_metrics(self.output_dir / EVAL_FILE), final_dir=self.output_dir / FINAL_DIR,
                           best_dir=self.output_dir / BEST_DIR if evaluated else None)
        return summary
