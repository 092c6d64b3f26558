"""Single-process pretraining on the embedded data with a tiny model and a random stand-in tokenizer: a short run,
resume exactness, SIGKILL + restart, atomic `latest`, export, bad configs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV

from engine.config import apply_overrides
from engine.train.checkpointing import complete_checkpoints, latest_checkpoint
from engine.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_demo.py"
TINY = ["--depth=2", "--batch_size=16", "--epochs=2", "--max_steps=6", "--log_every=1", "--num_workers=0",
        "--progress=false", "--drop_path=0.1", "--warmup_steps=2", "--seed=3"]


def demo_config(tokenizer_dir: Path, output_dir: Path, *extra: str):
    sys.path.insert(0, str(RECIPE.parent))
    from pretrain_demo import config

    return apply_overrides(config(), [*TINY, f"--tokenizer={tokenizer_dir}", f"--output_dir={output_dir}", *extra])


def run_in_process(tokenizer_dir: Path, output_dir: Path, *extra: str) -> dict:
    from engine.train.pretrain import run_pretraining

    return run_pretraining(demo_config(tokenizer_dir, output_dir, *extra))


def losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir / "metrics.jsonl")}


def assert_reproduces(output_dir: Path, reference: Path) -> None:
    """The logged losses equal and the exported weights equal, bit for bit."""
    import torch
    from safetensors.torch import load_file

    assert losses(output_dir) == losses(reference)
    weights = load_file(output_dir / "pretrained" / "model.safetensors")
    expected = load_file(reference / "pretrained" / "model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


@pytest.fixture(scope="module")
def reference_run(tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_in_process(tokenizer_dir, out)
    return out


@pytest.fixture(scope="module")
def process_reference_run(tokenizer_dir, tmp_path_factory) -> Path:
    """The uninterrupted run as a user runs it, in its own process: what the restarted processes must reproduce.
    (Not `reference_run`: after the ~400 tests before this module, a run inside the test process computed other
    weights than fresh processes do, in CI and in the full local suite, never in isolation; the in-process resume
    test compares in-process runs with each other.)"""
    out = tmp_path_factory.mktemp("process_reference")
    subprocess.run([sys.executable, str(RECIPE), *TINY, f"--tokenizer={tokenizer_dir}", f"--output_dir={out}"],
                   cwd=ROOT, env=SUBPROCESS_ENV, check=True, capture_output=True)
    return out


def test_short_run_writes_everything(reference_run):
    rows = read_metrics(reference_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mlm_acc", "lr", "wd", "grad_norm", "img_per_s"):
        assert all(r[key] is not None for r in rows), key
    assert rows[0]["lr"] == 0.0 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["mfu"] is None  # CPU: no peak to compare with
    # the held-out check runs at the last step (and every heldout_every steps), next to the position prior
    assert rows[-1]["heldout_loss"] > 0 and 0 < rows[-1]["prior_loss"] and 0 <= rows[-1]["prior_acc"] <= 1
    assert all("heldout_loss" not in r for r in rows[:-1])
    for name in ("config.json", "deepspeed_config.json", "curves.png", "pretrained/model.safetensors",
                 "pretrained/config.json", "latest"):
        assert (reference_run / name).exists(), name
    assert json.loads((reference_run / "deepspeed_config.json").read_text())["gradient_clipping"] == 3.0
    assert latest_checkpoint(reference_run).name == "ckpt-6"


def test_exported_weights_load(reference_run):
    from engine.checkpoint import create_model_from_checkpoint

    model = create_model_from_checkpoint(reference_run / "pretrained")
    assert model.config["depth"] == 2 and model.config["vocab_size"] == 64


def test_a_runs_config_json_given_back_reproduces_its_settings(reference_run):
    """`--config=OUTPUT_DIR/config.json` (the resolved settings the run wrote) on the same recipe gives them back."""
    from pretrain_demo import config

    from engine.config import config_to_dict

    saved = json.loads((reference_run / "config.json").read_text())
    again = apply_overrides(config(), [f"--config={reference_run / 'config.json'}"])
    assert json.loads(json.dumps(config_to_dict(again), default=str)) == saved


def test_the_run_directory_exports_to_transformers_with_its_preprocessing(reference_run, tmp_path):
    """The DeepSpeed checkpoint of a run (its output dir → latest) → BeitForMaskedImageModeling, every key used."""
    transformers = pytest.importorskip("transformers")
    from engine.checkpoint import read_preprocessing
    from engine.train.export import export_hf

    assert read_preprocessing(reference_run / "pretrained")["mean"] == [0.5] * 3  # the demo's normalisation
    export_hf(reference_run, tmp_path / "hf")
    _, info = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] * 3 and processor["size"] == {"height": 28, "width": 28}


def test_resume_is_exact(tokenizer_dir, reference_run, tmp_path):
    run_in_process(tokenizer_dir, tmp_path, "--max_steps=3")
    assert latest_checkpoint(tmp_path).name == "ckpt-3"
    run_in_process(tokenizer_dir, tmp_path)  # same command with max_steps=6: resumes at step 3
    assert losses(tmp_path) == losses(reference_run)


@pytest.mark.slow
def test_resume_with_other_batch_is_a_clear_error(tokenizer_dir, reference_run, tmp_path):
    run_in_process(tokenizer_dir, tmp_path, "--max_steps=1", "--save_every=1")
    with pytest.raises(ValueError, match="global batch=16"):
        run_in_process(tokenizer_dir, tmp_path, "--batch_size=8")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    """From Python too (not only from a recipe's command line): `train` checks the config it is given."""
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="--tokenizer=.*nowhere: tokenizer directory .* does not exist"):
        run_in_process(tmp_path / "nowhere", tmp_path)


