"""Runs on real clusters: every launcher forms one world, one live run per output_dir, a failed rank ends the job,
stop signals (SIGUSR1 as SLURM sends it) and stops during an evaluation. Launchers are played on this machine by
setting the variables `srun` and `mpirun` set (tools/local_cluster.sh runs the real ones), and by two `torchrun` and
two `deepspeed --no_ssh` "nodes" on localhost."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_ENV

from engine.config import ConfigError
from engine.train.checkpointing import complete_checkpoints, latest_checkpoint
from engine.train.metrics import read_metrics
from engine.train.run_lock import RunLock
from engine.train.runtime import detect_launch, first_host, rendezvous

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_demo.py"
TWO_RANK = ["--depth=2", "--zero_stage=1", "--batch_size=8", "--epochs=2", "--max_steps=12", "--save_every=2",
            "--log_every=1", "--num_workers=0", "--progress=false", "--seed=3", "--probe=false", "--heldout_images=0"]


# --- launcher detection (pure functions of the environment) ---

def slurm_env(rank: int, world: int = 2, **extra) -> dict:
    """What `srun -n <world>` sets for task `rank` on one node (no RANK)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0", "SLURM_NTASKS": str(world), "SLURM_STEP_NUM_TASKS": str(world),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost", **extra}


def openmpi_env(rank: int, world: int = 2) -> dict:
    """What OpenMPI 4's `mpirun -np <world>` sets on one node (observed with tools/local_cluster.sh)."""
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world),
            "OMPI_MCA_ess_base_jobid": "2140078081", "PMIX_NAMESPACE": "2140078081"}


@pytest.fixture
def no_scontrol(monkeypatch):
    """The host list is parsed here, not by `scontrol` (which may or may not be installed)."""
    monkeypatch.setattr("engine.train.runtime.shutil.which", lambda name: None)


def test_srun_tasks_form_one_world_with_a_shared_rendezvous(no_scontrol):
    launches = [detect_launch(slurm_env(rank, SLURM_JOB_NODELIST="gpu-[07-09]", SLURM_STEP_NODELIST="gpu-[07-09]"))
                for rank in (0, 1)]
    assert [(launch.launcher, launch.rank, launch.local_rank, launch.world_size) for launch in launches] == [
        ("slurm", 0, 0, 2), ("slurm", 1, 1, 2)]
    addresses = {rendezvous(launch) for launch in launches}
    (addr, port), = addresses
    assert addr == "gpu-07" and 15000 <= port < 25000


def test_a_plain_python_inside_an_sbatch_script_stays_one_rank():
    """The batch script has SLURM_PROCID=0 and SLURM_NTASKS=<allocation> but no job step (no SLURM_STEP_ID)."""
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect_launch(batch).launcher == "single" and detect_launch(batch).world_size == 1


