"""The training loop of every task (engine/train/task.py), as short and linear as MAE's `engine_pretrain.py`.

    summary = train(cfg, MaskedImageModeling)   # or ImageClassification, LinearProbe, ...

One optimizer step = `grad_accum` micro-batches through `train_step`. The loop owns the process group, DeepSpeed,
resume, LR/WD schedules, stop signals, logging and checkpoints; the task owns model, data, loss and evaluation.
Host syncs happen only at log, evaluation and save steps: per-step statistics and the loss health stay on the device
(tests/test_train_syncs.py counts them).
"""

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist

from engine.config import ConfigError, RunFailed, config_to_dict, save_config
from engine.stop_signal import EvaluationStopped, StopSignal
from engine.train import checkpointing
from engine.train.deepspeed_config import bucket_elements, build_deepspeed_config
from engine.train.flops import device_peak_flops
from engine.train.guards import StepHealth, loss_scale
from engine.train.metrics import METRICS_FILE, MetricsLogger, plot_curves, read_metrics
from engine.train.optim import build_optimizer
from engine.train.reporters import open_reporters
from engine.train.resolve import resolve_config
from engine.train.run_lock import RunLock
from engine.train.runtime import DistInfo, init_distributed, seed_everything, unmap_large_frees
from engine.train.schedules import Schedules, apply_schedules, build_schedules
from engine.train.settings import OptimSettings, RunSettings
from engine.train.watchdog import Watchdog

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"
CURVES_PNG = "curves.png"
COLLECTIVE_GRACE_S = 60  # the collectives' own timeout: this long after the watchdog's (which names the rank first)


def resolve_lr(optim: OptimSettings, global_batch: int) -> float:
    """`optim.lr` when given (absolute, as the paper's commands), else `blr × global_batch / 256`."""
    return optim.lr if optim.lr is not None else optim.blr * global_batch / 256