@pytest.mark.slow
def test_sigkill_then_restart_reproduces_losses(tokenizer_dir, process_reference_run, tmp_path):
    args = [sys.executable, str(RECIPE), *TINY, f"--tokenizer={tokenizer_dir}", f"--output_dir={tmp_path}",
            "--save_every=2", "--max_steps=6"]
    log = open(tmp_path / "killed_run.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV)
    deadline = time.time() + 240
    while time.time() < deadline and max(losses(tmp_path), default=0) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-run: after step 3's log, around the step-4 save
    proc.wait()
    log.close()
    assert max(losses(tmp_path), default=0) >= 3, (tmp_path / "killed_run.log").read_text()[-3000:]
    for ckpt in complete_checkpoints(tmp_path):  # whatever `latest` names is complete
        assert (ckpt / "mp_rank_00_model_states.pt").is_file() and (ckpt / "rng_state_rank0.pt").is_file()
    restarted = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert_reproduces(tmp_path, process_reference_run)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tokenizer_dir, tmp_path):
    args = [sys.executable, str(RECIPE), *TINY, f"--tokenizer={tokenizer_dir}", f"--output_dir={tmp_path}",
            "--save_every=0", "--max_steps=1000"]
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe buffer would block the run
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV)
        deadline = time.time() + 240
        while time.time() < deadline and max(losses(tmp_path), default=0) < 2:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    log_text = log_path.read_text()
    assert proc.returncode == 0, log_text[-2000:]
    assert "stopped by SIGTERM" in log_text
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 2


