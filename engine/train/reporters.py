"""Where the metric rows go besides metrics.jsonl: `--report_to=tensorboard,wandb,csv` or `none` (the transformers
Trainer's convention). Rank 0 only; the rows are the ones the loop already has at its logging steps (train) and after
each evaluation (eval), so reporting adds no host sync. The run's config goes along as hyperparameters.

    tensorboard  OUTPUT_DIR/tensorboard/ (event files; `tensorboard --logdir OUTPUT_DIR`)   pip install .[tensorboard]
    wandb        OUTPUT_DIR/wandb/ (project $WANDB_PROJECT, default beit-engine)             pip install .[wandb]
                 online when $WANDB_API_KEY is set, else offline ($WANDB_MODE wins); `wandb sync` uploads later
    csv          OUTPUT_DIR/csv/train.csv and eval.csv, one column per metric

A resumed run continues the same TensorBoard run (events past the resumed step are purged), the same W&B run (its id
is kept in the output dir) and the same CSV files (rows past the resumed step are dropped).
"""

import csv
import logging
import os
import uuid
from pathlib import Path

from engine.config import ConfigError

logger = logging.getLogger(__name__)

# name → the module that must import for it (None: the standard library's)
TARGETS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": None}
WANDB_ID_FILE = "wandb_run_id"


def parse_report_to(text: str) -> list[str]:
    """`--report_to`'s comma-separated names → the targets; unknown names, `none` with others and missing libraries
    are one-line errors (at parse time: `check_run` calls this)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"] or not names:
        return []
    for name in names:
        if name not in TARGETS:
            raise ConfigError(f"--report_to={text}: unknown target {name!r}; expected a comma-separated list of "
                              f"{', '.join(TARGETS)}, or none")
        module = TARGETS[name]
        if module is not None and not _importable(module):
            raise ConfigError(f"--report_to={text}: {module} is not installed; pip install '.[{name}]' (or "
                              f"pip install {module}), or leave {name} out")
    return list(dict.fromkeys(names))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def flat_hyperparameters(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config dict → {"optim.lr": 0.0015, ...} with values TensorBoard and W&B accept (others as text)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _numbers(row: dict) -> dict[str, float]:
    return {key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardReporter:
    def __init__(self, output_dir: Path, hyperparameters: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        # into this run's own event file (SummaryWriter.add_hparams would start a second run beside it)
        for summary in hparams(hyperparameters, {}):
            self.writer.file_writer.add_summary(summary)

    def log(self, row: dict, section: str) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(f"{section}/{key}", value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, output_dir: Path, hyperparameters: dict, start_step: int):
        import wandb

        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "beit-engine"), name=output_dir.name,
                              dir=str(output_dir), config=hyperparameters, id=run_id, resume="allow", mode=mode)
        if mode == "offline":
            logger.info("W&B runs offline in %s (no WANDB_API_KEY); `wandb sync` uploads it", self.run.dir)

    def log(self, row: dict, section: str) -> None:
        self.run.log({f"{section}/{key}": value for key, value in _numbers(row).items()}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


class CsvReporter:
    """One wide file per section; a metric that appears later (the held-out check's) widens the file's header."""

    def __init__(self, output_dir: Path, hyperparameters: dict, start_step: int):
        self.dir = output_dir / "csv"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.columns: dict[str, list[str]] = {}
        for path in self.dir.glob("*.csv"):  # a resumed run: rows past the resumed step will be redone
            rows = [row for row in self._read(path) if int(float(row["step"])) <= start_step]
            self.columns[path.stem] = self._write(path, rows, list(rows[0]) if rows else [])

    @staticmethod
    def _read(path: Path) -> list[dict]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    @staticmethod
    def _write(path: Path, rows: list[dict], columns: list[str]) -> list[str]:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        return columns

    def log(self, row: dict, section: str) -> None:
        path, columns = self.dir / f"{section}.csv", self.columns.get(section, [])
        row = {key: value for key, value in row.items() if not isinstance(value, (dict, list))}
        if not columns or set(row) - set(columns):
            widened = columns + [key for key in row if key not in columns]
            self.columns[section] = self._write(path, self._read(path) if columns else [], widened)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns[section]).writerow(row)

    def close(self) -> None:
        pass


REPORTERS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter, "csv": CsvReporter}


def open_reporters(report_to: str, output_dir: str | Path, config: dict, start_step: int) -> list:
    """The reporters `report_to` names, opened on rank 0 with the run's config as hyperparameters."""
    hyperparameters = flat_hyperparameters(config)
    return [REPORTERS[name](Path(output_dir), hyperparameters, start_step) for name in parse_report_to(report_to)]