def input_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def initialize_engine(module: torch.nn.Module, groups: list[dict], run: RunSettings, optim: OptimSettings,
                      dist_info: DistInfo, base_lr: float, output_dir: Path, load_universal: bool = False):
    """DeepSpeed engine around `module` with our AdamW; writes the DeepSpeed JSON next to the run. `load_universal`:
    the checkpoint to resume from is in DeepSpeed's universal format (written by another number of ranks)."""
    ds_config = build_deepspeed_config(run, optim, dist_info.world_size, bucket_elements(module))
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    if dist_info.is_main:
        (output_dir / DEEPSPEED_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")
    optimizer = build_optimizer(groups, base_lr, dist_info.device.type, offload=run.offload)
    # DeepSpeed sets the device from LOCAL_RANK unless told: one visible GPU per task (srun --gpus-per-task) is cuda:0
    args = SimpleNamespace(device_rank=dist_info.device.index) if dist_info.device.type == "cuda" else None
    engine, _, _, _ = deepspeed.initialize(args=args, model=module, optimizer=optimizer, config=ds_config)
    return engine


def check_resume_compatible(saved: dict, world_size: int, global_batch: int, steps_per_epoch: int,
                            zero_stage: int) -> None:
    """A checkpoint continues on any number of ranks with the same global batch (and so the same epoch length) and
    ZeRO stage; checkpoints without `layout.json` (older ones) only with the same number of ranks."""
    if saved.get("zero_stage", zero_stage) != zero_stage:
        raise ConfigError(f"the checkpoint was written with ZeRO stage {saved['zero_stage']}; this run has "
                          f"{zero_stage}. Resume with --zero_stage={saved['zero_stage']}, or start a new --output_dir")
    if saved["global_batch"] != global_batch or saved["steps_per_epoch"] != steps_per_epoch:
        raise ConfigError(
            f"the checkpoint was written with global batch={saved['global_batch']} (steps_per_epoch="
            f"{saved['steps_per_epoch']}); this run has {global_batch} ({steps_per_epoch}). Resume with "
            f"--global_batch={saved['global_batch']} (grad_accum follows from it, --batch_size and the ranks), or "
            "start a new --output_dir (the fp32 weights can be exported with `python -m engine.train.export`)")
    if saved["world_size"] != world_size and "zero_stage" not in saved:
        raise ConfigError(
            f"the checkpoint was written by {saved['world_size']} ranks before checkpoints recorded their layout; "
            f"this run has {world_size}. Resume it with {saved['world_size']} ranks")


@dataclass(frozen=True)
class Plan:
    """The run's shape in optimizer steps, fixed before its first step (epochs are counted in optimizer steps)."""

    global_batch: int  # images per optimizer step over all ranks
    steps_per_epoch: int
    total_steps: int  # the schedules' length
    last_step: int  # where this run stops (`max_steps`, else `total_steps`)

    def epoch(self, steps_done: int) -> int:
        """The epoch of the next step after `steps_done` steps (where the loader is)."""
        return steps_done // self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        """The epoch that step `step` (1-based, as logged) belongs to."""
        return (step - 1) // self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        """Whether step `step` (1-based) ends an epoch, or the run."""
        return step % self.steps_per_epoch == 0 or step == self.last_step


def own_grad_norm(engine) -> torch.Tensor | None:
    """Global norm of the whole gradients before the update, on the device: for fp32 ZeRO-0, where DeepSpeed clips
    without keeping the norm."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads \
        else None


def train_step(engine, task, batches, grad_accum: int, step: int, keep_norm: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step of `grad_accum` micro-batches → (stats summed over them, loss summed, the gradients'
    global norm before the update when `keep_norm`, else None), all on the device."""
    stats_sum, loss_sum, norm = None, None, None
    for micro in range(grad_accum):
        loss, stats = engine(*task.inputs(next(batches), step))
        engine.backward(loss)
        if keep_norm and micro == grad_accum - 1:  # gradients are whole until DeepSpeed's update
            norm = own_grad_norm(engine)
        engine.step()
        stats_sum = stats.detach() if stats_sum is None else stats_sum + stats.detach()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return stats_sum, loss_sum, norm


def reduce_stats(stats: torch.Tensor, names: tuple[str, ...]) -> tuple[dict, float]:
    """Per-rank stat sums → (weighted means over all ranks by name, total weight). Host sync: logging steps only."""
    stats = stats.double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    values = stats.tolist()
    weight = values[-1]
    return {name: value / weight if weight else 0.0 for name, value in zip(names[:-1], values[:-1])}, weight


def _epoch_batches(loader, epoch: int, start_batch: int = 0):
    from engine.data.loader import set_loader_epoch

    set_loader_epoch(loader, epoch, start_batch)
    return iter(loader)


def _from_rank0(value, dist_info: DistInfo):
    """Rank 0's `value` on every rank: what rank 0 alone decided or found (a choice, an error message)."""
    if dist_info.world_size > 1:
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        value = shared[0]
    return value


def _resume_point(output_dir: Path, resume: bool, dist_info: DistInfo) -> Path | None:
    """Rank 0 clears what a killed save or conversion left and picks the checkpoint to resume from; every rank gets
    its choice (ranks reading a network filesystem on their own could disagree)."""
    choice = None
    if dist_info.is_main:
        checkpointing.remove_incomplete(output_dir)
        choice = checkpointing.latest_checkpoint(output_dir) if resume else None
    return _from_rank0(choice, dist_info)


def _convert_on_rank0(ckpt: Path, layout: dict, dist_info: DistInfo) -> None:
    """Rank 0 converts `ckpt` to the universal format while the others wait; a failure ends every rank with one
    line (rank 0 logs the converter's output first)."""
    error = None
    if dist_info.is_main:
        logger.info("%s was written by %d rank(s); this run has %d", ckpt, layout["world_size"], dist_info.world_size)
        try:
            checkpointing.convert_to_universal(ckpt)
        except RuntimeError as err:
            logger.error("%s", err)
            error = f"converting {ckpt} for {dist_info.world_size} rank(s) failed (the converter's output is above)"
    error = _from_rank0(error, dist_info)
    if error is not None:
        raise RunFailed(error)


def _lost_peer(err: Exception) -> bool:
    """Whether a collective failed because another rank went away (gloo and NCCL raise RuntimeErrors for it)."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo",
                                  "NCCL", "Timed out"))


def _first_line(err: Exception) -> str:
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return line.split("] ", 1)[-1][:200]  # without gloo's source path


def lock_output_dir(output_dir: Path, dist_info: DistInfo) -> RunLock:
    """Rank 0 takes `output_dir`'s run lock; every rank raises the same ConfigError when another live run has it."""
    lock, error = RunLock(output_dir), None
    if dist_info.is_main:
        try:
            lock.acquire(dist_info.launcher, dist_info.world_size)
        except ConfigError as err:
            error = str(err)
        except OSError as err:  # a read-only or full filesystem: every rank ends with the same line
            error = f"--output_dir={output_dir}: cannot write its run lock ({err})"
    error = _from_rank0(error, dist_info)
    if error is not None:
        raise ConfigError(error)
    return lock


def _write_run_config(cfg, output_dir: Path, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / CONFIG_FILE)
    if dist.is_initialized():
        dist.barrier()


def train(cfg, task_class) -> dict:
    """Builds `task_class(cfg, dist_info)`, trains (or resumes) until `epochs` or `max_steps`; returns a summary
    (rank 0 has the full one). A stop signal saves a checkpoint and returns with `stopped_by` set. The config is
    checked first (`cfg.validate()`: a recipe has done so when it parsed its command line; a caller from Python gets
    the same ConfigError), then resolved once (engine/train/resolve.py)."""
    cfg.validate()
    run = cfg.run
    dist_info = init_distributed(run.device, run.dist_timeout_s + COLLECTIVE_GRACE_S)
    if dist_info.device.type == "cpu" and unmap_large_frees() and dist_info.is_main:
        logger.info("CPU run: blocks of 4 MiB or more go back to the system when freed (glibc mmap threshold)")
    output_dir = Path(run.output_dir)
    lock = lock_output_dir(output_dir, dist_info)
    try:
        resolve_config(cfg, dist_info.world_size)  # the demo may train its tokenizer here: under the run's lock
    except BaseException:
        lock.release()
        raise
    watchdog = Watchdog(run.dist_timeout_s, dist_info.rank, dist_info.world_size, os.environ["MASTER_ADDR"],
                        int(os.environ["MASTER_PORT"])) if dist_info.world_size > 1 else None
    stop = StopSignal(watchdog)  # from here on a stop signal (SLURM's USR1 during start-up too) saves after a step
    try:
        return _train(cfg, task_class, dist_info, stop)
    except (dist.DistError, RuntimeError) as err:
        if watchdog is None or not _lost_peer(err):
            raise
        newest = checkpointing.latest_checkpoint(output_dir)
        raise RunFailed(f"rank {dist_info.rank}: a collective failed at {watchdog.where} ({_first_line(err)}): another "
                        f"rank has died or hung, and its log says why. The newest complete checkpoint is "
                        f"{newest or 'none yet'}; the same command resumes from it") from None
    finally:
        stop.restore()
        if watchdog is not None:
            watchdog.close()
        lock.release()


def _plan(run: RunSettings, micro_batches_per_epoch: int, world_size: int) -> Plan:
    steps_per_epoch = micro_batches_per_epoch // run.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"one epoch holds {micro_batches_per_epoch} micro-batches of {run.batch_size} per rank, "
                          f"fewer than grad_accum={run.grad_accum}: lower --batch_size, --grad_accum or --global_batch")
    total_steps = run.steps if run.steps > 0 else run.epochs * steps_per_epoch
    last_step = min(total_steps, run.max_steps) if run.max_steps > 0 else total_steps
    return Plan(run.batch_size * run.grad_accum * world_size, steps_per_epoch, total_steps, last_step)