class _DyingEngine:
    """Writes part of a checkpoint, then dies as a SIGKILL mid-save would."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")


def test_latest_never_names_an_incomplete_checkpoint(tmp_path):
    from engine.train.checkpointing import remove_incomplete, save_checkpoint

    (tmp_path / "ckpt-2").mkdir()
    (tmp_path / "latest").write_text("ckpt-2\n")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_DyingEngine(), tmp_path, 4, {}, rank=0)
    assert (tmp_path / "ckpt-4.tmp").is_dir() and not (tmp_path / "ckpt-4").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-2"
    remove_incomplete(tmp_path)
    assert not (tmp_path / "ckpt-4.tmp").exists()
    (tmp_path / "latest").write_text("ckpt-9\n")  # stale pointer (e.g. edited by hand): newest complete one wins
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-2"


def test_resume_with_another_masking_backend_is_a_clear_error():
    from engine.train.pretrain import check_mask_backend

    check_mask_backend({"mask_backend": "python"}, "python")
    check_mask_backend({}, "native")  # checkpoints written before the backend was recorded
    with pytest.raises(ValueError, match="'native' masking backend and this run uses 'python'"):
        check_mask_backend({"mask_backend": "native"}, "python")


@pytest.mark.slow
def test_bf16_stage0_export_takes_the_fp32_master_weights(tokenizer_dir, tmp_path):
    """Under bf16 ZeRO-0 the module holds a bf16 copy; the export must be the optimizer's fp32 masters."""
    import torch
    from safetensors.torch import load_file

    summary = run_in_process(tokenizer_dir, tmp_path, "--precision=bf16", "--zero_stage=0", "--max_steps=2",
                             "--heldout_images=0")
    exported = load_file(Path(summary["export_dir"]) / "model.safetensors")
    module = torch.load(tmp_path / "ckpt-2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    weight = exported["blocks.0.mlp.fc1.weight"]
    rounded = module["model.blocks.0.mlp.fc1.weight"]
    assert rounded.dtype == torch.bfloat16 and not torch.equal(weight, rounded.float())  # not the bf16 copy
    torch.testing.assert_close(weight.bfloat16(), rounded)  # but what it rounds to


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tokenizer_dir, process_reference_run,
                                                                             tmp_path):
    """A scheduler signals the whole process group (DataLoader workers included): the run still saves, exits 0, and
    the rerun reproduces the uninterrupted losses."""
    args = [sys.executable, str(RECIPE), *TINY, "--num_workers=2", f"--tokenizer={tokenizer_dir}",
            f"--output_dir={tmp_path}", "--save_every=0"]
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and max(losses(tmp_path), default=0) < 2:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers, as SLURM or `timeout` do
        proc.wait(timeout=120)
    log_text = log_path.read_text()
    assert proc.returncode == 0, log_text[-3000:]
    assert "stopped by SIGTERM" in log_text and "is killed by signal" not in log_text, log_text[-3000:]
    stopped_at = int(latest_checkpoint(tmp_path).name.split("-")[1])
    assert 2 <= stopped_at < 6
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_reproduces(tmp_path, process_reference_run)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_sigterm_to_a_two_rank_process_group_saves_and_resumes_exactly(tokenizer_dir, tmp_path):
    """`deepspeed --num_gpus 2` on CPU: SIGTERM to the launcher, both ranks and their workers. The ranks agree on one
    step, save one complete checkpoint, and a rerun reproduces the losses of an uninterrupted 2-rank run."""
    def command(output_dir: Path) -> list[str]:
        return ["deepspeed", "--num_gpus", "2", str(RECIPE), *TINY, "--max_steps=8", "--batch_size=8",
                "--num_workers=1", f"--tokenizer={tokenizer_dir}", f"--output_dir={output_dir}", "--save_every=0",
                "--probe=false"]

    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    subprocess.run(command(reference), cwd=ROOT, env=SUBPROCESS_ENV, check=True, capture_output=True, timeout=600)
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(stopped), cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV,
                                start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and max(losses(stopped), default=0) < 2:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=180)
        while time.time() < deadline + 180:  # the launcher exits at once; its launch.py waits for the ranks
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    log_text = log_path.read_text()
    assert log_text.count("SIGTERM received") == 2 and "Traceback" not in log_text, log_text[-3000:]
    stopped_at = int(latest_checkpoint(stopped).name.split("-")[1])
    assert 2 <= stopped_at < 8 and len(complete_checkpoints(stopped)) == 1
    subprocess.run(command(stopped), cwd=ROOT, env=SUBPROCESS_ENV, check=True, capture_output=True, timeout=600)
    assert losses(stopped) == losses(reference)
