"""Every benchmark script runs on CPU at its small shapes and writes labelled rows (results go to a temp dir)."""

import importlib
import json
import sys

import pytest

import benchmarks.common


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks.common, "RESULTS_DIR", tmp_path)
    return tmp_path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["attention", "rel_pos_bias", "masked_lm_loss", "block"])
def test_kernel_benchmark_writes_cpu_rows(name, results_dir):
    importlib.import_module(f"benchmarks.bench_{name}").main()
    rows = read_rows(results_dir / f"{name}.jsonl")
    assert rows and all(row["device"] == "cpu" and row["torch"] and row["commit"] and row["date"] for row in rows)
    ours = [row for row in rows if row["provider"] in ("ours", "ours_bounded", "triton")]
    assert ours and all("error" not in row and "interpreter" in row["note"] for row in ours)


def test_masking_benchmark_writes_rows(tmp_path, monkeypatch):
    output = tmp_path / "masking.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_masking.py", "--batch=64", "--repeats=1", f"--output={output}"])
    importlib.import_module("benchmarks.bench_masking").main()
    rows = read_rows(output)
    assert {row["backend"] for row in rows} >= {"python"} and all(row["masks_per_s"] > 0 for row in rows)
