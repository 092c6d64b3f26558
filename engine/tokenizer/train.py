"""A plain, linear training loop for a small DALL-E-style dVAE tokenizer (see `dvae.py` for the objective).

Writes to `output_dir`: config.json, metrics.json (held-out reconstruction MSE / PSNR, codebook usage and
perplexity, wall time), reconstructions.png (originals next to their hard-token reconstructions) and `tokenizer/`,
the directory the pretraining recipe loads (tokenizer.json + encoder/decoder safetensors).
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Subset

from engine.config import ConfigError, config_to_dict, save_config
from engine.data.datasets import build_dataset
from engine.stop_signal import StopSignal
from engine.tokenizer.dalle import DalleDecoder, DalleEncoder
from engine.tokenizer.dvae import DiscreteVAE, ReconLoss, gumbel_temperature, kl_weight
from engine.tokenizer.io import save_tokenizer

logger = logging.getLogger(__name__)

INTERRUPTED_FILE = "interrupted.pt"  # a stopped run's state; the next run with the same output_dir continues it


@dataclass
class TokenizerTrainConfig:
    """Defaults: the demo tokenizer, 14 px → 7×7 tokens (2× downsampling), tuned on the embedded Fashion-MNIST."""

    # data: any `engine.data.build_dataset` path; images are resized (shorter side) and centre-cropped
    data_path: str = "embedded:fashion_mnist"
    input_size: int = 14
    max_train_images: int = 60000  # images are held in memory as uint8
    eval_images: int = 512  # held-out ("test" split) images for the reports
    # architecture (DALL-E: 4, 256, 2, 8192, 128)
    group_count: int = 2
    n_hid: int = 32
    n_blk_per_group: int = 1
    vocab_size: int = 256
    n_init: int = 32
    # objective. MSE on the mapped pixels; the logit-Laplace NLL (DALL-E's) trained slower and used fewer codes here.
    # KL weight: 0.001 left most codes unused, 0.01 blurred the reconstructions (per-mean units, not DALL-E's sums)
    recon_loss: ReconLoss = "mse"
    hard_gumbel: bool = False
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_anneal_steps: int = 900
    kl_max_weight: float = 0.003
    kl_warmup_steps: int = 400
    # optimisation
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    # run
    device: str = "auto"  # "auto" = cuda when available, else cpu
    num_threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    seed: int = 0
    log_every: int = 100
    output_dir: str = "runs/tokenizer"


def images_to_uint8(dataset, input_size: int, limit: int) -> torch.Tensor:
    """First `limit` samples of an (RGB uint8 [H, W, 3], label) dataset → uint8 [N, 3, S, S] (short side resized,
    centre crop)."""
    arrays = []
    for i in range(min(len(dataset), limit)):
        image = Image.fromarray(dataset[i][0], "RGB")
        if image.size != (input_size, input_size):
            scale = input_size / min(image.size)
            w, h = max(input_size, round(image.width * scale)), max(input_size, round(image.height * scale))
            left, top = (w - input_size) // 2, (h - input_size) // 2
            image = image.resize((w, h), Image.BICUBIC).crop((left, top, left + input_size, top + input_size))
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def train_and_heldout(data_path: str, eval_images: int, seed: int):
    """(training images, held-out images): the dataset's test split when it has one; otherwise (a flat image folder,
    a folder without test/ or val/) a fixed random tenth of the images, at most `eval_images`, held out from
    training."""
    train_set = build_dataset(data_path, "train")
    try:
        return train_set, build_dataset(data_path, "test")
    except FileNotFoundError:
        held = min(eval_images, len(train_set) // 10)
        if held < 1:
            raise ValueError(f"{data_path} holds {len(train_set)} images: too few to hold any out for the "
                             "tokenizer's reconstruction check (at least 10 needed)") from None
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
        logger.info("%s has no test split: %d of its %d images are held out for the reconstruction check",
                    data_path, held, len(train_set))
        return Subset(train_set, order[held:]), Subset(train_set, order[:held])


def learning_rate(step: int, cfg: TokenizerTrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(vae: DiscreteVAE, images_u8: torch.Tensor, device: torch.device, batch_size: int = 256) -> dict:
    """Hard-token reconstructions of held-out uint8 images [N, 3, S, S] → metrics (+ the reconstructions)."""
    vae.eval()
    recons, ids = [], []
    for chunk in images_u8.split(batch_size):
        recon, chunk_ids = vae.reconstruct(chunk.to(device).float() / 255)
        recons.append(recon.cpu())
        ids.append(chunk_ids.cpu())
    vae.train()
    recon, ids = torch.cat(recons), torch.cat(ids)
    mse = torch.mean((recon - images_u8.float() / 255) ** 2).item()
    usage = torch.bincount(ids.flatten(), minlength=vae.encoder.vocab_size).float()
    p = usage / usage.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"mse": mse, "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "perplexity": math.exp(entropy),
            "codebook_used": (usage > 0).float().mean().item(), "reconstructions": recon, "token_ids": ids}


def token_colours(token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids [N, h, w] → an RGB map [N, 3, h, w] in [0, 1]: golden-ratio hues, so neighbouring ids differ."""
    hue = (token_ids.double() * 0.6180339887) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)[None, :, None, None] + hue[:, None] * 6) % 6
    return (0.9 - 0.6 * torch.clamp(torch.minimum(k, 4 - k), 0, 1)).float()  # HSV → RGB at s = 0.67, v = 0.9


