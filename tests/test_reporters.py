"""`--report_to`: TensorBoard event files, CSV rows and an offline W&B run written from a short fine-tuning run (train
rows at the logging steps, evaluation rows, the config as hyperparameters); bad targets fail at parse time."""

import csv
import json
from pathlib import Path

import pytest
from conftest import finetune_demo_config, run_finetune_demo

from engine.config import ConfigError
from engine.train import reporters
from engine.train.metrics import EVAL_FILE, METRICS_FILE, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depth=2", "--batch_size=16", "--epochs=1", "--max_steps=2", "--log_every=1", "--num_workers=0",
        "--progress=false", "--eval_batch_size=500", "--seed=1", "--linear_probe=true", "--layer_decay=none"]


def finetune(output_dir: Path, pretrained: Path, report_to: str) -> dict:
    return run_finetune_demo(output_dir, *TINY, f"--finetune={pretrained}", f"--report_to={report_to}")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tensorboard_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], bytes]:
    """{tag: [(step, value)]} of the scalars, and the hparams plugin's content, from the run's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    scalars, hparams = {}, b""
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    hparams += value.metadata.plugin_data.content
                elif value.HasField("tensor"):
                    scalars.setdefault(value.tag, []).append((event.step, value.tensor.float_val[0]))
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, hparams


def test_tensorboard_and_csv_get_the_train_and_evaluation_rows_and_the_config(tmp_path, pretrained_dir):
    pytest.importorskip("tensorboard")
    finetune(tmp_path, pretrained_dir, "tensorboard,csv")
    train_rows, eval_rows = read_metrics(tmp_path / METRICS_FILE), read_metrics(tmp_path / EVAL_FILE)
    assert [row["step"] for row in train_rows] == [1, 2] and [row["step"] for row in eval_rows] == [2]

    scalars, hparams = tensorboard_events(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][1][1] == pytest.approx(train_rows[1]["loss"], rel=1e-6)
    assert scalars["eval/acc1"] == [(2, pytest.approx(eval_rows[0]["acc1"], rel=1e-6))]
    assert b"optim.lr" in hparams and b"run.report_to" in hparams

    csv_train, csv_eval = read_csv(tmp_path / "csv" / "train.csv"), read_csv(tmp_path / "csv" / "eval.csv")
    assert [int(row["step"]) for row in csv_train] == [1, 2]
    assert float(csv_train[0]["loss"]) == pytest.approx(train_rows[0]["loss"])
    assert float(csv_eval[0]["acc1"]) == pytest.approx(eval_rows[0]["acc1"])


def test_wandb_offline_run_is_written_without_a_network(tmp_path, monkeypatch, pretrained_dir):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no key: offline by default
    finetune(tmp_path, pretrained_dir, "wandb")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run_id = (tmp_path / reporters.WANDB_ID_FILE).read_text().strip()
    records = (run_dir / f"run-{run_id}.wandb").read_bytes()  # the run's records: config, history rows
    assert b"optim.lr" in records and b"train/loss" in records and b"eval/acc1" in records


def test_csv_rows_past_the_resumed_step_are_dropped_and_late_metrics_widen_the_header(tmp_path):
    reporter = reporters.CsvReporter(tmp_path, {}, start_step=0)
    for step in (1, 2, 3):
        reporter.log({"step": step, "loss": 1.0 / step, **({"heldout_loss": 2.0} if step == 3 else {})}, "train")
    rows = read_csv(tmp_path / "csv" / "train.csv")
    assert list(rows[0]) == ["step", "loss", "heldout_loss"] and rows[2]["heldout_loss"] == "2.0"
    resumed = reporters.CsvReporter(tmp_path, {}, start_step=2)
    resumed.log({"step": 3, "loss": 0.25}, "train")
    assert [(row["step"], row["loss"]) for row in read_csv(tmp_path / "csv" / "train.csv")] == \
        [("1", "1.0"), ("2", "0.5"), ("3", "0.25")]


@pytest.mark.parametrize("report_to, message", [
    ("tensorbord", "unknown target 'tensorbord'"),
    ("none,csv", "unknown target 'none'"),
])
def test_unknown_targets_are_one_line_errors(report_to, message):
    with pytest.raises(ConfigError, match=message):
        reporters.parse_report_to(report_to)


def test_a_target_whose_library_is_missing_fails_at_parse_time(monkeypatch, capsys, pretrained_dir):
    from engine.config import parse_overrides

    monkeypatch.setattr(reporters, "_importable", lambda module: module != "wandb")
    with pytest.raises(SystemExit) as stop:
        parse_overrides(finetune_demo_config(), [f"--finetune={pretrained_dir}", "--report_to=csv,wandb"])
    assert stop.value.code == 2
    assert "wandb is not installed; pip install '.[wandb]'" in capsys.readouterr().err
    assert reporters.parse_report_to("csv, tensorboard ,csv") == ["csv", "tensorboard"]
    assert reporters.parse_report_to("none") == [] and json.dumps(reporters.TARGETS)