def _train(cfg, task_class, dist_info: DistInfo, stop: StopSignal) -> dict:
    run, output_dir = cfg.run, Path(cfg.run.output_dir)
    _write_run_config(cfg, output_dir, dist_info)
    seed_everything(run.seed + dist_info.rank)
    task = task_class(cfg, dist_info)
    plan = _plan(run, len(task.loader), dist_info.world_size)
    base_lr = resolve_lr(cfg.optim, plan.global_batch)
    schedules = build_schedules(cfg.optim, base_lr, plan.total_steps, plan.steps_per_epoch)
    groups = task.param_groups()
    ckpt = _resume_point(output_dir, run.resume, dist_info)
    layout = checkpointing.read_layout(ckpt) if ckpt is not None else None
    if layout is not None:  # refused before any conversion; older checkpoints are checked once loaded
        check_resume_compatible(layout, dist_info.world_size, plan.global_batch, plan.steps_per_epoch, run.zero_stage)
    moved = layout is not None and layout["world_size"] != dist_info.world_size  # another number of ranks wrote it
    universal = moved and run.zero_stage >= 1  # ZeRO-0 checkpoints hold the whole state and load on any world size
    if universal:
        _convert_on_rank0(ckpt, layout, dist_info)
    if dist_info.is_main:
        logger.info("initialising DeepSpeed (ZeRO stage %d, %s)", run.zero_stage, run.precision)
    engine = initialize_engine(task.module, groups, run, cfg.optim, dist_info, base_lr, output_dir, universal)
    if dist_info.is_main:
        logger.info("global batch %d = %d per device × %d accumulation × %d ranks; lr %.3g (%s)%s; %d steps/epoch, "
                    "%d steps in the schedule, stopping at step %d", plan.global_batch, run.batch_size,
                    run.grad_accum, dist_info.world_size, base_lr, "absolute --lr" if cfg.optim.lr is not None else
                    f"blr {cfg.optim.blr:g} × {plan.global_batch} / 256",
                    f", layer decay {cfg.optim.layer_decay}" if cfg.optim.layer_decay is not None else "",
                    plan.steps_per_epoch, plan.total_steps, plan.last_step)
    if dist.is_initialized():
        dist.barrier()

    start_step, redo_evaluation = 0, False
    if ckpt is not None:
        client = checkpointing.load_checkpoint(engine, ckpt, dist_info.rank, universal, run.seed)
        check_resume_compatible(layout or client, dist_info.world_size, plan.global_batch, plan.steps_per_epoch,
                                run.zero_stage)
        task.resume(client, ckpt)
        start_step, redo_evaluation = client["step"], bool(client.get("pending_evaluation"))
        logger.info("resumed from %s at step %d%s", ckpt, start_step,
                    f" (written by {layout['world_size']} rank(s))" if moved else "")
        if universal:
            dist.barrier()  # every rank has read it
            if dist_info.is_main:
                shutil.rmtree(ckpt.with_name(ckpt.name + checkpointing.UNIVERSAL_SUFFIX), ignore_errors=True)

    # what every checkpoint records next to the step: the layout a resume checks, the architecture, and the
    # parameter names of the optimizer groups (the export reads ZeRO-0's fp32 masters by them)
    saved_state = {"steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
                   "world_size": dist_info.world_size, "model_config": dict(task.model.config),
                   "preprocessing": task.preprocessing,
                   "master_param_names": [group["param_names"] for group in groups]}
    # a run resumed on another number of ranks that ends where it resumed rewrites that checkpoint in its own layout
    summary = _loop(cfg, task, engine, schedules, plan, saved_state, start_step, stop, redo_evaluation,
                    rewrite_start=moved)
    if summary["stopped_by"] is None:
        if stop.watchdog is not None:
            stop.watchdog.beat("the end of the run (final weights)")
        summary.update(task.finish(engine, summary["checkpoint"]))
    if summary["stopped_by"] is None and dist_info.is_main:
        rows = read_metrics(output_dir / METRICS_FILE)
        summary.update(curves_png=plot_curves(rows, output_dir / CURVES_PNG, panels=task.curve_panels),
                       metrics_file=output_dir / METRICS_FILE, first=rows[0] if rows else {},
                       last=rows[-1] if rows else {})
    return summary


