"""Semantic segmentation (UperNet on a BEiT backbone, the official ADE20K recipe), a task of the training loop:
`run_segmentation(cfg)` is what the segmentation recipes call.

Data: an ADE20K-format folder (engine/data/segmentation.py: reader, mmseg's training pipeline, label 0 → ignore).
Model: `engine.segmentation.create_segmenter` (backbone + official neck + UPerHead + auxiliary FCN head); encoder
weights from `--finetune` through `engine.checkpoint.load_checkpoint` (pretraining or fine-tuned checkpoints, any
image size). Optimisation: AdamW with layer-wise LR decay over the encoder blocks (neck and heads at full LR), poly
schedule by iteration. Evaluation every `eval_every` steps and at the end: sliding-window (and optionally
multi-scale + flip) inference on the validation split, one confusion matrix per rank on the device, one all-reduce,
mIoU / per-class IoU / pixel accuracy to `eval.jsonl`; the best mIoU's weights go to `best/`, the last to `final/`.
"""

import logging

import torch

from engine.config import ConfigError
from engine.train.flops import train_flops_per_image
from engine.train.loop import input_dtype, train
from engine.train.settings import SegmentationConfig
from engine.train.task import EvaluatedTask

logger = logging.getLogger(__name__)


class SemanticSegmentation(EvaluatedTask):
    """UperNet training: pixel cross-entropy (decode + 0.4 × auxiliary), mIoU evaluation, best and final weights."""

    curve_panels = ("loss", "lr")
    best_keys = ("mIoU",)

    def __init__(self, cfg: SegmentationConfig, dist_info):
        super().__init__(cfg, dist_info)
        from engine.checkpoint import load_checkpoint, preprocessing_record
        from engine.data.loader import SegmentationSamples, build_loader, worker_context, worker_init
        from engine.data.segmentation import ADE20KDataset, SegEvalTransform, SegTrainTransform
        from engine.data.transforms import mean_std
        from engine.segmentation.model import STAT_NAMES, SegmentationLoss, create_segmenter
        from engine.sharded import gathered

        data, m, run, head = cfg.data, cfg.model, cfg.run, cfg.head
        self.stat_names = STAT_NAMES
        self.dtype = input_dtype(run.precision)
        self.model = self.build_model(lambda: create_segmenter(
            m.model, data.num_classes, channels=head.decode_channels, aux_channels=head.aux_channels,
            aux_weight=head.aux_weight,
            sync_bn=dist_info.world_size > 1 and dist_info.device.type == "cuda",  # SyncBatchNorm is CUDA-only
            **m.create_kwargs()))
        if data.finetune:
            encoder = self.model.backbone.encoder
            try:
                with gathered(encoder.parameters()):  # ZeRO-3: whole on every rank while loading, then re-split
                    load_checkpoint(encoder, data.finetune)
            except ValueError as err:  # a checkpoint of another architecture: a usage error, one line
                raise ConfigError(f"--finetune={data.finetune}: {err}") from None
        self.transform = SegTrainTransform(m.input_size, img_scale=data.img_scale, ratio_range=data.ratio_range,
                                           cat_max_ratio=data.cat_max_ratio, imagenet_mean_std=data.imagenet_mean_std)
        train_set = ADE20KDataset(data.data_path, "training", num_classes=data.num_classes)
        self.loader = build_loader(SegmentationSamples(train_set, self.transform, seed=run.seed), run.batch_size,
                                   dist_info.rank, dist_info.world_size, run.seed, num_workers=run.num_workers)
        self.eval_transform = SegEvalTransform(data.img_scale, imagenet_mean_std=data.imagenet_mean_std,
                                               scales=data.eval_scales, crop_size=m.input_size)
        self.preprocessing = preprocessing_record(*mean_std(data.imagenet_mean_std), m.input_size, "bilinear")
        eval_set = ADE20KDataset(data.data_path, "validation", num_classes=data.num_classes)
        count = min(len(eval_set), data.max_eval_images) if data.max_eval_images > 0 else len(eval_set)
        self.eval_count = count
        # every rank scores its own images once (no padding repeats, so the summed confusion matrix is exact)
        eval_workers = min(run.num_workers, 2)
        self.eval_loader = torch.utils.data.DataLoader(
            SegmentationSamples(eval_set, self.eval_transform, seed=run.seed), batch_size=1,
            sampler=list(range(dist_info.rank, count, dist_info.world_size)), num_workers=eval_workers,
            worker_init_fn=worker_init,  # workers ignore SIGINT/SIGTERM: a stop during evaluation still saves
            multiprocessing_context=worker_context(eval_workers))
        compiled = torch.compile(self.model) if m.compile else self.model
        self.module = SegmentationLoss(compiled, average=head.loss_average)
        # MFU counts the encoder's matmuls only (the neck and the heads' convolutions are left out)
        self.flops = train_flops_per_image(self.model.backbone.encoder.config)

    def param_groups(self) -> list[dict]:
        from engine.segmentation.model import segmentation_param_groups

        optim = self.cfg.optim
        return segmentation_param_groups(self.model, optim.weight_decay, optim.layer_decay,
                                         self.model.get_num_layers(), optim.skip_rel_pos_tables_wd)

    def inputs(self, batch, step: int) -> tuple:
        images, labels = batch  # uint8 [B, 3, H, W], uint8 [B, H, W] (255 = ignore)
        device = self.dist_info.device
        images = self.transform.model_inputs(images.to(device, non_blocking=True), self.dtype)
        return images, labels.to(device, non_blocking=True).long()

    def flops_per_image(self, weight_per_image: float) -> float:
        return self.flops

    def score(self, stop) -> dict:
        """mIoU, mAcc, aAcc (%) and per-class IoU over the validation images, all ranks together. A stop raises
        EvaluationStopped on every rank at the same image index (engine/stop_signal.py, `StopSignal.iterate`)."""
        from engine.segmentation.batchnorm import average_running_statistics

        data = self.cfg.data
        average_running_statistics(self.model)  # CPU ranks' BatchNorms (no SyncBN there): one model on every rank
        most_per_rank = -(-self.eval_count // self.dist_info.world_size)  # ranks hold n or n - 1 images
        return score_segmenter(self.model, stop.iterate(self.eval_loader, most_per_rank), self.eval_transform,
                               self.cfg.model.input_size, data.eval_stride, data.eval_flip, data.num_classes,
                               self.dist_info.device, self.dtype)

    def evaluation_due(self, step: int, plan) -> bool:
        return step % self.cfg.head.eval_every == 0 or step == plan.last_step

    def evaluate(self, engine, step: int, plan, stop) -> dict:
        if self.dist_info.is_main:
            logger.info("evaluating after step %d: %d validation images", step, self.eval_count)
        metrics = self.score(stop)
        if self.dist_info.is_main:
            logger.info("eval at step %d: mIoU %.2f%%, mAcc %.2f%%, pixel accuracy %.2f%%", step, metrics["mIoU"],
                        metrics["mAcc"], metrics["aAcc"])
        return self.record(engine, {"step": step, "epoch": plan.epoch_of(step), **metrics})


@torch.no_grad()
def score_segmenter(model, batches, eval_transform, crop: int, stride: int, flip: bool, num_classes: int,
                    device: torch.device, dtype: torch.dtype) -> dict:
    """mIoU, mAcc, aAcc (%) and per-class IoU of `model` over `batches` (one image each: uint8 [1, 3, h, w] and its
    label at the original size), sliding windows of `crop` at `stride`, at each of the transform's sizes for the
    image (one, or the official multi-scale set) and flipped on request, summed over ranks when a process group is
    up."""
    from engine.segmentation.metrics import confusion_matrix, reduce_confusion, segmentation_metrics
    from engine.segmentation.model import aug_inference

    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, labels in batches:
        images = eval_transform.model_inputs(images.to(device), dtype)
        labels = labels.to(device).long()
        sizes = eval_transform.sizes(*images.shape[-2:])
        probs = aug_inference(model, images, sizes=sizes, flip=flip, crop_size=crop, stride=stride, mode="slide",
                              out_size=tuple(labels.shape[-2:]), num_classes=num_classes)  # [1, K, H0, W0]
        confusion += confusion_matrix(probs.argmax(dim=1), labels, num_classes)
    model.train(was_training)
    return segmentation_metrics(reduce_confusion(confusion))


def run_segmentation(cfg: SegmentationConfig) -> dict:
    """Trains (or resumes), evaluating every `eval_every` steps; returns a summary (complete on rank 0). A run
    stopped by a signal returns `stopped_by` set and no `best`/`evals`."""
    return train(cfg, SemanticSegmentation)


def print_outcome(summary: dict) -> None:
    """The recipes' last line: the best and the last mIoU."""
    if summary.get("best") and summary.get("evals"):
        print(f"best mIoU {summary['best']['mIoU']:.2f}% at step {summary['best'].get('step')}; "
              f"last mIoU {summary['evals'][-1]['mIoU']:.2f}%")
