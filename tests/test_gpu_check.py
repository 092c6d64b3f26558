"""benchmarks/gpu_check.py: the CPU dry run (what `make gpu-check DRY_RUN=1` runs) passes every step within its budget
and leaves the summary, the JSONL rows and the junit files; the kernel scripts' rows are labelled CPU rows.
Step isolation (a failing or hanging step never stops the next) and the summary's arithmetic are checked on stand-in
steps and rows, in seconds."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV

from benchmarks import gpu_check
from benchmarks.gpu_check_summary import render

REPO = Path(__file__).resolve().parents[1]
KERNEL_BENCHES = ["attention", "rel_pos_bias", "masked_lm_loss", "block"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run shared by the tests below: (output directory, completed process, seconds)."""
    if shutil.which("nvidia-smi"):
        pytest.skip("a dry run rehearses on a machine without a GPU")
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--dry-run"], cwd=REPO,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=400)
    return out, proc, time.monotonic() - start


@pytest.mark.slow  # the dry run
def test_dry_run_passes_every_step_within_its_budget(dry_run):
    out, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = read_rows(out / "gpu_check.jsonl")
    assert [step["step"] for step in steps] == [step.name for step in gpu_check.plan(out, dry_run=True)]
    assert all(step["status"] == "passed" and step["dry_run"] for step in steps)
    prepared = next(step["seconds"] for step in steps if step["step"] == "deepspeed_op")  # a one-off build
    assert seconds - prepared < 200


@pytest.mark.slow  # the dry run
def test_dry_run_writes_the_summary(dry_run):
    out, _, _ = dry_run
    summary = (out / "summary.md").read_text()
    assert "Dry run on CPU" in summary and "not a GPU measurement" in summary
    for section in ("### Steps", "### Attention", "### Relative position bias", "### Masked LM loss", "### Block",
                    "### MIM training", "### Dense tasks", "### Provider errors"):
        assert section in summary
    for step in gpu_check.plan(out, dry_run=True):
        assert f"| {step.name} | passed" in summary
    assert json.loads((out / "environment.json").read_text())["device"] == "cpu"


@pytest.mark.slow  # the dry run
@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_kernel_benchmarks_write_labelled_cpu_rows(dry_run, name):
    out, _, _ = dry_run
    rows = read_rows(out / f"{name}.jsonl")
    assert rows and all(row["device"] == "cpu" and row["torch"] and row["commit"] and row["date"] and row["run_id"]
                        for row in rows)
    ours = [row for row in rows if row["provider"] in ("ours", "ours_bounded", "triton")]
    assert ours and all("error" not in row and "interpreter" in row["note"] for row in ours)


@pytest.mark.slow  # the dry run
def test_training_steps_ran_the_trainer_path_for_both_models(dry_run):
    out, _, _ = dry_run
    rows = read_rows(out / "train.jsonl")
    assert {row["requested_model"] for row in rows} == {model for model, _ in gpu_check.TRAIN_MODELS.values()}
    assert {row["attn_impl"] for row in rows} == {"eager", "sdpa"}  # triton needs CUDA (skipped on CPU)
    assert all(row["deepspeed"] and row["img_per_s"] > 0 for row in rows)


@pytest.mark.slow  # the dry run
def test_cuda_tests_are_collected_and_skipped_on_cpu(dry_run):
    out, _, _ = dry_run
    for name in ("junit_kernel_tests.xml", "junit_kernel_tests_slow.xml"):
        counts = gpu_check.junit_counts(out / name)
        assert counts["tests"] > 0 and counts["skipped"] == counts["tests"], name


def stand_in(name: str, code: str, optional: bool = False) -> gpu_check.Step:
    return gpu_check.Step(name, name, [sys.executable, "-c", code], 5, 5, optional=optional)


def test_a_failing_or_hanging_step_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0)
    steps = [stand_in("fails", "raise SystemExit(3)"), stand_in("hangs", "import time; time.sleep(60)"),
             stand_in("passes", "print('ok')"), stand_in("optional_hangs", "import time; time.sleep(60)", True)]
    steps[1].dry_budget_s = steps[3].dry_budget_s = 1
    start = time.monotonic()
    outcomes = gpu_check.run_all(steps, tmp_path, dry_run=True, run_id="test")
    assert time.monotonic() - start < 10  # the hanging steps were stopped at their budget
    assert [o.status for o in outcomes] == ["failed", "timeout", "passed", "timeout"]
    assert outcomes[0].returncode == 3 and outcomes[2].returncode == 0
    assert [gpu_check.failed(o) for o in outcomes] == [True, True, False, False]  # the last one is optional
    assert [row["step"] for row in read_rows(tmp_path / "gpu_check.jsonl")] == [step.name for step in steps]


def test_summary_speedups_are_their_ms_over_ours(tmp_path):
    base = {"bench": "attention", "shape": "beit_large_224", "mode": "fwd+bwd", "run_id": "r", "device": "cuda"}
    rows = [dict(base, provider="ours", ms=2.0, tflops=300.0), dict(base, provider="sdpa_bias", ms=5.0),
            dict(base, provider="sdpa_flash_nobias", ms=1.8), dict(base, provider="flex", error="Boom: no"),
            dict(base, provider="ours", ms=99.0, run_id="an earlier run")]
    (tmp_path / "attention.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = render(tmp_path, "r", [], dry_run=False, total_s=1.0)
    line = next(line for line in summary.splitlines() if line.startswith("| beit_large_224 | fwd+bwd"))
    assert line.split(" | ")[2:7] == ["2", "300", "2.50×", "—", "error"] and "0.90×" in line
    assert "Dry run" not in summary and "Boom: no" in summary


def test_bad_out_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(not_a_dir), "--dry-run"],
                          cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not a directory" in proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("dry", [True, False])
def test_make_gpu_check_runs_the_script_without_install(dry):
    args = ["make", "-n", "gpu-check", "OUT=some/dir"] + (["DRY_RUN=1"] if dry else [])
    commands = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "benchmarks/gpu_check.py --out some/dir" + (" --dry-run" if dry else "") in commands
    assert "--no-index --no-deps" in commands and "pip install -e" not in commands


def test_rehearsals_write_outside_the_committed_results():
    """A dry run's CPU rows and the AOT check's tables land in git-ignored folders unless --out says otherwise:
    benchmarks/results/ holds results committed on purpose."""
    from tools.aot import spec as aot

    for path in (gpu_check.DRY_RUN_OUT, REPO / aot.DEFAULT_OUT):
        assert not path.resolve().is_relative_to(REPO / "benchmarks" / "results")
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0, path
