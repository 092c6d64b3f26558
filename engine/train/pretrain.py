"""BEiT masked-image-modelling pretraining, a task of the training loop: `run_pretraining(cfg)` is what the recipes
call.

Per micro-batch: visual-token labels from the frozen tokenizer on the tokenizer view (no grad), masked forward of the
patch view, masked LM loss (`MaskedLMHead`, through `model(images, mask, labels)`). Logged: loss and accuracy over
masked tokens (weighted by their count across micro-batches and ranks) and, every `heldout_every` steps, the held-out
check (engine/train/heldout.py).
"""

import logging
from pathlib import Path

import torch
from torch import nn

from engine.config import ConfigError
from engine.param_groups import param_groups
from engine.train.export import export_checkpoint
from engine.train.flops import train_flops_per_image
from engine.train.heldout import build_heldout_batch
from engine.train.loop import input_dtype, train
from engine.train.settings import PretrainConfig
from engine.train.task import Task

logger = logging.getLogger(__name__)

EXPORT_DIR = "pretrained"


class MaskedImageModelingLoss(nn.Module):
    """What DeepSpeed wraps: `(images, mask, labels)` → (loss, stats [loss·M, accuracy·M, M]), M masked tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor):
        loss, accuracy = self.model(images, bool_masked_pos, labels)
        masked = bool_masked_pos.sum().to(torch.float32)
        return loss, torch.stack([loss.detach().float() * masked, accuracy.float() * masked, masked])


class MaskedImageModeling(Task):
    """BEiT pretraining: frozen tokenizer → labels, block-wise masks, masked LM loss; held-out check; fp32 export."""

    stat_names = ("loss", "mlm_acc", "masked_tokens")
    curve_panels = ("loss", "mlm_acc", ("heldout_loss", "prior_loss"))

    def __init__(self, cfg: PretrainConfig, dist_info):
        super().__init__(cfg, dist_info)
        from engine.checkpoint import preprocessing_record
        from engine.data.datasets import build_dataset
        from engine.data.loader import MIMPretrainDataset, build_loader
        from engine.data.masking import MaskingGenerator
        from engine.data.transforms import PretrainTransform, mean_std
        from engine.factory import create_model
        from engine.tokenizer import check_tokenizer_compatible, load_tokenizer

        data, m, run = cfg.data, cfg.model, cfg.run
        device = dist_info.device
        self.dtype = input_dtype(run.precision)
        self.tokenizer = load_tokenizer(data.tokenizer, device)
        self.model = self.build_model(lambda: create_model(
            m.model, **m.create_kwargs(), max_masked_per_image=data.num_mask_patches,
            vocab_size=self.tokenizer.vocab_size))
        grid = self.model.patch_embed.patch_shape
        check_tokenizer_compatible(self.tokenizer, self.model.config["vocab_size"], grid, data.second_input_size)
        mean, std = mean_std(data.imagenet_mean_std)
        self.preprocessing = preprocessing_record(mean, std, m.input_size, "bicubic")
        self.transform = transform = PretrainTransform(m.input_size, data.second_input_size,
                                                       scale=(data.min_crop_scale, 1.0), mean=mean, std=std)
        masking = MaskingGenerator(grid, data.num_mask_patches, data.min_mask_patches, data.max_mask_patches)
        self.mask_backend = masking.backend  # "native" | "python": their masks differ, so a resume must use the same
        dataset = MIMPretrainDataset(build_dataset(data.data_path, "train"), transform, masking, seed=run.seed)
        if data.data_backend == "dali":
            from engine.data.dali import build_dali_pretrain_loader

            self.loader = build_dali_pretrain_loader(dataset.base, transform, masking, run.batch_size, dist_info.rank,
                                                     dist_info.world_size, run.seed, run.num_workers, device)
        else:
            self.loader = build_loader(dataset, run.batch_size, dist_info.rank, dist_info.world_size, run.seed,
                                       num_workers=run.num_workers)
        self.heldout = None
        if data.heldout_images > 0 and data.heldout_every > 0:
            try:
                test_set = MIMPretrainDataset(build_dataset(data.data_path, "test"), transform, masking,
                                              seed=run.seed)
            except FileNotFoundError:
                logger.info("%s has no test split: the held-out masked-token check is off", data.data_path)
            else:
                self.heldout = build_heldout_batch(dataset, test_set, self.tokenizer, self.model.config["vocab_size"],
                                                   data.heldout_images, device)
        self.module = MaskedImageModelingLoss(self.model)
        if m.compile:
            self.module.compile()  # in place: compiles the loss forward (the whole model), keeps the module

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.cfg.optim.weight_decay,
                            skip_rel_pos_tables=self.cfg.optim.skip_rel_pos_tables_wd)

    def inputs(self, batch, step: int) -> tuple:
        """uint8 views and jitter params from the workers → jittered, normalised patch views and tokenizer labels, on
        the device."""
        patch_views, tokenizer_views, jitter, mask = (t.to(self.dist_info.device, non_blocking=True) for t in batch)
        patches, pixels = self.transform.model_inputs(patch_views, tokenizer_views, jitter, self.dtype)
        with torch.no_grad():
            labels = self.tokenizer.get_codebook_indices(pixels)  # [B, L]
        return patches, mask, labels

    def flops_per_image(self, weight_per_image: float) -> float:
        return train_flops_per_image(self.model.config, weight_per_image)  # weight: masked patches

    def client_state(self) -> dict:
        return {"mask_backend": self.mask_backend}

    def resume(self, client: dict, ckpt_dir: Path) -> None:
        check_mask_backend(client, self.mask_backend)

    def log_due(self, step: int, plan) -> bool:
        """The held-out check's steps: every `heldout_every` and the last."""
        return self.heldout is not None and (step % self.cfg.data.heldout_every == 0 or step == plan.last_step)

    def log_extras(self, engine, step: int, plan) -> dict:
        if not self.log_due(step, plan):
            return {}
        heldout = self.heldout
        loss, acc = heldout.evaluate(engine, self.dtype, self.dist_info.device)
        if self.dist_info.is_main:
            logger.info("step %d: held-out masked-token loss %.3f (accuracy %.3f); position prior %.3f (%.3f)", step,
                        loss, acc, heldout.prior_loss, heldout.prior_acc)
        return {"heldout_loss": loss, "heldout_acc": acc, "prior_loss": heldout.prior_loss,
                "prior_acc": heldout.prior_acc}

    def finish(self, engine, ckpt_dir: Path) -> dict:
        """Rank 0: the fp32 export of the final checkpoint and the last held-out row."""
        if not self.dist_info.is_main:
            return {}
        from engine.train.metrics import METRICS_FILE, read_metrics

        heldout = [row for row in read_metrics(self.output_dir / METRICS_FILE) if row.get("heldout_loss") is not None]
        return {"export_dir": export_checkpoint(ckpt_dir, self.output_dir / EXPORT_DIR),
                "heldout": heldout[-1] if heldout else None}


def check_mask_backend(client: dict, mask_backend: str) -> None:
    saved = client.get("mask_backend", mask_backend)
    if saved != mask_backend:
        raise ConfigError(f"the checkpoint was written with the {saved!r} masking backend and this run uses "
                         f"{mask_backend!r}: their masks differ, so the resume would not be exact. Use the same "
                         "installation (native extension built or not), or start a new --output_dir")


def run_pretraining(cfg: PretrainConfig) -> dict:
    """Trains (or resumes) until `epochs` or `max_steps`; returns a summary dict (rank 0 has the full one)."""
    return train(cfg, MaskedImageModeling)
