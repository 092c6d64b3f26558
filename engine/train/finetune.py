"""BEiT image-classification fine-tuning under DeepSpeed: `run_finetuning(cfg)` is what the fine-tuning recipes call.

Official recipe pieces: layer-wise LR decay, soft-target cross-entropy with mixup/cutmix and label smoothing (plain
label-smoothed CE when mixing is off), optional EMA of the weights, top-1/top-5 evaluation every `eval_every` epochs
with the best model kept (`best/`, safetensors), linear-probe mode (frozen backbone). Weights given by `--finetune`
are loaded with `engine.checkpoint.load_checkpoint` (shared → per-layer rel-pos tables, table resize for 384 px,
head dropped on a class-count mismatch).
"""

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.train import checkpointing
from engine.train.flops import device_peak_flops, train_flops_per_image
from engine.train.loop import (
    StepHealth,
    StopSignal,
    apply_schedules,
    build_schedules,
    check_resume_compatible,
    deepspeed_grad_norm,
    global_grad_norm,
    initialize_engine,
    input_dtype,
    loss_scale,
    mean_over_ranks,
    resolve_grad_accum,
    resolve_lr,
    write_run_config,
)
from engine.train.metrics import METRICS_FILE, MetricsLogger, plot_curves, read_metrics, truncate_after
from engine.train.optim import param_groups
from engine.train.runtime import DistInfo, init_distributed, seed_everything
from engine.train.settings import FinetuneConfig

logger = logging.getLogger(__name__)

BEST_DIR = "best"
FINAL_DIR = "final"
EVAL_FILE = "eval.jsonl"
EMA_FILE = "ema.pt"
_HEAD_PARAMS = ("head.", "fc_norm.")


@dataclass
class FinetuneParts:
    model: nn.Module
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    num_classes: int


def build_parts(cfg: FinetuneConfig, dist_info: DistInfo) -> FinetuneParts:
    from engine.checkpoint import load_checkpoint
    from engine.data import (
        ClassificationDataset,
        EvalTransform,
        FinetuneTransform,
        build_dataset,
        build_loader,
        mean_std,
    )
    from engine.factory import create_model

    data, m, run = cfg.data, cfg.model, cfg.run
    if not data.data_path:
        raise ValueError("--data_path is required (an image folder with train/ and val/, an IDX directory or "
                         "embedded:fashion_mnist)")
    if data.finetune and not Path(data.finetune).exists():
        raise FileNotFoundError(f"--finetune={data.finetune} does not exist (pretrained weights to start from; "
                                "leave it empty to train from scratch)")
    train_base, eval_base = build_dataset(data.data_path, "train"), build_dataset(data.data_path, "test")
    num_classes = data.num_classes or len(train_base.classes)
    if num_classes < 2:
        raise ValueError(f"{data.data_path} has {num_classes} class(es): fine-tuning needs labelled data")
    depth = {"depth": m.depth} if m.depth is not None else {}
    model = create_model(m.model, img_size=m.input_size, num_classes=num_classes, drop_path_rate=m.drop_path,
                         attn_impl=m.attn_impl, grad_checkpointing=m.grad_checkpointing, **depth)
    if data.finetune:
        load_checkpoint(model, data.finetune)
    if cfg.extras.linear_probe:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(_HEAD_PARAMS))
    mean, std = mean_std(data.imagenet_mean_std)
    train_tf = FinetuneTransform(m.input_size, scale=(data.min_crop_scale, 1.0), color_jitter=data.color_jitter,
                                 auto_augment=data.auto_augment or None, re_prob=data.reprob, mean=mean, std=std)
    eval_tf = EvalTransform(m.input_size, data.crop_pct, mean=mean, std=std)
    train_loader = build_loader(ClassificationDataset(train_base, train_tf, seed=run.seed), run.batch_size,
                                dist_info.rank, dist_info.world_size, run.seed, num_workers=run.num_workers)
    eval_batch = data.eval_batch_size or int(1.5 * run.batch_size)
    eval_loader = build_loader(ClassificationDataset(eval_base, eval_tf, seed=run.seed), eval_batch, dist_info.rank,
                               dist_info.world_size, run.seed, num_workers=run.num_workers, drop_last=False,
                               shuffle=False)
    return FinetuneParts(model, train_loader, eval_loader, num_classes)


class ClassificationLoss(nn.Module):
    """`forward(images, soft_targets)` → (loss, logits): soft-target cross-entropy inside the engine's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        logits = self.model(images)  # [B, K]
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return loss, logits


def soft_targets(images, labels, step: int, cfg: FinetuneConfig, num_classes: int, rank: int):
    """Mixup/cutmix (seeded by (seed, step, rank), so a resumed run mixes identically) or smoothed one-hot."""
    from engine.data import Mixup, mixup_target

    data = cfg.data
    if data.mixup > 0 or data.cutmix > 0:
        mixer = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, label_smoothing=data.smoothing,
                      num_classes=num_classes)
        return mixer(images, labels, np.random.default_rng([cfg.run.seed, step, rank]))
    return images, mixup_target(labels, num_classes, 1.0, data.smoothing)


@torch.no_grad()
def evaluate(module: nn.Module, loader, device: torch.device, dtype: torch.dtype) -> dict:
    """Top-1/top-5 accuracy (%) and mean CE over this rank's shard, summed over ranks."""
    from engine.data import set_loader_epoch

    set_loader_epoch(loader, 0)
    was_training = module.training
    module.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for images, labels in loader:
        images, labels = images.to(device, dtype), labels.to(device)
        logits = module(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
        hits = top5 == labels[:, None]
        totals += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(),
                                F.cross_entropy(logits, labels, reduction="sum").item(), len(labels)],
                               dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    module.train(was_training)
    correct1, correct5, loss_sum, count = totals.tolist()
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count, "eval_loss": loss_sum / count}


