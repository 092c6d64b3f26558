"""Pieces shared by the pretraining and fine-tuning loops: DeepSpeed engine setup, per-step schedules, resume
checks, stop signals and the health of a step (non-finite losses, fp16 overflow skips)."""

import json
import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from engine.config import save_config
from engine.train.deepspeed_config import build_deepspeed_config
from engine.train.optim import build_optimizer
from engine.train.runtime import DistInfo
from engine.train.schedules import cosine_scheduler
from engine.train.settings import OptimSettings, RunSettings

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"


def resolve_lr(optim: OptimSettings, global_batch: int) -> float:
    """`optim.lr` when given (absolute, as the paper's commands), else `blr × global_batch / 256`."""
    return optim.lr if optim.lr is not None else optim.blr * global_batch / 256


def resolve_grad_accum(run: RunSettings, world_size: int) -> None:
    """Derives `run.grad_accum` from `run.global_batch` (the paper's batch on any number of devices)."""
    if run.global_batch is None:
        return
    per_step = run.batch_size * world_size
    if run.global_batch % per_step:
        raise ValueError(f"global_batch={run.global_batch} is not a multiple of batch_size × ranks = "
                         f"{run.batch_size} × {world_size}; change --batch_size or --global_batch")
    run.grad_accum = run.global_batch // per_step


@dataclass
class Schedules:
    lr: np.ndarray  # [total_steps]
    wd: np.ndarray  # [total_steps]


def build_schedules(optim: OptimSettings, base_lr: float, epochs: int, steps_per_epoch: int) -> Schedules:
    wd_end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    return Schedules(
        lr=cosine_scheduler(base_lr, optim.min_lr, epochs, steps_per_epoch, optim.warmup_epochs,
                            warmup_steps=optim.warmup_steps),
        wd=cosine_scheduler(optim.weight_decay, wd_end, epochs, steps_per_epoch),
    )


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int) -> tuple[float, float]:
    """Writes this step's LR (× each group's lr_scale) and WD (groups with weight decay only); returns (lr, wd)."""
    lr, wd = float(schedules.lr[step]), float(schedules.wd[step])
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group["weight_decay"] > 0:
            group["weight_decay"] = wd
    return lr, wd


def initialize_engine(module: torch.nn.Module, groups: list[dict], run: RunSettings, optim: OptimSettings,
                      dist_info: DistInfo, base_lr: float, output_dir: Path):
    """DeepSpeed engine around `module` with our AdamW; writes the DeepSpeed JSON next to the run."""
    if run.precision == "fp16" and dist_info.device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16): use "
                         "--precision=bf16 or --precision=fp32")
    ds_config = build_deepspeed_config(run, optim, dist_info.world_size)
    if dist_info.is_main:
        (output_dir / DEEPSPEED_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n")
    optimizer = build_optimizer(groups, base_lr, dist_info.device.type, offload=run.offload)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, ds_config


def write_run_config(cfg, output_dir: Path, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / CONFIG_FILE)
    if dist.is_initialized():
        dist.barrier()


def input_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_resume_compatible(client: dict, world_size: int, global_batch: int, steps_per_epoch: int) -> None:
    """A checkpoint continues exactly only with the same world size and batch layout."""
    saved = (client["world_size"], client["global_batch"], client["steps_per_epoch"])
    if saved != (world_size, global_batch, steps_per_epoch):
        raise ValueError(
            f"the checkpoint was written with world_size={saved[0]}, global batch={saved[1]}, "
            f"steps_per_epoch={saved[2]}; this run has {world_size}, {global_batch}, {steps_per_epoch}. Resume with "
            "the same number of ranks and --batch_size/--grad_accum, or start a new --output_dir (the fp32 weights "
            "can be exported with `python -m engine.train.export`)")


def global_grad_norm(engine) -> float | None:
    """Pre-clipping global grad norm of the last step (DeepSpeed's value; our own for fp32 ZeRO-0, where
    DeepSpeed clips without keeping the norm). Call after `engine.backward` at a boundary, before `engine.step`."""
    params = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in params])))


def deepspeed_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Averages logged scalars over the data-parallel ranks (each rank saw its own shard of the batch)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def loss_scale(engine) -> float | None:
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    scale = getattr(optimizer, "cur_scale", None)
    return float(scale if scale is not None else optimizer.loss_scale)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint at the end of this step, then exiting", self.received)

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (one all-reduce when there are several ranks)."""
        flag = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(tensor)
            flag = bool(tensor.item() > 0)
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepHealth:
    """Counts consecutive bad steps: a non-finite loss, or an fp16 step DeepSpeed skipped on gradient overflow.

    Under fp16 dynamic loss scaling a bad step is skipped by DeepSpeed (the scale drops) and training goes on; under
    bf16/fp32 nothing rescues a non-finite loss, so training stops at once. Either way `max_bad_steps` consecutive bad
    steps stop the run with an explanation.
    """

    def __init__(self, engine, precision: str, max_bad_steps: int):
        self.engine = engine
        self.precision = precision
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total_skipped = 0
        self._skipped_before = engine.skipped_steps

    def update(self, step: int, loss: float) -> None:
        skipped = self.engine.skipped_steps - self._skipped_before
        self._skipped_before = self.engine.skipped_steps
        bad = skipped > 0 or not math.isfinite(loss)
        self.total_skipped += skipped
        self.consecutive = self.consecutive + 1 if bad else 0
        if not math.isfinite(loss) and self.precision != "fp16":
            raise FloatingPointError(
                f"loss is {loss} at step {step} under {self.precision}: lower --lr or --clip_grad, check the data, "
                "or resume from the last checkpoint")
        if self.consecutive >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.consecutive} consecutive non-finite/overflowed steps up to step {step} (loss scale "
                f"{loss_scale(self.engine)}): fp16 cannot represent this run's gradients; use --precision=bf16, a "
                "lower --lr, or a smaller --clip_grad")
