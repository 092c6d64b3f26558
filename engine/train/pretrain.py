"""BEiT masked-image-modelling pretraining under DeepSpeed: `run_pretraining(cfg)` is what the recipes call.

One optimizer step = `grad_accum` micro-batches. Per micro-batch: visual-token labels from the frozen tokenizer on the
tokenizer view (no grad), masked forward of the patch view, masked LM loss (`model.forward_loss`).
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine.train import checkpointing
from engine.train.export import export_checkpoint
from engine.train.flops import device_peak_flops, train_flops_per_image
from engine.train.heldout import HeldOutBatch, build_heldout_batch
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
from engine.train.metrics import METRICS_FILE, MetricsLogger, plot_curves, read_metrics
from engine.train.optim import param_groups
from engine.train.runtime import DistInfo, init_distributed, seed_everything
from engine.train.settings import PretrainConfig

logger = logging.getLogger(__name__)

EXPORT_DIR = "pretrained"
CURVES_PNG = "curves.png"


class MaskedImageModelingLoss(nn.Module):
    """Makes `forward_loss` the module's `forward`, so `engine(...)` runs it with DeepSpeed's hooks.

    `max_masked_per_image` is the masking generator's target, which it never exceeds: the fused loss then runs its
    LM-head GEMMs on B × that many rows instead of every patch.
    """

    def __init__(self, model: nn.Module, max_masked_per_image: int):
        super().__init__()
        self.model = model
        self.max_masked_per_image = max_masked_per_image

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor):
        return self.model.forward_loss(images, bool_masked_pos, labels, self.max_masked_per_image)


def register_zero3_external_params(wrapper: MaskedImageModelingLoss) -> None:
    """ZeRO-3 gathers a module's parameters when the module is called. forward_loss reads some directly (tokens,
    the LM head weight passed to the loss kernel, the shared rel-pos table), so they are registered on the wrapper."""
    from deepspeed.runtime.zero import register_external_parameter

    model = wrapper.model
    owners = [model] + [m for m in (getattr(model, "lm_head", None), getattr(model, "rel_pos_bias", None)) if m]
    for owner in owners:
        for param in owner.parameters(recurse=owner is not model):
            register_external_parameter(wrapper, param)


@dataclass
class PretrainParts:
    model: nn.Module
    tokenizer: nn.Module
    loader: torch.utils.data.DataLoader
    mask_backend: str  # "native" | "python": their masks differ, so a resume must use the same one
    heldout: HeldOutBatch | None  # fixed test-split batch and its position-prior baseline


def build_parts(cfg: PretrainConfig, dist_info: DistInfo) -> PretrainParts:
    from engine.data.datasets import build_dataset
    from engine.data.loader import MIMPretrainDataset, build_loader
    from engine.data.masking import MaskingGenerator
    from engine.data.transforms import PretrainTransform, mean_std
    from engine.factory import create_model
    from engine.tokenizer import check_tokenizer_compatible, load_tokenizer

    data, m = cfg.data, cfg.model
    if not data.tokenizer:
        raise ValueError("--tokenizer is required: a tokenizer directory (engine.tokenizer format, e.g. the DALL-E "
                         "dVAE converted with `python -m engine.tokenizer.convert`, or one trained by "
                         "recipes/train_tokenizer.py)")
    if not Path(data.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer={data.tokenizer} does not exist")
    if not data.data_path:
        raise ValueError("--data_path is required (an image folder, an IDX directory or embedded:fashion_mnist)")
    tokenizer = load_tokenizer(data.tokenizer, dist_info.device)
    depth = {"depth": m.depth} if m.depth is not None else {}
    model = create_model(m.model, img_size=m.input_size, drop_path_rate=m.drop_path, **depth,
                         layer_scale_init_value=m.layer_scale_init_value,
                         use_shared_rel_pos_bias=m.use_shared_rel_pos_bias, attn_impl=m.attn_impl,
                         vocab_size=tokenizer.vocab_size, grad_checkpointing=m.grad_checkpointing)
    grid = model.patch_embed.patch_shape
    check_tokenizer_compatible(tokenizer, model.config["vocab_size"], grid, data.second_input_size)
    mean, std = mean_std(data.imagenet_mean_std)
    transform = PretrainTransform(m.input_size, data.second_input_size, scale=(data.min_crop_scale, 1.0),
                                  mean=mean, std=std)
    masking = MaskingGenerator(grid, data.num_mask_patches, data.min_mask_patches, data.max_mask_patches)
    dataset = MIMPretrainDataset(build_dataset(data.data_path, "train"), transform, masking, seed=cfg.run.seed)
    loader = build_loader(dataset, cfg.run.batch_size, dist_info.rank, dist_info.world_size, cfg.run.seed,
                          num_workers=cfg.run.num_workers)
    heldout = None
    if data.heldout_images > 0 and data.heldout_every > 0:
        try:
            test_set = MIMPretrainDataset(build_dataset(data.data_path, "test"), transform, masking, seed=cfg.run.seed)
        except FileNotFoundError:
            logger.info("%s has no test split: the held-out masked-token check is off", data.data_path)
        else:
            heldout = build_heldout_batch(dataset, test_set, tokenizer, model.config["vocab_size"],
                                          data.heldout_images, dist_info.device)
    return PretrainParts(model, tokenizer, loader, masking.backend, heldout)


def _client_state(step: int, steps_per_epoch: int, global_batch: int, dist_info: DistInfo,
                  parts: PretrainParts) -> dict:
    return {"step": step, "steps_per_epoch": steps_per_epoch, "global_batch": global_batch,
            "world_size": dist_info.world_size, "model_config": dict(parts.model.config),
            "mask_backend": parts.mask_backend}


def _check_mask_backend(client: dict, mask_backend: str) -> None:
    saved = client.get("mask_backend", mask_backend)
    if saved != mask_backend:
        raise ValueError(f"the checkpoint was written with the {saved!r} masking backend and this run uses "
                         f"{mask_backend!r}: their masks differ, so the resume would not be exact. Use the same "
                         "installation (native extension built or not), or start a new --output_dir")


def run_pretraining(cfg: PretrainConfig) -> dict:
    """Trains (or resumes) until `epochs` or `max_steps`; returns a summary dict (rank 0 has the full one)."""
    run = cfg.run
    dist_info = init_distributed(run.device)
    resolve_grad_accum(run, dist_info.world_size)
    output_dir = Path(run.output_dir)
    write_run_config(cfg, output_dir, dist_info)
    seed_everything(run.seed + dist_info.rank)
    parts = build_parts(cfg, dist_info)
    model = parts.model
    wrapper = MaskedImageModelingLoss(model, cfg.data.num_mask_patches)
    if cfg.model.compile:
        wrapper.compile()  # in place: compiles the loss forward (the whole model) and keeps the module for DeepSpeed
    if run.zero_stage == 3:
        register_zero3_external_params(wrapper)

    global_batch = run.batch_size * run.grad_accum * dist_info.world_size
    steps_per_epoch = len(parts.loader) // run.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch holds {len(parts.loader)} micro-batches per rank, fewer than grad_accum="
                         f"{run.grad_accum}: lower --batch_size or --grad_accum")
    total_steps = run.epochs * steps_per_epoch
    last_step = min(total_steps, run.max_steps) if run.max_steps > 0 else total_steps
    base_lr = resolve_lr(cfg.optim, global_batch)
    schedules = build_schedules(cfg.optim, base_lr, run.epochs, steps_per_epoch)
    groups = param_groups(parts.model, cfg.optim.weight_decay, skip_rel_pos_tables=cfg.optim.skip_rel_pos_tables_wd)
    engine, _ = initialize_engine(wrapper, groups, run, cfg.optim, dist_info, base_lr, output_dir)
    if dist_info.is_main:
        logger.info("global batch %d = %d per device × %d accumulation × %d ranks; lr %.3g (%s); %d steps/epoch, "
                    "%d epochs, stopping at step %d", global_batch, run.batch_size, run.grad_accum,
                    dist_info.world_size, base_lr, "absolute --lr" if cfg.optim.lr is not None else
                    f"blr {cfg.optim.blr:g} × {global_batch} / 256", steps_per_epoch, run.epochs, last_step)

    start_step = 0
    if dist_info.is_main:
        checkpointing.remove_incomplete(output_dir)
    if dist.is_initialized():
        dist.barrier()
    ckpt = checkpointing.latest_checkpoint(output_dir) if run.resume else None
    if ckpt is not None:
        client = checkpointing.load_checkpoint(engine, ckpt, dist_info.rank)
        check_resume_compatible(client, dist_info.world_size, global_batch, steps_per_epoch)
        _check_mask_backend(client, parts.mask_backend)
        start_step = client["step"]
        logger.info("resumed from %s at step %d", ckpt, start_step)

    summary = _train(cfg, engine, parts, schedules, dist_info, start_step, last_step, steps_per_epoch,
                     global_batch)
    if summary["stopped_by"] is None and dist_info.is_main:
        summary.update(_finish(output_dir, summary["checkpoint"]))
    return summary


def _train(cfg, engine, parts, schedules, dist_info, start_step, last_step, steps_per_epoch,
           global_batch) -> dict:
    run = cfg.run
    output_dir = Path(run.output_dir)
    device, dtype = dist_info.device, input_dtype(run.precision)
    tokenizer, loader = parts.tokenizer, parts.loader
    model_config = parts.model.config
    peak = device_peak_flops(device, run.precision)
    metrics = MetricsLogger(output_dir, dist_info.is_main, last_step, start_step, run.progress)
    health = StepHealth(engine, run.precision, run.max_bad_steps)
    stop = StopSignal()
    from engine.data.loader import set_loader_epoch

    step, epoch = start_step, start_step // steps_per_epoch
    set_loader_epoch(loader, epoch, (start_step % steps_per_epoch) * run.grad_accum)
    batches = iter(loader)
    window_start, window_steps, stopped_by, ckpt_dir = time.perf_counter(), 0, None, None
    engine.train()
    try:
        while step < last_step:
            lr, wd = apply_schedules(engine.optimizer, schedules, step)
            heldout_due = parts.heldout is not None and ((step + 1) % cfg.data.heldout_every == 0
                                                         or step + 1 == last_step)
            log_now = (step + 1) % run.log_every == 0 or step + 1 == last_step or step == start_step or heldout_due
            stats_sum = torch.zeros(3, device=device)  # loss, mlm_acc, masked patches per image: summed on device
            grad_norm = None
            if step % steps_per_epoch == 0 and step != start_step:  # epochs are counted in optimizer steps
                epoch = step // steps_per_epoch
                set_loader_epoch(loader, epoch)
                batches = iter(loader)
            for micro in range(run.grad_accum):
                patch_view, tokenizer_view, mask = next(batches)
                patch_view = patch_view.to(device, dtype, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                with torch.no_grad():
                    labels = tokenizer.get_codebook_indices(tokenizer_view.to(device, non_blocking=True))  # [B, N]
                loss, mlm_acc = engine(patch_view, mask, labels)
                engine.backward(loss)
                if log_now and micro == run.grad_accum - 1 and run.precision == "fp32" and run.zero_stage == 0:
                    grad_norm = global_grad_norm(engine)
                engine.step()
                stats_sum += torch.stack([loss.detach().float(), mlm_acc.float(), mask.sum() / mask.shape[0]])
            step += 1
            window_steps += 1
            loss_value, acc_value, masked = (stats_sum / run.grad_accum).tolist()  # the step's one host sync
            health.update(step, loss_value)
            metrics.advance()
            if log_now:
                elapsed = time.perf_counter() - window_start
                img_per_s = global_batch * window_steps / elapsed
                loss_value, mlm_acc, masked = mean_over_ranks([loss_value, acc_value, masked], device)
                flops = train_flops_per_image(model_config, masked)
                row = {
                    "step": step, "epoch": epoch, "loss": loss_value, "mlm_acc": mlm_acc,
                    "lr": lr, "wd": wd,
                    "grad_norm": grad_norm if grad_norm is not None else deepspeed_grad_norm(engine),
                    "loss_scale": loss_scale(engine), "img_per_s": img_per_s,
                    "mfu": flops * img_per_s / dist_info.world_size / peak if peak else None,
                    "skipped_steps": health.total_skipped,
                }
                heldout = parts.heldout
                if heldout_due:
                    row["heldout_loss"], row["heldout_acc"] = heldout.evaluate(engine, dtype, device)
                    row["prior_loss"], row["prior_acc"] = heldout.prior_loss, heldout.prior_acc
                    metrics.note(f"step {step}: held-out masked-token loss {row['heldout_loss']:.3f} (accuracy "
                                 f"{row['heldout_acc']:.3f}); position prior {heldout.prior_loss:.3f} "
                                 f"({heldout.prior_acc:.3f})")
                metrics.log(row)
                window_start, window_steps = time.perf_counter(), 0
            if stop.should_stop(device):
                stopped_by = stop.received or "signal on another rank"
                break
            if run.save_every > 0 and step % run.save_every == 0 and step < last_step:
                checkpointing.save_checkpoint(engine, output_dir, step,
                                              _client_state(step, steps_per_epoch, global_batch, dist_info,
                                                            parts), dist_info.rank, run.keep_checkpoints)
        ckpt_dir = checkpointing.save_checkpoint(engine, output_dir, step,
                                                 _client_state(step, steps_per_epoch, global_batch, dist_info,
                                                               parts), dist_info.rank, run.keep_checkpoints)
    finally:
        metrics.close()
        stop.restore()
    if stopped_by and dist_info.is_main:
        logger.warning("stopped by %s at step %d; checkpoint %s saved. Run the same command again to resume.",
                       stopped_by, step, ckpt_dir)
    return {"step": step, "stopped_by": stopped_by, "checkpoint": ckpt_dir}


def _finish(output_dir: Path, ckpt_dir: Path) -> dict:
    """Rank 0, after the final checkpoint: fp32 export, loss/accuracy curves, first and last logged values."""
    export_dir = export_checkpoint(ckpt_dir, output_dir / EXPORT_DIR)
    rows = read_metrics(output_dir / METRICS_FILE)
    png = plot_curves(rows, output_dir / CURVES_PNG, panels=("loss", "mlm_acc", ("heldout_loss", "prior_loss")))
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    heldout = [row for row in rows if row.get("heldout_loss") is not None]
    return {"export_dir": export_dir, "curves_png": png, "metrics_file": output_dir / METRICS_FILE,
            "first": first, "last": last, "heldout": heldout[-1] if heldout else None}
