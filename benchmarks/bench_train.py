"""Training throughput of the BEiT masked-image-modelling step: img/s, MFU and peak memory per configuration.

    python benchmarks/bench_train.py                       # GPU: beit_base at 224, bf16; CPU: a tiny model, fp32
    python benchmarks/bench_train.py --model=beit_large_patch16_224_8k_vocab --batch_size=64

Each configuration (attn_impl × torch.compile × tokenizer in/out of the step) builds a DeepSpeed engine exactly as
the trainer does (1 rank, ZeRO 0, AdamW, clipping) and times `steps` optimizer steps after `warmup` on synthetic
images with real block masks. The tokenizer is a randomly initialised DALL-E-sized dVAE encoder (same FLOPs as the
real one). MFU counts model FLOPs only (engine/train/flops.py), even when the tokenizer runs in the step. Triton
kernels need CUDA (on CPU they only run under TRITON_INTERPRET, far too slowly to time), so CPU rows skip "triton".
Rows are appended to benchmarks/results/train.jsonl with benchmarks/common.py's environment fields (device, versions,
commit, date) plus the DeepSpeed version.
"""

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_rows, environment  # noqa: E402

from engine.config import parse_overrides  # noqa: E402


@dataclass
class BenchConfig:
    model: str = ""  # "" → beit_base_patch16_224_8k_vocab on GPU, a 4-block tiny model at 28 px on CPU
    batch_size: int = 0  # 0 → 128 on GPU, 32 on CPU
    steps: int = 20
    warmup: int = 5
    precision: str = ""  # "" → bf16 on GPU, fp32 on CPU
    mlm_loss: str = ""  # "" → "fused" on GPU, "reference" on CPU
    attn_impls: str = "eager,sdpa,triton"
    compile_modes: str = "off,on"
    tokenizer_modes: str = "excluded,included"


def _build_model(cfg: BenchConfig, attn_impl: str, on_gpu: bool, max_masked_per_image: int):
    """The same masked-token loss (`cfg.mlm_loss`) for every attention backend, so rows compare attention alone."""
    from engine.factory import create_model

    mlm = dict(mlm_loss=cfg.mlm_loss, max_masked_per_image=max_masked_per_image)
    if on_gpu:
        return create_model(cfg.model, attn_impl=attn_impl, **mlm)
    return create_model(cfg.model, attn_impl=attn_impl, img_size=28, depth=4, vocab_size=512, **mlm)


def _build_tokenizer(model, device: torch.device):
    """A random dVAE encoder whose token grid matches the model: DALL-E size on GPU, a small one on CPU."""
    from engine.tokenizer import VisualTokenizer
    from engine.tokenizer.dalle import DalleEncoder

    grid = model.patch_embed.patch_shape[0]
    if device.type == "cuda":
        encoder = DalleEncoder(group_count=4, n_hid=256, n_blk_per_group=2, vocab_size=model.config["vocab_size"])
    else:
        encoder = DalleEncoder(group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=model.config["vocab_size"])
    return VisualTokenizer(encoder, grid * encoder.downsample).prepare(device)


