"""Data pipeline: datasets, BEiT transforms, RandAugment, Mixup/CutMix, masking and deterministic loaders."""

from engine.data.datasets import (
    FASHION_MNIST_CLASSES,
    IMG_EXTENSIONS,
    IdxDataset,
    ImageFolderDataset,
    build_dataset,
    embedded_dataset,
    fashion_mnist_full,
    read_idx,
    write_idx,
)
from engine.data.loader import (
    ClassificationDataset,
    EpochShardSampler,
    MIMPretrainDataset,
    build_loader,
    collate_mim,
    sample_seed,
    set_loader_epoch,
)
from engine.data.masking import MaskingGenerator
from engine.data.mixup import Mixup, SoftTargetCrossEntropy, mixup_target
from engine.data.randaugment import RandAugment, RandAugmentConfig
from engine.data.transforms import (
    BEIT_DEFAULT_MEAN,
    BEIT_DEFAULT_STD,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ColorJitter,
    EvalTransform,
    FinetuneTransform,
    PretrainTransform,
    RandomErasing,
    mean_std,
)

__all__ = [
    "BEIT_DEFAULT_MEAN", "BEIT_DEFAULT_STD", "FASHION_MNIST_CLASSES", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD",
    "IMG_EXTENSIONS", "ClassificationDataset", "ColorJitter", "EpochShardSampler", "EvalTransform",
    "FinetuneTransform", "IdxDataset", "ImageFolderDataset", "MIMPretrainDataset", "MaskingGenerator", "Mixup",
    "PretrainTransform", "RandAugment", "RandAugmentConfig", "RandomErasing", "SoftTargetCrossEntropy",
    "build_dataset", "build_loader", "collate_mim", "embedded_dataset", "fashion_mnist_full", "mean_std",
    "mixup_target", "read_idx", "sample_seed", "set_loader_epoch", "write_idx",
]