def _loop(cfg, task, engine, schedules: Schedules, plan: Plan, saved_state: dict, start_step: int, stop: StopSignal,
          redo_evaluation: bool, rewrite_start: bool = False) -> dict:
    """Steps from `start_step` to `plan.last_step` (first redoing an evaluation that a stop interrupted before the
    checkpoint of `start_step` was written) → {"step", "stopped_by", "checkpoint"}. A run that ends at `start_step`
    rewrites its checkpoint when `rewrite_start` or after a redone evaluation."""
    run, dist_info = cfg.run, task.dist_info
    output_dir, device, last_step = Path(run.output_dir), dist_info.device, plan.last_step
    peak = device_peak_flops(device, run.precision)
    keep_norm = run.precision == "fp32" and run.zero_stage == 0  # DeepSpeed clips there without keeping the norm
    reporters = open_reporters(run.report_to, output_dir, config_to_dict(cfg), start_step) if dist_info.is_main else []
    metrics = MetricsLogger(output_dir, dist_info.is_main, last_step, start_step, run.progress, reporters)
    health = StepHealth(engine, run.precision, run.max_bad_steps, device)
    evaluation_pending = False  # a stop interrupted the evaluation of the saved step: it is redone when resumed

    def beat(where: str) -> None:
        if stop.watchdog is not None:
            stop.watchdog.beat(where)

    def save(step: int, overwrite: bool = False) -> Path:
        beat(f"saving the checkpoint of step {step}")
        client = {**saved_state, "step": step, "pending_evaluation": evaluation_pending, **task.client_state()}
        return checkpointing.save_checkpoint(engine, output_dir, step, client, dist_info.rank, run.keep_checkpoints,
                                             task.checkpoint_files(), overwrite=overwrite)

    def evaluate(step: int) -> bool:
        """The task's evaluation of `step` (collective); False, and the evaluation pending, when a stop ended it."""
        nonlocal evaluation_pending
        beat(f"the evaluation after step {step}")
        try:
            row = task.evaluate(engine, step, plan, stop)
        except EvaluationStopped:
            evaluation_pending = True
            return False
        if row is not None:
            metrics.log_eval(row)
        return True

    step, stopped_by, ckpt_dir = start_step, None, None
    batches = _epoch_batches(task.loader, plan.epoch(start_step), (start_step % plan.steps_per_epoch) * run.grad_accum)
    window_start, window_steps = time.perf_counter(), 0
    if dist_info.is_main and run.num_workers > 0:
        logger.info("starting %d DataLoader worker(s) per rank: the first step waits for them", run.num_workers)
    engine.train()
    try:
        if redo_evaluation and not evaluate(step):
            stopped_by = stop.received or "signal on another rank"
        while stopped_by is None and step < last_step:
            beat(f"step {step + 1}")
            if step % plan.steps_per_epoch == 0 and step != start_step:
                batches = _epoch_batches(task.loader, plan.epoch(step))
            lr, wd = apply_schedules(engine.optimizer, schedules, step)
            log_now = ((step + 1) % run.log_every == 0 or step + 1 == last_step or step == start_step
                       or task.log_due(step + 1, plan))
            stats, loss_sum, norm = train_step(engine, task, batches, run.grad_accum, step, keep_norm and log_now)
            step += 1
            window_steps += 1
            health.count_step(loss_sum)
            task.after_step(engine, step)
            metrics.advance()
            save_due = run.save_every > 0 and step % run.save_every == 0 and step < last_step
            if log_now or save_due:
                health.check(step)
            if log_now:
                values, weight = reduce_stats(stats, task.stat_names)  # syncs: the window's work is done on the device
                img_per_s = plan.global_batch * window_steps / (time.perf_counter() - window_start)
                flops = task.flops_per_image(weight / plan.global_batch)
                norm = engine.get_global_grad_norm() if norm is None else norm
                row = {"step": step, "epoch": plan.epoch_of(step), **values, "lr": lr, "wd": wd,
                       "grad_norm": None if norm is None else float(norm), "loss_scale": loss_scale(engine),
                       "img_per_s": img_per_s,
                       "mfu": flops * img_per_s / dist_info.world_size / peak if peak else None,
                       "skipped_steps": health.total_skipped, **task.log_extras(engine, step, plan)}
                metrics.log(row)
                window_start, window_steps = time.perf_counter(), 0
            if (task.evaluation_due(step, plan) and not evaluate(step)) or stop.poll():
                stopped_by = stop.received or "signal on another rank"
                break
            if save_due:
                save(step)
        health.check(step)
        # a redone evaluation of the resumed step clears its mark in that step's checkpoint
        ckpt_dir = save(step, overwrite=step == start_step and (rewrite_start or redo_evaluation))
    finally:
        metrics.close()
    if stopped_by and dist_info.is_main:
        during = " during an evaluation (redone when resumed)" if evaluation_pending else ""
        logger.warning("stopped by %s at step %d%s; checkpoint %s saved. Run the same command again to resume.",
                       stopped_by, step, during, ckpt_dir)
    return {"step": step, "stopped_by": stopped_by, "checkpoint": ckpt_dir}
