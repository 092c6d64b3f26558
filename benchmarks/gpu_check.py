"""One-command GPU validation for a bare node: kernel tests, kernel benchmarks, a short training benchmark and the
input pipelines.

    python3 benchmarks/gpu_check.py --out DIR             # a GPU node: every step, under 8 minutes on an H200
    python3 benchmarks/gpu_check.py --out DIR --dry-run   # a CPU: the same steps at tiny shapes, 1-2 minutes
    make gpu-check OUT=DIR [DRY_RUN=1]                    # the same, after installing the carried .whl/ wheels

Steps, in order, each a subprocess with a time budget (a failing or timed-out step is recorded and the next one
runs; the exit status is 1 when any step failed):
  environment        GPU name, SM count, versions, DeepSpeed and nvcc, commit → environment.json
  kernel_tests       `pytest -m "cuda and not slow"` over the kernel test files (bf16/fp16 at BEiT-B/L shapes)
  bench_*            attention (ours vs SDPA±bias, FlexAttention, eager), rel_pos_bias, masked_lm_loss, block
  deepspeed_op       builds the DeepSpeed op the training steps need (on a GPU informational: see DEEPSPEED_OP)
  train_beit_*       bench_train.py: BEiT-B and BEiT-L MIM steps per attn_impl (img/s, MFU, peak memory)
  bench_data         bench_data.py: every input pipeline through DATA_WORKERS DataLoader workers on the node's CPU
                     (img/s per core beside the feed one GPU needs)
  bench_data_dali    bench_data.py --data_backend=dali: pretraining with DALI decoding on the GPU; informational
                     (DALI's wheel, ~420 MB, does not fit a device carry: it runs where DALI is installed)
  kernel_tests_slow  the full-shape sweep (`-m "cuda and slow"`) in the time left; optional: running out of time
                     there does not fail the check, a failing test does
Then summary.md: each step's status and duration and the key numbers in tables. Everything lands in `--out`: the
benchmarks' JSONL rows (tagged with this run's `run_id`, so the summary ignores older rows in the same files),
gpu_check.jsonl (one row per step), junit_*.xml, environment.json, gpu_check_logs/<step>.log and summary.md.

The dry run exists so that a short GPU window is never spent on a typo: it runs every script with the GPU run's
flags (the kernel scripts on their tiny CPU shapes, our kernels through Triton's interpreter; the training steps with
a tiny model, 2 images, one step and the PyTorch loss appended as overrides, their triton rows skipped) and the CUDA
tests are collected and skipped.
The parent process imports neither torch nor CUDA: the GPU belongs to the step that runs.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.gpu_check_summary import read_rows, write_summary  # noqa: E402  (stdlib only, like this file)

DEFAULT_OUT = REPO / "benchmarks" / "results"  # a GPU run's rows are results, committed on purpose
DRY_RUN_OUT = REPO / "build" / "gpu-check-dry-run"  # a rehearsal's CPU rows never mix with them (git-ignored)
KERNEL_TEST_FILES = ["tests/test_kernel_attention.py", "tests/test_kernel_rel_pos_bias.py",
                     "tests/test_kernel_masked_lm_loss.py", "tests/test_kernel_model.py"]
BENCH_SHAPES = "beit_base_224,beit_large_224"  # N = 197, D = 64, H = 12 / 16
BLOCK_SHAPES = "beit_base_224_depth4,beit_large_224_depth4"
TRAIN_FLAGS = ["--attn_impls=eager,sdpa,triton", "--compile_modes=off", "--tokenizer_modes=excluded",
               "--mlm_loss=fused", "--precision=bf16", "--steps=10", "--warmup=3"]
TRAIN_MODELS = {"train_beit_base": ("beit_base_patch16_224_8k_vocab", 128),
                "train_beit_large": ("beit_large_patch16_224_8k_vocab", 128)}
# Appended to the training commands in a dry run (later overrides win): what a CPU runs in seconds. The triton rows
# are skipped there (a training step through Triton's interpreter takes ~10 s); bench_block covers that model path.
DRY_TRAIN_OVERRIDES = ["--precision=fp32", "--mlm_loss=reference", "--batch_size=2", "--steps=1", "--warmup=0"]
# DeepSpeed installed without prebuilt ops JIT-builds (ninja, then cached in ~/.cache/torch_extensions) the op its
# first use needs, in a step of its own so that the training steps' budgets time training. On a GPU: FusedAdam, the
# trainer's optimizer, which needs nvcc; without it the build fails at once, bench_train times torch's fused AdamW
# instead, and the check goes on (the step is informational). On CPU: the shared-memory op that DeepSpeed's process
# group starts with (30 s to minutes on 2 busy cores, once per machine; a GPU node never builds it).
DEEPSPEED_OP = {False: "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()",
                True: "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"}
# The whole check: under 8 min on a GPU. A dry run takes 1-2 min on 2 cores; its budgets only stop a hang, with room
# for a busy machine and for a first build of DeepSpeed's CPU op.
TOTAL_BUDGET_S = {False: 470, True: 780}
DATA_WORKERS = 8  # DataLoader workers of the data steps (a 16-core node: half its cores, as 8 GPUs would share 96)
MIN_STEP_S = 10  # a step with less time left than this is skipped, not started
KILL_GRACE_S = 15  # after SIGINT (pytest then still writes its junit file, a benchmark keeps its rows)
LOG_TAIL_LINES = 25
OUR_PROVIDERS = ("ours", "ours_bounded", "triton")  # a row of ours with an error fails its step; others' are listed


@dataclass
class Step:
    name: str
    title: str
    command: list[str]
    budget_s: float  # GPU run; a dry run uses dry_budget_s
    dry_budget_s: float
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # out of time is fine (not started, or stopped): only a failure counts
    informational: bool = False  # neither a failure nor running out of time fails the check
    junit: str | None = None  # the junit file a pytest step writes
    results: str | None = None  # the JSONL file (name without .jsonl) a benchmark step appends to


@dataclass
class Outcome:
    step: str
    title: str
    status: str  # passed, failed, timeout, skipped
    seconds: float
    budget_s: float
    returncode: int | None
    optional: bool
    informational: bool
    command: str
    detail: str = ""


def plan(out: Path, dry_run: bool) -> list[Step]:
    """The steps of a run, in order. A dry run differs in the training overrides and in which DeepSpeed op it builds."""
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TEST_FILES]
    out_flag = f"--out={out}"
    steps = [
        Step("environment", "Environment record", [python, "benchmarks/environment.py", out_flag], 45, 30),
        Step("kernel_tests", "CUDA kernel tests at BEiT shapes (bf16, fp16)",
             [*pytest, "-m", "cuda and not slow", f"--junitxml={out / 'junit_kernel_tests.xml'}"], 140, 40,
             junit="junit_kernel_tests.xml"),
        Step("bench_attention", "Attention benchmark",
             [python, "benchmarks/bench_attention.py", out_flag, f"--shapes={BENCH_SHAPES}"], 100, 60,
             results="attention"),
        Step("bench_rel_pos_bias", "Relative position bias benchmark",
             [python, "benchmarks/bench_rel_pos_bias.py", out_flag, f"--shapes={BENCH_SHAPES}"], 25, 30,
             results="rel_pos_bias"),
        Step("bench_masked_lm_loss", "Masked LM loss benchmark",
             [python, "benchmarks/bench_masked_lm_loss.py", out_flag, f"--shapes={BENCH_SHAPES}"], 35, 40,
             results="masked_lm_loss"),
        Step("bench_block", "Block (4-layer model) benchmark",
             [python, "benchmarks/bench_block.py", out_flag, f"--shapes={BLOCK_SHAPES}"], 45, 60, results="block"),
    ]
    op_title = "DeepSpeed's CPU shared-memory op (built once per machine)" if dry_run else \
        "DeepSpeed's FusedAdam op (needs nvcc; without it training falls back to torch's fused AdamW)"
    steps.append(Step("deepspeed_op", op_title, [python, "-c", DEEPSPEED_OP[dry_run]], 90, 420,
                      informational=not dry_run))
    for name, (model, batch) in TRAIN_MODELS.items():
        command = [python, "benchmarks/bench_train.py", f"--model={model}", f"--batch_size={batch}", *TRAIN_FLAGS,
                   out_flag, *(DRY_TRAIN_OVERRIDES if dry_run else [])]
        env = {"TRITON_INTERPRET": "0"} if dry_run else {}  # whatever the caller exported (pytest's conftest does)
        steps.append(Step(name, f"MIM training benchmark, {model}", command, 70, 120, env=env, results="train"))
    # informational: the node's image may lack torchvision (detection), which writes an error row, not a failure
    steps.append(Step("bench_dense", "Dense tasks: one bf16 training step of UperNet (512²) and Mask R-CNN (1024²)",
                      [python, "benchmarks/bench_dense.py", out_flag], 90, 150, informational=True,
                      results="dense"))
    data = [python, "benchmarks/bench_data.py", out_flag, f"--workers={DATA_WORKERS}",
            *(["--seconds=1", "--images=64"] if dry_run else ["--seconds=3"])]
    steps.append(Step("bench_data", "Input pipelines per worker core (PIL backend)",
                      [*data, *(["--pipelines=pretrain,eval"] if dry_run else [])], 75, 120, results="data"))
    steps.append(Step("bench_data_dali", "Pretraining input through DALI (GPU decode)",
                      [*data, "--data_backend=dali", "--pipelines=pretrain"], 45, 90, informational=True,
                      results="data"))
    steps.append(Step("kernel_tests_slow", "CUDA kernel tests: full-shape sweep (slow)",
                      [*pytest, "-m", "cuda and slow", f"--junitxml={out / 'junit_kernel_tests_slow.xml'}"], 600, 30,
                      optional=True, junit="junit_kernel_tests_slow.xml"))
    return steps


def _stop(process: subprocess.Popen) -> None:
    """SIGINT to the step's process group (its own session), then SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, limit_s: float, env: dict[str, str], log_path: Path) -> tuple[str, int | None, float]:
    """Run one step with its output in `log_path`: (status, return code, seconds)."""
    start = time.monotonic()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(step.command) + "\n")
        log.flush()
        process = subprocess.Popen(step.command, cwd=REPO, env={**env, **step.env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit_s)
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(process)
            returncode, status = process.returncode, "timeout"
    return status, returncode, time.monotonic() - start


def junit_counts(path: Path) -> dict:
    """Test counts and failing test names from a pytest junit file ({} when there is none)."""
    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def describe(step: Step, status: str, returncode: int | None, out: Path, log_path: Path, run_id: str) -> str:
    """One line for the summary's step table: test or row counts, and why the step failed."""
    if step.results:
        rows = step_rows(step, out, run_id)
        errors = sum("error" in row for row in rows)
        counts = f"{len(rows)} rows" + (f", {errors} with an error" if errors else "")
        return counts if status == "passed" else f"{counts}; {last_line(log_path)}"
    if step.junit:
        counts = junit_counts(out / step.junit)
        if counts:
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            return (f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
                    + (" (pytest found no test)" if returncode == 5 else ""))
    return last_line(log_path) if status in ("failed", "timeout") else ""


def step_rows(step: Step, out: Path, run_id: str) -> list[dict]:
    """This run's rows of the step's results file; for a training step, those of its `--model=` (kept in the row as
    `model` on a GPU, as `requested_model` on CPU where a tiny model stands in)."""
    rows = read_rows(out, step.results, run_id)
    model = next((arg.split("=", 1)[1] for arg in step.command if arg.startswith("--model=")), None)
    return rows if model is None else [row for row in rows if row.get("requested_model", row.get("model")) == model]


def last_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def print_log_tail(log_path: Path) -> None:
    lines = log_path.read_text(errors="replace").splitlines()
    print("\n".join("    | " + line for line in lines[-LOG_TAIL_LINES:]), flush=True)


def run_all(steps: list[Step], out: Path, dry_run: bool, run_id: str) -> list[Outcome]:
    """Every step in order within the total budget; a step gets min(its budget, the time left)."""
    logs = out / "gpu_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "BENCH_RUN_ID": run_id, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    deadline = time.monotonic() + TOTAL_BUDGET_S[dry_run]
    outcomes = []
    for step in steps:
        budget = step.dry_budget_s if dry_run else step.budget_s
        limit = min(budget, deadline - time.monotonic())
        log_path = logs / f"{step.name}.log"
        if limit < MIN_STEP_S:
            status, returncode, seconds, detail = "skipped", None, 0.0, "no time left in the total budget"
        else:
            print(f"[gpu_check] {step.name}: {step.title} (limit {limit:.0f} s)", flush=True)
            status, returncode, seconds = run_step(step, limit, env, log_path)
            detail = describe(step, status, returncode, out, log_path, run_id)
            if returncode == 5 and step.junit:  # pytest: no test collected — the marker or file list is wrong
                status = "failed"
            if step.results and any("error" in row and row.get("provider") in OUR_PROVIDERS
                                    for row in step_rows(step, out, run_id)):
                status, detail = "failed", detail + "; a row of our kernels has an error (see Provider errors)"
        outcome = Outcome(step.name, step.title, status, round(seconds, 1), budget, returncode, step.optional,
                          step.informational, " ".join(step.command), detail)
        outcomes.append(outcome)
        print(f"[gpu_check] {step.name}: {status} in {seconds:.1f} s {detail}", flush=True)
        if status in ("failed", "timeout"):
            print_log_tail(log_path)
        with (out / "gpu_check.jsonl").open("a") as handle:
            handle.write(json.dumps({"bench": "gpu_check", "run_id": run_id, "dry_run": dry_run,
                                     **asdict(outcome)}) + "\n")
    return outcomes


def failed(outcome: Outcome) -> bool:
    """A failure of the check: a failed step, and a timed-out or skipped one unless optional (never an
    informational step)."""
    if outcome.informational:
        return False
    if outcome.status == "failed":
        return True
    return outcome.status in ("timeout", "skipped") and not outcome.optional


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help=f"output directory (default {DEFAULT_OUT}; a dry run's: {DRY_RUN_OUT})")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: every step at tiny shapes")
    args = parser.parse_args(argv)
    out = Path(args.out or (DRY_RUN_OUT if args.dry_run else DEFAULT_OUT)).resolve()
    if out.exists() and not out.is_dir():
        parser.exit(2, f"gpu_check: --out {out} is a file, not a directory\n")
    if args.dry_run and shutil.which("nvidia-smi"):  # the scripts would pick their GPU shapes: no rehearsal then
        parser.exit(2, "gpu_check: --dry-run rehearses on a machine without a GPU; here, run the check itself\n")
    out.mkdir(parents=True, exist_ok=True)
    run_id = "gpu_check-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    start = time.monotonic()
    print(f"[gpu_check] {'DRY RUN (CPU) ' if args.dry_run else ''}run {run_id} → {out}", flush=True)
    outcomes = run_all(plan(out, args.dry_run), out, args.dry_run, run_id)
    total_s = time.monotonic() - start
    try:
        summary_path = write_summary(out, run_id, outcomes, args.dry_run, total_s)
        print(summary_path.read_text(), flush=True)
    except Exception as error:  # the steps' rows and logs are on disk whatever went wrong here
        print(f"[gpu_check] summary failed: {type(error).__name__}: {error}", flush=True)
        return 1
    bad = [outcome.step for outcome in outcomes if failed(outcome)]
    print(f"[gpu_check] {'FAILED: ' + ', '.join(bad) if bad else 'all steps passed'} ({total_s:.0f} s)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
