"""BEiT image classification (fine-tuning and linear probing), tasks of the training loop: `run_finetuning(cfg)` is
what the fine-tuning recipes call.

Official recipe pieces: layer-wise LR decay, soft-target cross-entropy with mixup/cutmix and label smoothing (plain
label-smoothed CE when mixing is off), optional EMA of the weights, top-1/top-5 evaluation every `eval_every` epochs
with the best model kept (`best/`, safetensors), linear-probe mode (frozen backbone). Weights given by `--finetune`
are loaded with `engine.checkpoint.load_checkpoint` (shared → per-layer rel-pos tables, table resize for 384 px,
head dropped on a class-count mismatch). Mixup/cutmix run on the device, on the batch the loader delivered.
"""

import copy
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError
from engine.param_groups import param_groups
from engine.train.flops import train_flops_per_image
from engine.train.loop import input_dtype, train
from engine.train.settings import FinetuneConfig
from engine.train.task import EvaluatedTask

logger = logging.getLogger(__name__)

EMA_FILE = "ema.pt"
_HEAD_PARAMS = ("head.", "fc_norm.")


class ClassificationLoss(nn.Module):
    """What DeepSpeed wraps: `(images, soft_targets)` → (soft-target cross-entropy, stats [loss·B, B])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        logits = self.model(images)  # [B, K]
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        count = torch.full_like(loss, images.shape[0])  # filled on the device: no host-to-device copy
        return loss, torch.stack([loss.detach() * count, count])


@torch.no_grad()
def evaluate(module: nn.Module, loader, device: torch.device, dtype: torch.dtype, stop=None) -> dict:
    """Top-1/top-5 accuracy (%) and mean CE over this rank's shard, summed over ranks; one host sync at the end.
    `loader` yields uint8 images, finished on the device by its dataset's `transform.model_inputs`. With a
    `StopSignal`, a stop raises EvaluationStopped on every rank at the same batch (the shards have equal lengths)."""
    from engine.data import set_loader_epoch

    set_loader_epoch(loader, 0)
    was_training = module.training
    module.eval()
    transform = loader.dataset.transform
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
    for images, labels in loader if stop is None else stop.iterate(loader, len(loader)):
        images = transform.model_inputs(images.to(device, non_blocking=True), dtype)
        labels = labels.to(device, non_blocking=True)
        logits = module(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
        hits = top5 == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), F.cross_entropy(logits, labels,
                               reduction="sum"), torch.tensor(len(labels), device=device)]).double()
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


class ImageClassification(EvaluatedTask):
    """Fine-tuning: mixup/cutmix + label smoothing, layer decay, EMA, evaluation, best and final weights."""

    stat_names = ("loss", "images")
    best_keys = ("acc1", "acc5")
    curve_panels = ("loss", "lr")

    def __init__(self, cfg: FinetuneConfig, dist_info):
        super().__init__(cfg, dist_info)
        from engine.checkpoint import load_checkpoint, preprocessing_record
        from engine.data import (
            ClassificationDataset,
            EvalTransform,
            FinetuneTransform,
            Mixup,
            build_dataset,
            build_loader,
            mean_std,
        )
        from engine.factory import create_model
        from engine.sharded import gathered

        data, m, run, extras = cfg.data, cfg.model, cfg.run, cfg.extras
        self.dtype = input_dtype(run.precision)
        train_base = build_dataset(data.data_path, "train")
        eval_base = None
        if not extras.disable_eval_during_finetuning:
            try:
                eval_base = build_dataset(data.data_path, "test")
            except FileNotFoundError as err:
                raise ConfigError(f"{err}: fine-tuning evaluates on it; add the split, or train without evaluation "
                                  "with --disable_eval_during_finetuning=true (e.g. ImageNet-22k)") from None
        self.num_classes = data.num_classes or len(train_base.classes)
        if self.num_classes < 2:
            raise ConfigError(f"--data_path={data.data_path}: {self.num_classes} class(es); fine-tuning needs labelled "
                              "data of two or more classes (class subfolders under train/, or IDX labels)")
        self.model = self.build_model(lambda: create_model(m.model, num_classes=self.num_classes,
                                                           **m.create_kwargs()))
        if data.finetune:
            try:
                with gathered(self.model.parameters()):  # ZeRO-3: whole on every rank while loading, then re-split
                    load_checkpoint(self.model, data.finetune)
            except ValueError as err:  # a checkpoint of another architecture: a usage error, one line
                raise ConfigError(f"--finetune={data.finetune}: {err}") from None
        self.freeze()
        mean, std = mean_std(data.imagenet_mean_std)
        train_tf = FinetuneTransform(m.input_size, scale=(data.min_crop_scale, 1.0), color_jitter=data.color_jitter,
                                     auto_augment=data.auto_augment or None, re_prob=data.reprob, mean=mean, std=std)
        eval_tf = EvalTransform(m.input_size, data.crop_pct, mean=mean, std=std)
        names = list(train_base.classes) if len(train_base.classes) == self.num_classes else None
        self.preprocessing = preprocessing_record(mean, std, m.input_size, eval_tf.interpolation, eval_tf.crop_pct,
                                                  names)
        self.transform = train_tf
        self.loader = build_loader(ClassificationDataset(train_base, train_tf, seed=run.seed), run.batch_size,
                                   dist_info.rank, dist_info.world_size, run.seed, num_workers=run.num_workers)
        eval_batch = data.eval_batch_size or int(1.5 * run.batch_size)
        self.eval_loader = None if eval_base is None else build_loader(
            ClassificationDataset(eval_base, eval_tf, seed=run.seed), eval_batch, dist_info.rank,
            dist_info.world_size, run.seed, num_workers=run.num_workers, drop_last=False, shuffle=False)
        self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, label_smoothing=data.smoothing,
                           num_classes=self.num_classes) if data.mixup > 0 or data.cutmix > 0 else None
        self.module = ClassificationLoss(torch.compile(self.model) if m.compile else self.model)
        self.ema = ModelEma(self.model, extras.model_ema_decay) if extras.model_ema else None
        self.flops = train_flops_per_image(self.model.config)

    def freeze(self) -> None:
        """Fine-tuning trains every parameter (LinearProbe overrides this)."""

    def param_groups(self) -> list[dict]:
        optim = self.cfg.optim
        return param_groups(self.model, optim.weight_decay, optim.layer_decay, self.model.get_num_layers(),
                            optim.skip_rel_pos_tables_wd)

    def inputs(self, batch, step: int) -> tuple:
        """uint8 images → normalised, randomly erased, mixed (mixup/cutmix) on the device. Erasing noise and mixing
        are seeded by (seed, step, rank), so a resumed run sees identical inputs."""
        from engine.data import mixup_target

        (images, erase_boxes), labels = batch
        device, seeds = self.dist_info.device, [self.cfg.run.seed, step, self.dist_info.rank]
        generator = None
        if self.transform.random_erasing is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(np.random.SeedSequence(seeds).generate_state(1)[0]))
        images = self.transform.model_inputs(images.to(device, non_blocking=True),
                                             erase_boxes.to(device, non_blocking=True), generator)  # fp32
        labels = labels.to(device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels, np.random.default_rng(seeds))
        else:
            targets = mixup_target(labels, self.num_classes, 1.0, self.cfg.data.smoothing)
        return images.to(self.dtype), targets

    def flops_per_image(self, weight_per_image: float) -> float:
        return self.flops

    def checkpoint_files(self) -> dict[str, object]:
        return {EMA_FILE: self.ema.module.state_dict()} if self.ema is not None else {}

    def resume(self, client: dict, ckpt_dir: Path) -> None:
        super().resume(client, ckpt_dir)
        if self.ema is not None:
            self.ema.module.load_state_dict(torch.load(ckpt_dir / EMA_FILE, weights_only=True))

    def after_step(self, engine, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def evaluation_due(self, step: int, plan) -> bool:
        """At the end of every `eval_every`-th epoch and of the run (unless evaluation is off)."""
        every = self.cfg.extras.eval_every
        return self.eval_loader is not None and plan.ends_epoch(step) and (
            (step // plan.steps_per_epoch) % every == 0 or step == plan.last_step)

    def evaluate(self, engine, step: int, plan, stop) -> dict:
        """Top-1/top-5 (and the EMA's); when top-1 improves, rank 0 writes `best/` (safetensors + config)."""
        if self.dist_info.is_main:
            logger.info("evaluating after step %d: %d batches per rank", step, len(self.eval_loader))
        device, epoch = self.dist_info.device, plan.epoch_of(step)
        result = {"step": step, "epoch": epoch, **evaluate(self.model, self.eval_loader, device, self.dtype, stop)}
        if self.ema is not None:
            ema_result = evaluate(self.ema.module, self.eval_loader, device, torch.float32, stop)
            result.update({f"ema_{k}": v for k, v in ema_result.items()})
        if self.dist_info.is_main:
            logger.info("eval at step %d (epoch %d): top-1 %.2f%% top-5 %.2f%% loss %.4f", step, epoch,
                        result["acc1"], result["acc5"], result["eval_loss"])
        return self.record(engine, result)


class LinearProbe(ImageClassification):
    """Frozen backbone: only the head (and `fc_norm`) train; evaluation and checkpoints as in fine-tuning."""

    def freeze(self) -> None:
        for name, param in self.model.named_parameters():
            param.requires_grad_(name.startswith(_HEAD_PARAMS))


def run_finetuning(cfg: FinetuneConfig) -> dict:
    """Trains (or resumes), evaluating every `eval_every` epochs; returns a summary (complete on rank 0). A run stopped
    by a signal returns `stopped_by` set and no `best`/`evals`."""
    return train(cfg, LinearProbe if cfg.extras.linear_probe else ImageClassification)


def print_outcome(summary: dict) -> None:
    """The recipes' last line: the best top-1, or where the final weights are when no evaluation ran."""
    if summary.get("best"):
        print(f"best top-1 {summary['best']['acc1']:.2f}% at step {summary['best'].get('step')}")
    elif summary.get("final_dir"):
        print(f"no evaluation ran; final weights in {summary['final_dir']}")
