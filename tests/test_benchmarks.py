"""Benchmark scripts and suites on CPU at their small shapes (results go to temp dirs). The kernel scripts run in
tests/test_gpu_check.py, inside the gpu_check dry run that exercises them with the GPU run's flags (--out, --shapes);
here: the option parsing they share, the masking script and the pytest-benchmark suite."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV

import benchmarks.common
from benchmarks.common import parse_bench_args, select_shapes

REPO = Path(__file__).resolve().parents[1]
GPU_SHAPES = [("beit_base_224", 128), ("beit_large_224", 128)]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_args_select_gpu_shapes_and_default_to_the_results_dir():
    args = parse_bench_args(["--out=/tmp/x", "--shapes=beit_large_224"], "test", GPU_SHAPES)
    assert args.out == "/tmp/x" and select_shapes(GPU_SHAPES, [("tiny_cpu",)], False, args.shapes) == [GPU_SHAPES[1]]
    assert select_shapes(GPU_SHAPES, [("tiny_cpu",)], True, args.shapes) == [("tiny_cpu",)]
    assert parse_bench_args(None, "test", GPU_SHAPES).out is None  # append_rows then uses benchmarks/results/


def test_an_unknown_shape_is_one_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_bench_args(["--shapes=beit_huge_224"], "test", GPU_SHAPES)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and "beit_huge_224" in error and "beit_base_224" in error


def test_rows_carry_the_run_id_a_driver_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RUN_ID", "run-7")
    path = benchmarks.common.append_rows("x", [{"a": 1, **benchmarks.common.environment("cpu")}], tmp_path)
    assert path == tmp_path / "x.jsonl" and read_rows(path)[0]["run_id"] == "run-7"


def test_masking_benchmark_writes_rows(tmp_path, monkeypatch):
    output = tmp_path / "masking.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench_masking.py", "--batch=64", "--repeats=1", f"--output={output}"])
    importlib.import_module("benchmarks.bench_masking").main()
    rows = read_rows(output)
    assert {row["backend"] for row in rows} >= {"python"} and all(row["masks_per_s"] > 0 for row in rows)


@pytest.mark.slow
def test_pytest_benchmark_suite_saves_json_that_compare_reads(tmp_path):
    """`pytest benchmarks --benchmark-only` (benchmarks/test_bench_kernels.py): every kernel benchmark runs on CPU
    (ours through the interpreter) with the bench_*.py scripts' own providers, and its JSON has one entry per
    benchmark, which `pytest-benchmark compare` reads."""
    saved = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p",
                           "no:cacheprovider", f"--benchmark-json={saved}"], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    entries = json.loads(saved.read_text())["benchmarks"]
    groups = {entry["group"].split()[0] for entry in entries}
    assert groups == {"attention", "rel_pos_bias", "masked_lm_loss", "block"}
    assert {entry["extra_info"]["provider"] for entry in entries if entry["group"].startswith("attention")} == {
        "ours", "sdpa_bias", "eager"}
    assert all(entry["stats"]["rounds"] >= 1 and entry["stats"]["median"] > 0 for entry in entries)
    compare = subprocess.run([sys.executable, "-c", "import sys; from pytest_benchmark.cli import main; "
                              f"sys.argv = ['pytest-benchmark', 'compare', {str(saved)!r}]; main()"],
                             capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0 and "test_attention" in compare.stdout, compare.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_memory_benchmark_measures_two_zero3_ranks(tmp_path):
    bench_memory = importlib.import_module("benchmarks.bench_memory")
    [row] = bench_memory.main(["--models=tiny", "--stages=3", "--ranks=2", f"--out={tmp_path}",
                               f"--cache_dir={tmp_path / 'cache'}"])
    assert "error" not in row and "skipped" not in row, row
    assert 0 < row["model_states_gb"] < row["peak_gb"] and row["activations_gb"] > 0
    assert row["worker_uss_gb"] < 0.5  # a worker started from the forkserver holds no copy of the rank's memory
    table = bench_memory.markdown_table([row]).splitlines()
    assert len(table) == 3 and table[2].startswith("| beit_tiny | 3 | 2 | 1 |")
