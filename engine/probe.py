"""Frozen-backbone evaluation: a linear probe and a k-NN classifier on every layer's features.

Features are those of the official `run_linear_eval.py`: per block, `[CLS ; mean(patch tokens)]` (`[n, 2C]`), read
once per image (no augmentation) by `extract_features`. Each layer's features are standardised with the training
set's statistics, then
- linear: multinomial logistic regression with an L2 penalty, full-batch L-BFGS (deterministic, seconds on a CPU);
- k-NN: cosine similarity to the training features, the k nearest vote with weights exp(sim / T) (as in DINO).

Layer and L2 strength are chosen on a validation split held out from the training images, never on the test set;
the chosen classifier is then refitted on all training images and scored once on the test images.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class ProbeSettings:
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)  # L2 penalty on the weights, per mean sample loss
    lbfgs_steps: int = 100
    knn_k: int = 20
    knn_temperature: float = 0.07
    val_fraction: float = 0.1  # of the training images, for choosing the layer and the L2 strength
    seed: int = 0


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `loader` → (features `[depth, n, 2C]` float32 on the CPU, labels `[n]` int64)."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    transform = loader.dataset.transform  # an EvalTransform: uint8 images, normalised here on the device
    for images, batch_labels in loader:
        states = model.hidden_states(transform.model_inputs(images.to(device)))  # depth × [B, N, C]
        features.append(torch.stack([torch.cat((x[:, 0], x[:, 1:].mean(dim=1)), dim=-1) for x in states]).cpu())
        labels.append(torch.as_tensor(batch_labels))
    model.train(was_training)
    return torch.cat(features, dim=1).float(), torch.cat(labels).long()


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per feature, with the statistics of `train` (`[n, D]`)."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, steps: int) -> nn.Linear:
    """Multinomial logistic regression on `[n, D]` features: mean cross-entropy + l2 · ‖W‖², full-batch L-BFGS."""
    classifier = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels) + l2 * classifier.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier.requires_grad_(False)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int, k: int,
                temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Class scores `[m, K]` of each query row: its k most cosine-similar training rows vote with exp(sim / T)."""
    train = F.normalize(train, dim=1)
    scores = []
    for start in range(0, len(query), chunk):
        sims = F.normalize(query[start:start + chunk], dim=1) @ train.T  # [m, n]
        top, index = sims.topk(min(k, len(train)), dim=1)  # [m, k]
        votes = torch.zeros(len(top), num_classes)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
          settings: ProbeSettings) -> dict:
    """Linear and k-NN accuracy (%) of per-layer features `[depth, n, D]`; the layer (and L2) chosen on validation.

    Returns {"linear": {"acc1", "layer", "l2", "val_acc1"}, "knn": {"acc1", "layer", "val_acc1"},
    "per_layer": [{"layer", "linear_val", "linear_test", "knn_val", "knn_test"}, ...]} with 1-based layers.
    """
    train_x, train_y = train
    test_x, test_y = test
    fit_idx, val_idx = _split(len(train_y), settings.val_fraction, settings.seed)
    per_layer = []
    for layer in range(train_x.shape[0]):
        fit, val = standardize(train_x[layer, fit_idx], train_x[layer, val_idx])
        linear_val = {l2: accuracy(fit_linear(fit, train_y[fit_idx], num_classes, l2, settings.lbfgs_steps)(val),
                                   train_y[val_idx]) for l2 in settings.l2_grid}
        best_l2 = max(linear_val, key=linear_val.get)
        knn_val = accuracy(knn_predict(fit, train_y[fit_idx], val, num_classes, settings.knn_k,
                                       settings.knn_temperature), train_y[val_idx])
        full, held = standardize(train_x[layer], test_x[layer])
        classifier = fit_linear(full, train_y, num_classes, best_l2, settings.lbfgs_steps)
        per_layer.append({
            "layer": layer + 1, "l2": best_l2, "linear_val": linear_val[best_l2],
            "linear_test": accuracy(classifier(held), test_y), "knn_val": knn_val,
            "knn_test": accuracy(knn_predict(full, train_y, held, num_classes, settings.knn_k,
                                             settings.knn_temperature), test_y),
        })
        logger.info("layer %d: linear %.2f%% (val %.2f%%, l2 %g), k-NN %.2f%% (val %.2f%%)", layer + 1,
                    per_layer[-1]["linear_test"], per_layer[-1]["linear_val"], best_l2, per_layer[-1]["knn_test"],
                    knn_val)
    best_linear = max(per_layer, key=lambda row: row["linear_val"])
    best_knn = max(per_layer, key=lambda row: row["knn_val"])
    return {
        "linear": {"acc1": best_linear["linear_test"], "layer": best_linear["layer"], "l2": best_linear["l2"],
                   "val_acc1": best_linear["linear_val"]},
        "knn": {"acc1": best_knn["knn_test"], "layer": best_knn["layer"], "val_acc1": best_knn["knn_val"],
                "k": settings.knn_k, "temperature": settings.knn_temperature},
        "per_layer": per_layer,
    }