def bench_one(cfg: BenchConfig, attn_impl: str, compiled: bool, with_tokenizer: bool, dist_info) -> dict:
    import deepspeed

    from engine.data.masking import MaskingGenerator
    from engine.train.deepspeed_config import build_deepspeed_config
    from engine.train.flops import device_peak_flops, train_flops_per_image
    from engine.train.loop import input_dtype, train_step
    from engine.train.optim import build_optimizer, param_groups
    from engine.train.pretrain import MaskedImageModelingLoss
    from engine.train.settings import OptimSettings, RunSettings

    device, on_gpu = dist_info.device, dist_info.device.type == "cuda"
    torch.manual_seed(0)
    grid_side = 14 if on_gpu else 7  # the GPU default is 224 px / patch 16, the CPU model 28 px / patch 4
    num_masked = round(0.4 * grid_side * grid_side)  # 75 of 196 at 224 px
    model = _build_model(cfg, attn_impl, on_gpu, num_masked)
    tokenizer = _build_tokenizer(model, device)
    grid = model.patch_embed.patch_shape
    wrapper = MaskedImageModelingLoss(model)
    if compiled:
        wrapper.compile()
    run = RunSettings(batch_size=cfg.batch_size, precision=cfg.precision, zero_stage=0)
    optimizer = build_optimizer(param_groups(model, 0.05), 1e-4, device.type)
    engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer,
                                      config=build_deepspeed_config(run, OptimSettings(clip_grad=3.0), 1))
    masking = MaskingGenerator(grid, num_masked, min_num_patches=min(16, num_masked // 4))
    masks = torch.from_numpy(masking.batch(0, 0, range(cfg.batch_size)).reshape(cfg.batch_size, -1)).to(device)
    img = model.config["img_size"]
    images = torch.randn(cfg.batch_size, 3, img, img, device=device, dtype=input_dtype(cfg.precision))
    tok_images = torch.rand(cfg.batch_size, 3, tokenizer.input_size, tokenizer.input_size, device=device)
    fixed_labels = tokenizer.get_codebook_indices(tok_images)

    class SyntheticBatches:
        """The trainer's task interface over one fixed batch: labels from the tokenizer in the step, or fixed."""

        def inputs(self, batch, step):
            labels = tokenizer.get_codebook_indices(tok_images) if with_tokenizer else fixed_labels
            return images, masks, labels

    task, batches = SyntheticBatches(), iter(lambda: None, object())  # endless stream of placeholder batches

    def step():
        train_step(engine, task, batches, 1, 0)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(cfg.warmup):
        step()
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    img_per_s = cfg.batch_size * cfg.steps / elapsed
    flops = train_flops_per_image(model.config, float(masks.sum()) / cfg.batch_size)
    peak = device_peak_flops(device, cfg.precision)
    return {
        "model": model.config["name"], "img_size": img, "depth": model.config["depth"],
        "batch_size": cfg.batch_size, "precision": cfg.precision, "attn_impl": attn_impl, "compile": compiled,
        "mlm_loss": cfg.mlm_loss,
        "tokenizer": "included" if with_tokenizer else "excluded", "img_per_s": round(img_per_s, 2),
        "step_ms": round(1000 * elapsed / cfg.steps, 2), "gflop_per_img": round(flops / 1e9, 3),
        "mfu": round(flops * img_per_s / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else
        round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_mem_kind": "cuda max_memory_allocated" if on_gpu else "process max RSS",
    }


def main() -> None:
    import deepspeed

    from engine.train.runtime import init_distributed

    logging.basicConfig(level=logging.WARNING)
    cfg = parse_overrides(BenchConfig(), sys.argv[1:])
    dist_info = init_distributed("auto")
    on_gpu = dist_info.device.type == "cuda"
    cfg.model = cfg.model or ("beit_base_patch16_224_8k_vocab" if on_gpu else "beit_tiny_patch4_32_8k_vocab")
    cfg.batch_size = cfg.batch_size or (128 if on_gpu else 32)
    cfg.precision = cfg.precision or ("bf16" if on_gpu else "fp32")
    cfg.mlm_loss = cfg.mlm_loss or ("fused" if on_gpu else "reference")
    if not on_gpu:
        cfg.steps, cfg.warmup = min(cfg.steps, 5), min(cfg.warmup, 2)
    meta = {**environment(dist_info.device.type), "deepspeed": deepspeed.__version__}
    for attn_impl in cfg.attn_impls.split(","):
        if attn_impl == "triton" and not on_gpu:
            print("attn_impl=triton skipped: Triton kernels need CUDA")
            continue
        for compile_mode in cfg.compile_modes.split(","):
            for tok_mode in cfg.tokenizer_modes.split(","):
                path = append_rows("train", [{**meta, **bench_one(cfg, attn_impl, compile_mode == "on",
                                                                 tok_mode == "included", dist_info)}])
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
