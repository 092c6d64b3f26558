"""Object detection and instance segmentation (torchvision's Mask R-CNN on a BEiT backbone, the ViTDet way), a task
of the training loop: `run_detection(cfg)` is what the detection recipes call.

Data: a COCO-format folder (engine/data/coco.py: reader, large-scale jitter; classes and their names from the
training annotations). Model: `engine.detection.create_detector`; encoder weights from `--finetune` through
`engine.checkpoint.load_checkpoint`. Optimisation: AdamW with layer-wise LR decay over the encoder blocks (pyramid
and heads at full LR), warm-up then step decay by iteration. Evaluation every `eval_every` steps and at the end:
each rank detects its share of the validation images, the COCO results of all ranks are gathered, and pycocotools
scores box and mask AP on every rank (`eval.jsonl`); the best box AP's weights go to `best/`, the last to `final/`.
"""

import logging

import torch

from engine.config import ConfigError
from engine.train.flops import train_flops_per_image
from engine.train.loop import input_dtype, train
from engine.train.settings import DetectionConfig
from engine.train.task import EvaluatedTask

logger = logging.getLogger(__name__)


class Detection(EvaluatedTask):
    """Mask R-CNN training: the sum of its five losses; COCO box and mask AP; best and final weights."""

    curve_panels = ("loss", "lr")
    best_keys = ("box_AP", "mask_AP")

    def __init__(self, cfg: DetectionConfig, dist_info):
        super().__init__(cfg, dist_info)
        from engine.checkpoint import load_checkpoint, preprocessing_record
        from engine.data.coco import CocoDetection, DetEvalTransform, DetTrainTransform, collate_detection
        from engine.data.loader import DetectionSamples, build_loader, worker_context, worker_init
        from engine.data.transforms import mean_std
        from engine.detection.model import STAT_NAMES, DetectionLoss, create_detector
        from engine.sharded import gathered

        data, m, run, head = cfg.data, cfg.model, cfg.run, cfg.head
        self.stat_names = STAT_NAMES
        self.dtype = input_dtype(run.precision)
        train_set = CocoDetection(data.data_path, "train", training=True)
        self.eval_set = CocoDetection(data.data_path, "val", training=False, category_ids=train_set.category_ids)
        self.category_ids = train_set.category_ids
        mean, std = mean_std(data.imagenet_mean_std)
        self.model = self.build_model(lambda: create_detector(
            m.model, len(train_set.category_ids), fpn_channels=head.fpn_channels, mean=mean, std=std,
            proposals_per_image=head.proposals_per_image, rois_per_image=head.rois_per_image,
            sync_bn=dist_info.world_size > 1 and dist_info.device.type == "cuda",  # SyncBatchNorm is CUDA-only
            input_size=m.input_size, **{k: v for k, v in m.create_kwargs().items() if k != "img_size"}))
        if data.finetune:
            encoder = self.model.backbone.body.encoder
            try:
                with gathered(encoder.parameters()):  # ZeRO-3: whole on every rank while loading, then re-split
                    load_checkpoint(encoder, data.finetune)
            except ValueError as err:  # a checkpoint of another architecture: a usage error, one line
                raise ConfigError(f"--finetune={data.finetune}: {err}") from None
        self.preprocessing = preprocessing_record(mean, std, m.input_size, "bilinear",
                                                  class_names=train_set.class_names)
        self.loader = build_loader(DetectionSamples(train_set, DetTrainTransform(m.input_size, data.scale_range),
                                                    seed=run.seed),
                                   run.batch_size, dist_info.rank, dist_info.world_size, run.seed,
                                   num_workers=run.num_workers, collate_fn=collate_detection)
        count = min(len(self.eval_set), data.max_eval_images) if data.max_eval_images > 0 else len(self.eval_set)
        self.eval_image_ids = self.eval_set.image_ids[:count]
        eval_workers = min(run.num_workers, 2)
        self.eval_loader = torch.utils.data.DataLoader(
            DetectionSamples(self.eval_set, DetEvalTransform(m.input_size), seed=run.seed),
            batch_size=head.eval_batch_size, sampler=list(range(dist_info.rank, count, dist_info.world_size)),
            num_workers=eval_workers, collate_fn=collate_detection,
            worker_init_fn=worker_init,  # workers ignore SIGINT/SIGTERM: a stop during evaluation still saves
            multiprocessing_context=worker_context(eval_workers))
        compiled = torch.compile(self.model) if m.compile else self.model
        self.module = DetectionLoss(compiled)
        # MFU counts the encoder's matmuls only (the pyramid and the heads are left out)
        self.flops = train_flops_per_image(self.model.backbone.body.encoder.config)

    def param_groups(self) -> list[dict]:
        from engine.detection.model import detection_param_groups

        optim = self.cfg.optim
        return detection_param_groups(self.model, optim.weight_decay, optim.layer_decay,
                                      self.model.get_num_layers(), optim.skip_rel_pos_tables_wd)

    def inputs(self, batch, step: int) -> tuple:
        images, targets = batch  # uint8 [B, 3, S, S], B dicts of boxes [N, 4], labels [N], masks uint8 [N, S, S]
        device = self.dist_info.device
        images = images.to(device, non_blocking=True).to(self.dtype) / 255  # [0, 1]: the model normalises
        targets = [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]
        return images, targets

    def flops_per_image(self, weight_per_image: float) -> float:
        return self.flops

    def score(self, stop) -> dict:
        """Box and mask AP (%) over the validation images, all ranks together. A stop raises EvaluationStopped on
        every rank at the same batch index (engine/stop_signal.py, `StopSignal.iterate`)."""
        from engine.detection.evaluation import coco_metrics, coco_results, gather_results
        from engine.segmentation.batchnorm import average_running_statistics

        average_running_statistics(self.model)  # CPU ranks' BatchNorms (no SyncBN there): one model on every rank
        most_images = -(-len(self.eval_image_ids) // self.dist_info.world_size)  # ranks hold n or n - 1 images
        most_batches = -(-most_images // self.cfg.head.eval_batch_size)
        was_training = self.model.training
        self.model.eval()
        results = []
        with torch.no_grad():
            for images, metas in stop.iterate(self.eval_loader, most_batches):
                images = images.to(self.dist_info.device).to(self.dtype) / 255
                results += coco_results(self.model(list(images)), metas, self.category_ids)
        self.model.train(was_training)
        everyone = gather_results(results)
        return {**coco_metrics(self.eval_set.coco, everyone, self.eval_image_ids), "detections": len(everyone)}

    def evaluation_due(self, step: int, plan) -> bool:
        return step % self.cfg.head.eval_every == 0 or step == plan.last_step

    def evaluate(self, engine, step: int, plan, stop) -> dict:
        if self.dist_info.is_main:
            logger.info("evaluating after step %d: %d validation images", step, len(self.eval_image_ids))
        metrics = self.score(stop)
        if self.dist_info.is_main:
            logger.info("eval at step %d: %s", step, summary(metrics))
        return self.record(engine, {"step": step, "epoch": plan.epoch_of(step), **metrics})


def summary(metrics: dict) -> str:
    """`box AP 12.34 (AP50 …, AP75 …), mask AP …`: the two headline figures and their IoU variants."""
    def part(prefix: str) -> str:
        return (f"{prefix} AP {metrics[f'{prefix}_AP']:.2f} (AP50 {metrics[f'{prefix}_AP50']:.2f}, "
                f"AP75 {metrics[f'{prefix}_AP75']:.2f})")
    return f"{part('box')}, {part('mask')}"


def run_detection(cfg: DetectionConfig) -> dict:
    """Trains (or resumes), evaluating every `eval_every` steps; returns a summary (complete on rank 0). A run
    stopped by a signal returns `stopped_by` set and no `best`/`evals`."""
    return train(cfg, Detection)


def print_outcome(summary_: dict) -> None:
    """The recipes' last lines: the best and the last box / mask AP."""
    if summary_.get("best") and summary_.get("evals"):
        best, last = summary_["best"], summary_["evals"][-1]
        print(f"best box AP {best['box_AP']:.2f} at step {best.get('step')} (mask AP {best['mask_AP']:.2f})")
        print(f"last: {summary(last)}")