@dataclass
class ProbeConfig:
    checkpoint: str = ""  # weights in any format engine.checkpoint.load_checkpoint reads
    model: str = ""  # registered model name; "" = the one recorded next to the checkpoint (save_pretrained format)
    input_size: int | None = None  # None: the checkpoint's
    depth: int | None = None  # None: the checkpoint's (or the registered model's)
    attn_impl: str = "sdpa"
    data_path: str = "embedded:fashion_mnist"  # labelled train and test splits (see engine.data.build_dataset)
    imagenet_mean_std: bool = False  # the normalisation the checkpoint was pretrained with (BEiT's 0.5/0.5: False)
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    init_seed: int = 0  # seed of the random initialisation the checkpoint is compared with
    output: str = ""  # JSON path; "" = probe.json next to the checkpoint
    settings: ProbeSettings = field(default_factory=ProbeSettings)


def _build_models(cfg: ProbeConfig, device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    """(pretrained, random init, model config): the same architecture, one loaded from `cfg.checkpoint`."""
    from engine.checkpoint import load_checkpoint, read_model_config
    from engine.factory import create_model

    if not cfg.checkpoint:
        raise ConfigError("--checkpoint is required: the weights to probe (e.g. runs/pretrain_demo/pretrained)")
    if not Path(cfg.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint={cfg.checkpoint} does not exist")
    config = {"name": cfg.model} if cfg.model else read_model_config(cfg.checkpoint)
    config.update(attn_impl=cfg.attn_impl, drop_path_rate=0.0)
    config.update({k: v for k, v in (("img_size", cfg.input_size), ("depth", cfg.depth)) if v is not None})
    torch.manual_seed(cfg.init_seed)
    random_init = create_model(**config).to(device)
    pretrained = create_model(**config)
    report = load_checkpoint(pretrained, cfg.checkpoint)
    backbone_missing = [k for k in report.missing if k.startswith(("patch_embed.", "blocks.", "cls_token"))]
    if backbone_missing:
        raise ConfigError(f"{cfg.checkpoint} leaves {len(backbone_missing)} backbone tensors uninitialised (e.g. "
                         f"{backbone_missing[0]}): it does not hold this model's weights; check --model/--depth")
    return pretrained.to(device), random_init, config


def run_probe(cfg: ProbeConfig) -> dict:
    """Probes `cfg.checkpoint` and a random init of the same model on `cfg.data_path`; writes and returns the JSON."""
    from engine.data import (
        ClassificationDataset,
        EvalTransform,
        build_dataset,
        build_loader,
        mean_std,
    )
    from engine.device import resolve_device

    started = time.time()
    device = torch.device(resolve_device(cfg.device))
    pretrained, random_init, config = _build_models(cfg, device)
    train_base, test_base = build_dataset(cfg.data_path, "train"), build_dataset(cfg.data_path, "test")
    num_classes = len(train_base.classes)
    if num_classes < 2:
        raise ConfigError(f"{cfg.data_path} has no class labels: a probe needs a labelled train and test split")
    mean, std = mean_std(cfg.imagenet_mean_std)
    transform = EvalTransform(pretrained.patch_embed.img_size[0], crop_pct=1.0, mean=mean, std=std)
    loaders = [build_loader(ClassificationDataset(base, transform), cfg.batch_size, num_workers=cfg.num_workers,
                            drop_last=False, shuffle=False) for base in (train_base, test_base)]
    results = {}
    for name, model in (("pretrained", pretrained), ("random_init", random_init)):
        train, test = (extract_features(model, loader, device) for loader in loaders)
        logger.info("%s: features of %d train / %d test images from %d layers", name, len(train[1]), len(test[1]),
                    train[0].shape[0])
        results[name] = probe(train, test, num_classes, cfg.settings)
    summary = {
        "checkpoint": str(cfg.checkpoint), "model": config, "data_path": cfg.data_path,
        "num_train": len(train_base), "num_test": len(test_base), "num_classes": num_classes,
        **results,
        "gain": {kind: results["pretrained"][kind]["acc1"] - results["random_init"][kind]["acc1"]
                 for kind in ("linear", "knn")},
        "seconds": round(time.time() - started, 1),
    }
    output = Path(cfg.output) if cfg.output else _default_output(cfg.checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_suffix(".tmp")
    staging.write_text(json.dumps(summary, indent=2) + "\n")
    staging.replace(output)
    summary["output"] = str(output)
    return summary


def _default_output(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / "probe.json"


def summary_line(summary: dict) -> str:
    """One line: linear and k-NN accuracy of the checkpoint vs the random init, with the chosen layers."""
    pre, rnd, gain = summary["pretrained"], summary["random_init"], summary["gain"]
    return (f"linear probe {pre['linear']['acc1']:.1f}% (layer {pre['linear']['layer']}) vs random init "
            f"{rnd['linear']['acc1']:.1f}% (layer {rnd['linear']['layer']}): {gain['linear']:+.1f} points; "
            f"k-NN {pre['knn']['acc1']:.1f}% vs {rnd['knn']['acc1']:.1f}%: {gain['knn']:+.1f} points "
            f"({summary['num_train']} train / {summary['num_test']} test images, {summary['seconds']:.0f} s)")