class ModelEma:
    """fp32 exponential moving average of the weights (ZeRO stage <= 2, where every rank holds full weights)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema.dtype.is_floating_point:
                ema.mul_(self.decay).add_(current.float(), alpha=1 - self.decay)


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full model weights on every rank (collective under ZeRO-3), fp32, with the model's own names."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    return {k.removeprefix("model."): v.detach().float().cpu() for k, v in (state or {}).items()}


def _save_model(model: nn.Module, state: dict, out_dir: Path) -> None:
    from engine.checkpoint import save_pretrained

    clone = copy.deepcopy(model).float().cpu()
    clone.load_state_dict(state)
    save_pretrained(clone, out_dir)


def run_finetuning(cfg: FinetuneConfig) -> dict:
    """Trains (or resumes), evaluating every `eval_every` epochs; returns a summary (complete on rank 0)."""
    run, extras = cfg.run, cfg.extras
    dist_info = init_distributed(run.device)
    resolve_grad_accum(run, dist_info.world_size)
    output_dir = Path(run.output_dir)
    write_run_config(cfg, output_dir, dist_info)
    seed_everything(run.seed + dist_info.rank)
    parts = build_parts(cfg, dist_info)
    model = parts.model
    if extras.model_ema and run.zero_stage == 3:
        raise ValueError("model_ema needs zero_stage <= 2 (ZeRO-3 partitions the weights the EMA would average)")
    wrapper = ClassificationLoss(torch.compile(model) if cfg.model.compile else model)
    global_batch = run.batch_size * run.grad_accum * dist_info.world_size
    steps_per_epoch = len(parts.train_loader) // run.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch holds {len(parts.train_loader)} micro-batches per rank, fewer than grad_accum="
                         f"{run.grad_accum}: lower --batch_size or --grad_accum")
    total_steps = run.epochs * steps_per_epoch
    last_step = min(total_steps, run.max_steps) if run.max_steps > 0 else total_steps
    base_lr = resolve_lr(cfg.optim, global_batch)
    schedules = build_schedules(cfg.optim, base_lr, run.epochs, steps_per_epoch)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay, model.get_num_layers(),
                          cfg.optim.skip_rel_pos_tables_wd)
    engine, _ = initialize_engine(wrapper, groups, run, cfg.optim, dist_info, base_lr, output_dir)
    ema = ModelEma(model, extras.model_ema_decay) if extras.model_ema else None
    if dist_info.is_main:
        logger.info("global batch %d; lr %.3g (%s), layer decay %s; %d steps/epoch × %d epochs, stopping at %d",
                    global_batch, base_lr, "absolute --lr" if cfg.optim.lr is not None else
                    f"blr {cfg.optim.blr:g} × {global_batch} / 256", cfg.optim.layer_decay, steps_per_epoch,
                    run.epochs, last_step)
        checkpointing.remove_incomplete(output_dir)
    if dist.is_initialized():
        dist.barrier()
    start_step, best = 0, {"acc1": -1.0}
    ckpt = checkpointing.latest_checkpoint(output_dir) if run.resume else None
    if ckpt is not None:
        client = checkpointing.load_checkpoint(engine, ckpt, dist_info.rank)
        check_resume_compatible(client, dist_info.world_size, global_batch, steps_per_epoch)
        start_step, best = client["step"], client["best"]
        if dist_info.is_main:
            truncate_after(output_dir / EVAL_FILE, start_step)
        if ema is not None:
            ema.module.load_state_dict(torch.load(ckpt / EMA_FILE, weights_only=True))
        logger.info("resumed from %s at step %d", ckpt, start_step)
    return _train(cfg, engine, parts, ema, schedules, dist_info, start_step, last_step, steps_per_epoch,
                  global_batch, best)


def _train(cfg, engine, parts, ema, schedules, dist_info, start_step, last_step, steps_per_epoch, global_batch,
           best) -> dict:
    from engine.data import set_loader_epoch

    run = cfg.run
    output_dir = Path(run.output_dir)
    device, dtype = dist_info.device, input_dtype(run.precision)
    peak = device_peak_flops(device, run.precision)
    flops = train_flops_per_image(parts.model.config)
    metrics = MetricsLogger(output_dir, dist_info.is_main, last_step, start_step, run.progress)
    health = StepHealth(engine, run.precision, run.max_bad_steps)
    stop = StopSignal()
    step, stopped_by = start_step, None
    epoch = start_step // steps_per_epoch
    set_loader_epoch(parts.train_loader, epoch, (start_step % steps_per_epoch) * run.grad_accum)
    batches = iter(parts.train_loader)
    window_start, window_steps = time.perf_counter(), 0
    own_grad_norm = run.precision == "fp32" and run.zero_stage == 0  # DeepSpeed clips there without keeping the norm

    def client_state() -> dict:
        return {"step": step, "steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "best": best,
                "world_size": dist_info.world_size, "model_config": dict(parts.model.config)}

    def save() -> Path:
        files = {EMA_FILE: ema.module.state_dict()} if ema is not None else None
        return checkpointing.save_checkpoint(engine, output_dir, step, client_state(), dist_info.rank,
                                             run.keep_checkpoints, files)

    engine.train()
    try:
        while step < last_step:
            if step % steps_per_epoch == 0 and step != start_step:
                epoch = step // steps_per_epoch
                set_loader_epoch(parts.train_loader, epoch)
                batches = iter(parts.train_loader)
            lr, wd = apply_schedules(engine.optimizer, schedules, step)
            log_now = (step + 1) % run.log_every == 0 or step + 1 == last_step
            loss_sum, grad_norm = 0.0, None
            for micro in range(run.grad_accum):
                images, labels = next(batches)
                images, targets = soft_targets(images, labels, step, cfg, parts.num_classes, dist_info.rank)
                loss, _ = engine(images.to(device, dtype, non_blocking=True), targets.to(device))
                engine.backward(loss)
                if log_now and micro == run.grad_accum - 1 and own_grad_norm:
                    grad_norm = global_grad_norm(engine)
                engine.step()
                loss_sum += float(loss.detach())
            step += 1
            window_steps += 1
            health.update(step, loss_sum / run.grad_accum)
            if ema is not None:
                ema.update(engine.module.model)
            metrics.advance()
            if log_now:
                (loss_value,) = mean_over_ranks([loss_sum / run.grad_accum], device)
                img_per_s = global_batch * window_steps / (time.perf_counter() - window_start)
                metrics.log({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, "wd": wd,
                             "grad_norm": grad_norm if own_grad_norm else deepspeed_grad_norm(engine),
                             "loss_scale": loss_scale(engine),
                             "img_per_s": img_per_s,
                             "mfu": flops * img_per_s / dist_info.world_size / peak if peak else None})
                window_start, window_steps = time.perf_counter(), 0
            epoch_done = step % steps_per_epoch == 0 or step == last_step
            if epoch_done and ((step // steps_per_epoch) % cfg.extras.eval_every == 0 or step == last_step):
                best = _evaluate_and_keep_best(cfg, engine, parts, ema, dist_info, step, epoch, best, dtype)
            if stop.should_stop(device):
                stopped_by = stop.received or "signal on another rank"
                break
            if run.save_every > 0 and step % run.save_every == 0 and step < last_step:
                save()
        ckpt_dir = save()
    finally:
        metrics.close()
        stop.restore()
    summary = {"step": step, "stopped_by": stopped_by, "checkpoint": ckpt_dir, "best": best}
    if stopped_by:
        if dist_info.is_main:
            logger.warning("stopped by %s at step %d; checkpoint %s saved. Run the same command again to resume.",
                           stopped_by, step, ckpt_dir)
        return summary
    final_state = full_state_dict(engine)
    if dist_info.is_main:
        _save_model(parts.model, final_state, output_dir / FINAL_DIR)
        rows = read_metrics(output_dir / METRICS_FILE)
        summary.update(curves_png=plot_curves(rows, output_dir / "curves.png", panels=("loss", "lr")),
                       evals=read_metrics(output_dir / EVAL_FILE), final_dir=output_dir / FINAL_DIR,
                       best_dir=output_dir / BEST_DIR)
    return summary


def _evaluate_and_keep_best(cfg, engine, parts, ema, dist_info, step, epoch, best, dtype) -> dict:
    """Evaluates the model (and its EMA); when top-1 improves, rank 0 writes `best/` (safetensors + config)."""
    output_dir = Path(cfg.run.output_dir)
    result = {"step": step, "epoch": epoch, **evaluate(engine.module.model, parts.eval_loader, dist_info.device,
                                                       dtype)}
    if ema is not None:
        ema_result = evaluate(ema.module, parts.eval_loader, dist_info.device, torch.float32)
        result.update({f"ema_{k}": v for k, v in ema_result.items()})
    state = full_state_dict(engine) if result["acc1"] > best["acc1"] else None  # collective under ZeRO-3
    if dist_info.is_main:
        logger.info("eval at step %d (epoch %d): top-1 %.2f%% top-5 %.2f%% loss %.4f", step, epoch, result["acc1"],
                    result["acc5"], result["eval_loss"])
        with open(output_dir / EVAL_FILE, "a") as f:
            f.write(json.dumps(result) + "\n")
        if state is not None:
            _save_model(parts.model, state, output_dir / BEST_DIR)
    return {"acc1": result["acc1"], "acc5": result["acc5"], "step": step} if state is not None else best