def test_mpirun_wins_over_the_slurm_variables_it_inherits():
    """`mpirun` inside an allocation: every rank also sees the batch script's SLURM_PROCID=0."""
    env = {**openmpi_env(1), "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size) == ("openmpi", 1, 2)
    assert rendezvous(launch)[0] == "127.0.0.1"  # every rank on this node: no MASTER_ADDR needed
    assert rendezvous(launch) == rendezvous(detect_launch({**env, "OMPI_COMM_WORLD_RANK": "0"}))


def test_launcher_variables_and_their_errors(no_scontrol):
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                              "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"})
    assert (torchrun.launcher, torchrun.rank, torchrun.local_rank, rendezvous(torchrun)) == ("torchrun", 3, 1,
                                                                                           ("h", 29500))
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "2", "CROSS_RANK": "0"}).launcher == "deepspeed"
    assert detect_launch({}).launcher == "single" and rendezvous(detect_launch({}))[0] == "127.0.0.1"
    multi_node_mpi = detect_launch({**openmpi_env(0, world=16), "OMPI_COMM_WORLD_LOCAL_SIZE": "8"})
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set .* `mpirun -x MASTER_ADDR"):
        rendezvous(multi_node_mpi)
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        detect_launch(slurm_env(0, SLURM_PROCID="x"))
    assert [first_host(hosts) for hosts in ("gpu-[07-09,12],cpu1", "n1", "rack[2-3]-gpu", "a,b")] == [
        "gpu-07", "n1", "rack2-gpu", "a"]


def test_srun_with_pmi2_is_slurm_and_a_stray_rank_is_refused():
    """SLURM's PMI-2 plugin sets PMI_RANK/PMI_SIZE in every task (not hydra's MPI_LOCALRANKID); a RANK exported in
    the job script would make every task rank 0."""
    launch = detect_launch(slurm_env(1, PMI_RANK="1", PMI_SIZE="2"))
    assert (launch.launcher, launch.rank, launch.local_rank) == ("slurm", 1, 1)
    with pytest.raises(ConfigError, match="RANK=0 is exported but this srun task is SLURM_PROCID=1"):
        detect_launch(slurm_env(1, RANK="0", WORLD_SIZE="2"))
    assert detect_launch(slurm_env(1, RANK="5", WORLD_SIZE="8", TORCHELASTIC_RUN_ID="j")).launcher == "torchrun"
    # mpirun in an allocation, after the engine exported RANK from OMPI_COMM_WORLD_RANK (a second run in the process)
    assert detect_launch({**slurm_env(0), **openmpi_env(1), "RANK": "1", "WORLD_SIZE": "2"}).rank == 1


def test_a_killed_rewrite_puts_the_checkpoint_back_and_a_stage_change_is_refused(tmp_path):
    from engine.train.checkpointing import remove_incomplete
    from engine.train.loop import check_resume_compatible

    (tmp_path / "ckpt-4.old.tmp").mkdir()  # moved aside by an overwrite, the replacement never renamed in
    (tmp_path / "ckpt-4.tmp").mkdir()
    (tmp_path / "ckpt-2-universal").mkdir()
    (tmp_path / "latest").write_text("ckpt-4\n")
    remove_incomplete(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt-4", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-4"
    layout = {"world_size": 2, "global_batch": 16, "steps_per_epoch": 10, "zero_stage": 1}
    check_resume_compatible(layout, 4, 16, 10, 1)
    with pytest.raises(ConfigError, match="ZeRO stage 1; this run has 2. Resume with --zero_stage=1"):
        check_resume_compatible(layout, 2, 16, 10, 2)


# --- one live run per output_dir ---

def test_a_live_run_holds_its_output_dir_and_a_dead_one_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.train.run_lock import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire('slurm', 2); print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"in use by a live run \(pid {holder.pid} .* via slurm"):
        RunLock(tmp_path).acquire("single", 1)
    holder.kill()  # SIGKILL: the kernel drops its flock
    holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire("single", 1)
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire("single", 1)
    lock.release()
    RunLock(tmp_path).acquire("single", 1)


# --- the watchdog ---

@pytest.mark.slow
def test_the_watchdog_ends_a_stalled_rank_naming_the_silent_one(tmp_path):
    """Rank 0 of a 2-rank job whose rank 1 never beats: exit 3 within the timeout plus one interval, naming both."""
    script = (
        "import logging, time\n"
        "import torch.distributed as dist\n"
        "from engine.train.watchdog import Watchdog\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "server = dist.TCPStore('127.0.0.1', 0, 2, is_master=True, wait_for_workers=False)\n"
        "dog = Watchdog(2.0, 0, 2, '127.0.0.1', server.port, interval_s=0.5)\n"
        "dog.beat('step 7')\n"
        "time.sleep(30)\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=SUBPROCESS_ENV)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert time.time() - started < 20
    assert "rank 0: no progress for 2 s at step 7" in proc.stderr and "rank 1 (no heartbeat yet)" in proc.stderr


def test_a_stop_ends_an_evaluation_on_every_rank_at_the_same_batch():
    from engine.stop_signal import EvaluationStopped, StopSignal

    stop = StopSignal()
    try:
        seen = []
        with pytest.raises(EvaluationStopped):
            for item in stop.iterate(range(10), 10):
                seen.append(item)
                if item == 3:
                    os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [0, 1, 2, 3] and stop.received == "SIGUSR1"
    finally:
        stop.restore()


# --- launchers, for real processes ---

def losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir / "metrics.jsonl")}


def start_two(rank_env, output_dir: Path, *extra: str) -> list[subprocess.Popen]:
    """Two processes of the demo recipe, each with `rank_env(rank)` in its environment and no RANK."""
    output_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in SUBPROCESS_ENV.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
        log = open(output_dir.parent / f"{output_dir.name}.rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(RECIPE), *TWO_RANK, f"--output_dir={output_dir}", *extra],
                                      cwd=ROOT, stdout=log, stderr=log, env={**env, **rank_env(rank)}))
    return procs


def log_of(output_dir: Path, rank: int) -> str:
    return (output_dir.parent / f"{output_dir.name}.rank{rank}.log").read_text()


def assert_one_two_rank_world(output_dir: Path, launcher: str) -> None:
    ckpt = latest_checkpoint(output_dir)
    names = {path.name for path in ckpt.iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_state_rank0.pt", "rng_state_rank1.pt"} <= names, names
    assert f"launcher: {launcher}; 2 rank(s) on 1 node(s), 2 per node" in log_of(output_dir, 0)


@pytest.fixture(scope="module")
def slurm_reference(tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "run"
    for proc in start_two(slurm_env, out, f"--tokenizer={tokenizer_dir}"):
        assert proc.wait(timeout=600) == 0, log_of(out, 0)[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_srun_variables_without_rank_form_one_two_rank_world(slurm_reference):
    assert_one_two_rank_world(slurm_reference, "slurm")
    assert sorted(losses(slurm_reference)) == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.distributed
def test_mpirun_variables_form_the_same_world(tokenizer_dir, slurm_reference, tmp_path):
    out = tmp_path / "run"
    for proc in start_two(openmpi_env, out, f"--tokenizer={tokenizer_dir}", "--max_steps=2"):
        assert proc.wait(timeout=600) == 0, log_of(out, 0)[-3000:]
    assert_one_two_rank_world(out, "openmpi")
    assert losses(out) == {step: loss for step, loss in losses(slurm_reference).items() if step <= 2}


def run_two_nodes(commands: list[list[str]], tmp_path: Path) -> None:
    logs = [open(tmp_path / f"node{node}.log", "w") for node in range(2)]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV)
             for command, log in zip(commands, logs)]
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_torchrun_nodes_on_localhost(tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    args = [*TWO_RANK, "--max_steps=2", f"--tokenizer={tokenizer_dir}", f"--output_dir={out}"]
    run_two_nodes([["torchrun", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                    "--master_port=29531", str(RECIPE), *args] for node in range(2)], tmp_path)
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {
        path.name for path in latest_checkpoint(out).iterdir()}
    assert "launcher: torchrun; 2 rank(s)" in (tmp_path / "node0.log").read_text()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_deepspeed_no_ssh_nodes_on_localhost(tokenizer_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    args = [*TWO_RANK, "--max_steps=2", f"--tokenizer={tokenizer_dir}", f"--output_dir={out}"]
    run_two_nodes([["deepspeed", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node}",
                    "--master_addr=127.0.0.1", "--master_port=29532", str(RECIPE), *args] for node in range(2)],
                  tmp_path)
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {
        path.name for path in latest_checkpoint(out).iterdir()}
    assert "launcher: deepspeed; 2 rank(s)" in (tmp_path / "node0.log").read_text()


def wait_for_step(output_dir: Path, step: int, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while max(losses(output_dir), default=0) < step if (output_dir / "metrics.jsonl").exists() else True:
        assert time.time() < deadline and all(proc.poll() is None for proc in procs), log_of(output_dir, 0)[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_and_the_rerun_resumes_exactly(tokenizer_dir, slurm_reference, tmp_path):
    """SIGKILL of rank 1 (an OOM kill, a lost node) mid-run: rank 0 exits non-zero with one line within 60 s, every
    complete checkpoint has both ranks' shards, and the same command resumes to the uninterrupted run's losses."""
    out = tmp_path / "run"
    procs = start_two(slurm_env, out, f"--tokenizer={tokenizer_dir}")
    wait_for_step(out, 3, procs)
    procs[1].kill()
    killed_at = time.time()
    assert procs[0].wait(timeout=60) != 0
    assert time.time() - killed_at < 60
    rank0 = log_of(out, 0)
    assert "error: rank 0: a collective failed at" in rank0 and "the same command resumes from it" in rank0
    assert "Traceback" not in rank0.split("error: rank 0")[0][-2000:]
    for ckpt in complete_checkpoints(out):
        assert (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert max(losses(out)) < 12, "rank 1 finished before it was killed"
    for proc in start_two(slurm_env, out, f"--tokenizer={tokenizer_dir}"):  # the same command
        assert proc.wait(timeout=600) == 0, log_of(out, 0)[-3000:]
    assert losses(out) == losses(slurm_reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigusr1_to_a_two_rank_run_saves_and_exits(tokenizer_dir, tmp_path):
    """SLURM's `--signal=USR1@...` (or the sbatch script's forward): both ranks stop at one step, save, exit 0.
    While they run, a second run on the same output_dir is refused with one line."""
    out = tmp_path / "run"
    procs = start_two(slurm_env, out, f"--tokenizer={tokenizer_dir}", "--max_steps=600", "--save_every=0")
    wait_for_step(out, 2, procs)
    second = subprocess.run([sys.executable, str(RECIPE), *TWO_RANK, f"--tokenizer={tokenizer_dir}",
                             f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV,
                            timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir={out} is in use by a live run")
    for proc in procs:
        proc.send_signal(signal.SIGUSR1)
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    assert "stopped by SIGUSR1" in log_of(out, 0) and len(complete_checkpoints(out)) == 1
    assert 2 <= int(latest_checkpoint(out).name.split("-")[1]) < 600


def sigterm_during_evaluation(command: list[str], output_dir: Path, marker: str) -> float:
    """Starts `command`, sends SIGTERM once `marker` (the evaluation's first log line) is logged; the seconds from
    the signal to the exit."""
    log_path = output_dir.parent / f"{output_dir.name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env=SUBPROCESS_ENV)
        deadline = time.time() + 300
        while marker not in log_path.read_text():
            assert time.time() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        signalled = time.time()
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "during an evaluation (redone when resumed)" in text, text[-3000:]
    return time.time() - signalled


@pytest.mark.slow
def test_sigterm_during_a_classification_evaluation_saves_and_the_rerun_redoes_it(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "recipes/finetune_base.py", "--data_path=embedded:fashion_mnist",
               "--model=beit_mini_patch4_28", "--input_size=28", "--depth=2", "--batch_size=64", "--global_batch=none",
               "--epochs=1", "--steps=10", "--max_steps=4", "--eval_every=1", "--precision=fp32", "--zero_stage=0",
               "--num_workers=0", "--progress=false", "--eval_batch_size=10", "--warmup_steps=1",
               f"--output_dir={out}"]
    assert sigterm_during_evaluation(command, out, "evaluating after step 4") < 30
    assert latest_checkpoint(out).name == "ckpt-4" and not (out / "eval.jsonl").exists()
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "evaluating after step 4" in rerun.stderr
    assert [row["step"] for row in read_metrics(out / "eval.jsonl")] == [4]


@pytest.mark.slow
def test_sigterm_during_a_segmentation_evaluation_saves_and_the_rerun_redoes_it(tmp_path):
    from engine.data.demo_segmentation import build_demo_segmentation

    data = build_demo_segmentation(tmp_path / "data", num_train=8, num_val=6, image_size=56)  # ~2 s an image
    out = tmp_path / "run"
    command = [sys.executable, "recipes/segment_ade20k_base.py", f"--data_path={data}", "--num_classes=11",
               "--input_size=32", "--depth=2", "--batch_size=2", "--global_batch=none", "--max_steps=2",
               "--eval_every=2", "--precision=fp32", "--zero_stage=0", "--device=cpu", "--num_workers=0",
               "--img_scale=112,56", "--eval_stride=16", "--progress=false", "--decode_channels=16",
               "--aux_channels=8", f"--output_dir={out}"]
    assert sigterm_during_evaluation(command, out, "evaluating after step 2") < 30
    assert latest_checkpoint(out).name == "ckpt-2" and not (out / "eval.jsonl").exists()
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [row["step"] for row in read_metrics(out / "eval.jsonl")] == [2]


# --- resume on another number of ranks ---

STAGES = (0, 1, 2, 3)
MOVE = ["--depth=2", "--global_batch=16", "--batch_size=8", "--epochs=2", "--save_every=1", "--log_every=1",
        "--num_workers=0", "--progress=false", "--seed=3", "--probe=false", "--heldout_images=0", "--precision=fp32"]


def run_worker(tokenizer_dir: Path, ranks: int, actions: list[str], log: Path) -> None:
    """tests/world_size_worker.py in `ranks` processes (SLURM variables when 2)."""
    command = [sys.executable, str(ROOT / "tests" / "world_size_worker.py"), str(tokenizer_dir), *actions, *MOVE]
    envs = [{}] if ranks == 1 else [slurm_env(rank, SLURM_JOB_ID="5151") for rank in range(ranks)]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=open(f"{log}.{rank}", "w"), stderr=subprocess.STDOUT,
                              env={**SUBPROCESS_ENV, **env}) for rank, env in enumerate(envs)]
    for rank, proc in enumerate(procs):
        assert proc.wait(timeout=900) == 0, Path(f"{log}.{rank}").read_text()[-3000:]


def optimizer_state(ckpt: Path) -> dict:
    """Every parameter's fp32 weight, Adam moments and step: from the universal format for ZeRO 1-3 (converted here,
    whatever the number of ranks that wrote it), from the whole state in the model file for ZeRO-0."""
    import torch

    from engine.train.checkpointing import convert_to_universal, read_layout

    if read_layout(ckpt)["zero_stage"] == 0:
        saved = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)
        state = {f"{name}/fp32": value for name, value in saved["module"].items()}
        for index, values in saved["optimizer"]["state"].items():
            state.update({f"{index}/{key}": value for key, value in values.items()})
        return state
    state = {}
    for param in (convert_to_universal(ckpt) / "zero").iterdir():
        for item in param.iterdir() if param.is_dir() else ():
            value = torch.load(item, weights_only=False)  # {"param": tensor, "cat_dim": ...}, or the step tensor
            state[f"{param.name}/{item.stem}"] = value["param"] if isinstance(value, dict) else value
    return state


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_another_number_of_ranks_for_every_zero_stage(tokenizer_dir, tmp_path):
    """For each ZeRO stage, a checkpoint of step 2 written by 2 ranks is loaded by 1 rank (grad_accum 2, the same
    global batch) and one written by 1 rank by 2: ending at step 2, each rewrites it in its own layout, with fp32
    weights, Adam moments and step equal to the original's; continuing, its step-3 loss equals the unmoved run's
    (the same samples; micro-batch means over other splits, hence the tolerance). Another global batch is refused."""
    import torch

    def per_stage(*templates: str) -> list[str]:
        return [template.format(d=tmp_path, s=stage) for template in templates for stage in STAGES]

    run_worker(tokenizer_dir, 1, per_stage("run {d}/src1_{s} 2 {s}", "copy {d}/src1_{s} {d}/ref1_{s}",
                                           "copy {d}/src1_{s} {d}/mov12_{s}", "run {d}/ref1_{s} 3 {s}"),
               tmp_path / "one")
    run_worker(tokenizer_dir, 2, per_stage("run {d}/src2_{s} 2 {s}", "copy {d}/src2_{s} {d}/ref2_{s}",
                                           "copy {d}/src2_{s} {d}/mov21_{s}", "run {d}/ref2_{s} 3 {s}",
                                           "run {d}/mov12_{s} 2 {s}", "run {d}/mov12_{s} 3 {s}"), tmp_path / "two")
    run_worker(tokenizer_dir, 1, per_stage("run {d}/mov21_{s} 2 {s}", "run {d}/mov21_{s} 3 {s}"), tmp_path / "back")
    assert not list(tmp_path.glob("mov*/*-universal"))  # deleted once loaded
    for stage in STAGES:
        for source, moved, ranks in ((f"src1_{stage}", f"mov12_{stage}", 2), (f"src2_{stage}", f"mov21_{stage}", 1)):
            ckpt = tmp_path / moved / "ckpt-2"
            assert len(list(ckpt.glob("rng_state_rank*.pt"))) == ranks  # rewritten by the new world
            expected, got = optimizer_state(tmp_path / source / "ckpt-2"), optimizer_state(ckpt)
            assert expected.keys() == got.keys() and len(expected) > 10
            for key in expected:
                assert torch.equal(got[key], expected[key]), f"{moved} {key}"
            reference = f"ref{ranks % 2 + 1}_{stage}"  # the unmoved continuation of the same source
            assert losses(tmp_path / moved)[3] == pytest.approx(losses(tmp_path / reference)[3], rel=1e-5)
    other_batch = [arg if not arg.startswith("--global_batch") else "--global_batch=32" for arg in MOVE]
    refused = subprocess.run([sys.executable, str(RECIPE), *other_batch, f"--tokenizer={tokenizer_dir}",
                              f"--output_dir={tmp_path / 'ref1_1'}", "--zero_stage=1"],
                             cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "error: the checkpoint was written with global batch=16" in refused.stderr
    assert "Resume with --global_batch=16" in refused.stderr