def save_comparison_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, columns: int = 8,
                         scale: int | None = None, token_ids: torch.Tensor | None = None) -> None:
    """Writes a PNG of groups (original | reconstruction | token map), `columns` groups per row, under a header row
    naming the three; images [N, 3, S, S] in [0, 1], token ids [N, h, w] (the map is left out when None)."""
    panels = [originals, recons]
    names = ["original", "reconstruction"]
    if token_ids is not None:
        size = originals.shape[-1]
        panels.append(torch.nn.functional.interpolate(token_colours(token_ids), size=(size, size), mode="nearest"))
        names.append("tokens")
    groups = torch.stack(panels, dim=1)  # [N, P, 3, S, S]
    columns = max(1, min(columns, groups.shape[0]))  # fewer images than columns: one shorter row
    n, p, s = groups.shape[0] - groups.shape[0] % columns, groups.shape[1], groups.shape[-1]
    pad = torch.nn.functional.pad(groups[:n], (1, 1, 1, 1), value=1.0)  # white border between images
    grid = pad.reshape(n // columns, columns * p, 3, s + 2, s + 2).permute(0, 3, 1, 4, 2)  # [rows, S, cols, S, 3]
    array = (grid.reshape(n // columns * (s + 2), columns * p * (s + 2), 3) * 255).round().byte().numpy()
    image = Image.fromarray(array)
    scale = scale or max(1, 84 // s)  # small images are enlarged (nearest) to about 84 px for viewing
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    header = 14
    labelled = Image.new("RGB", (image.width, image.height + header), "white")
    labelled.paste(image, (0, header))
    draw = ImageDraw.Draw(labelled)
    cell = (s + 2) * scale
    for column in range(columns * p):
        draw.text((column * cell + 2, 1), names[column % p], fill="black")
    labelled.save(path)


def save_interrupted(path: Path, cfg: TokenizerTrainConfig, vae: DiscreteVAE, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, next_step: int, seconds: float) -> None:
    """Everything the next run needs to continue exactly at `next_step` (written atomically)."""
    state = {"next_step": next_step, "seconds": seconds, "vae": vae.state_dict(), "optimizer": optimizer.state_dict(),
             "batch_rng": generator.get_state(), "torch_rng": torch.get_rng_state(), "settings": json.dumps(
                 config_to_dict(cfg), sort_keys=True, default=str),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def resume_interrupted(path: Path, cfg: TokenizerTrainConfig, vae: DiscreteVAE, optimizer: torch.optim.Optimizer,
                       generator: torch.Generator) -> tuple[int, float]:
    """(first step, seconds already trained): from an interrupted run's state in `path`, else (0, 0). The state of
    a run with other settings is refused (continuing it would mix two runs)."""
    if not path.is_file():
        return 0, 0.0
    state = torch.load(path, weights_only=True)
    if state["settings"] != json.dumps(config_to_dict(cfg), sort_keys=True, default=str):
        raise ConfigError(f"{path} holds a stopped tokenizer training with other settings: rerun with those, or "
                          f"delete it (or choose another --output_dir) to start afresh")
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    vae.load_state_dict(state["vae"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    logger.info("continuing the interrupted tokenizer training at step %d (%s)", state["next_step"], path)
    return state["next_step"], state["seconds"]


def _build_vae(cfg: TokenizerTrainConfig) -> DiscreteVAE:
    arch = dict(group_count=cfg.group_count, n_hid=cfg.n_hid, n_blk_per_group=cfg.n_blk_per_group,
                vocab_size=cfg.vocab_size)
    if cfg.input_size % 2 ** (cfg.group_count - 1):
        raise ValueError(f"input_size {cfg.input_size} must be divisible by 2^(group_count-1) = "
                         f"{2 ** (cfg.group_count - 1)}")
    return DiscreteVAE(DalleEncoder(**arch), DalleDecoder(n_init=cfg.n_init, **arch), cfg.recon_loss,
                       cfg.hard_gumbel)


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict:
    """Trains, evaluates and saves a tokenizer; returns the final metrics. `cfg.num_threads` and flushing denormals
    apply to this call only: a caller that trains next in the same process (the pretraining demo) keeps its own thread
    count and IEEE denormals (flushing them is process-wide and would change its arithmetic)."""
    threads = torch.get_num_threads()
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        return _train_tokenizer(cfg)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)  # the default of a new process; torch cannot read the previous mode


def _train_tokenizer(cfg: TokenizerTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # low-temperature softmaxes underflow to denormals, which crawl on CPUs
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.json")

    train_set, held_set = train_and_heldout(cfg.data_path, cfg.eval_images, cfg.seed)
    train_u8 = images_to_uint8(train_set, cfg.input_size, cfg.max_train_images)
    held_u8 = images_to_uint8(held_set, cfg.input_size, cfg.eval_images)
    vae = _build_vae(cfg).to(device)
    grid = cfg.input_size // vae.encoder.downsample
    logger.info("dVAE on %s: %.2fM params, %d train / %d held-out images of %d px → %dx%d tokens, vocab %d",
                device, sum(p.numel() for p in vae.parameters()) / 1e6, len(train_u8), len(held_u8),
                cfg.input_size, grid, grid, cfg.vocab_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    first_step, earlier_seconds = resume_interrupted(out_dir / INTERRUPTED_FILE, cfg, vae, optimizer, generator)
    stop = StopSignal()
    start = tick = time.perf_counter()
    for step in range(first_step, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        tau = gumbel_temperature(step, cfg.temperature_anneal_steps, cfg.temperature_start, cfg.temperature_end)
        beta = kl_weight(step, cfg.kl_warmup_steps, cfg.kl_max_weight)
        batch = train_u8[torch.randint(len(train_u8), (cfg.batch_size,), generator=generator)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = vae(batch.to(device).float() / 255, tau, beta)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: lower --lr or --kl_max_weight")
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            dt, tick = time.perf_counter() - tick, time.perf_counter()
            logger.info("step %5d | loss %.4f | recon %.4f | kl %.3f | tau %.3f | beta %.4f | lr %.2e | grad %.2f | "
                        "%.0f img/s", step + 1, out["loss"].item(), out["recon"].item(), out["kl"].item(), tau, beta,
                        optimizer.param_groups[0]["lr"], grad_norm.item(), cfg.log_every * cfg.batch_size / dt)
        if stop.poll() and step + 1 < cfg.steps:
            stop.restore()
            save_interrupted(out_dir / INTERRUPTED_FILE, cfg, vae, optimizer, generator, step + 1,
                             earlier_seconds + time.perf_counter() - start)
            raise SystemExit(f"tokenizer training stopped by {stop.received} after step {step + 1} of {cfg.steps}; "
                             f"its state is in {out_dir / INTERRUPTED_FILE}: run the same command again to continue")
    stop.restore()
    train_seconds = earlier_seconds + time.perf_counter() - start

    metrics = evaluate(vae, held_u8, device)
    recon, token_ids = metrics.pop("reconstructions"), metrics.pop("token_ids")
    save_comparison_grid(held_u8[:32].float() / 255, recon[:32], out_dir / "reconstructions.png",
                         token_ids=token_ids[:32])
    metrics.update(train_seconds=train_seconds, steps=cfg.steps, token_grid=[grid, grid], input_size=cfg.input_size,
                   vocab_size=cfg.vocab_size)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / INTERRUPTED_FILE).unlink(missing_ok=True)
    save_tokenizer(out_dir / "tokenizer", vae.encoder, cfg.input_size, vae.decoder)
    logger.info("held-out: mse %.4f | psnr %.2f dB | codebook used %.1f%% | perplexity %.1f | %.0f s → %s",
                metrics["mse"], metrics["psnr"], 100 * metrics["codebook_used"], metrics["perplexity"],
                train_seconds, out_dir / "tokenizer")
    return metrics
