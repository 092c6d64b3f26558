"""Training throughput of the BEiT masked-image-modelling step: img/s, MFU and peak memory per configuration.

    python benchmarks/bench_train.py                       # GPU: beit_base at 224, bf16; CPU: a tiny model, fp32
    python benchmarks/bench_train.py --model=beit_large_patch16_224_8k_vocab --batch_size=64
    python benchmarks/bench_train.py --attn_impls=sdpa,triton --compile_modes=off --tokenizer_modes=excluded --out=DIR

Each configuration (attn_impl × torch.compile × tokenizer in/out of the step) builds a DeepSpeed engine exactly as
the trainer does (1 rank, ZeRO 0, AdamW, clipping) and times `steps` optimizer steps after `warmup` on synthetic
images with real block masks. The tokenizer is a randomly initialised DALL-E-sized dVAE encoder (same FLOPs as the
real one). MFU counts model FLOPs only (engine/train/flops.py), even when the tokenizer runs in the step. Triton
kernels need CUDA: on CPU they only run under TRITON_INTERPRET=1, far too slowly to time, so CPU rows skip "triton"
unless that variable is set (then they show that the path runs, as the kernel scripts' interpreter rows do). On CPU
the model is always a small patch-4 one: a GPU-size `--model` is replaced by it (said on stdout, kept in the row as
`requested_model`).

The optimizer is the trainer's (`--optimizer=deepspeed`: DeepSpeed FusedAdam on CUDA, torch AdamW on CPU). Its CUDA op
is compiled on first use, which needs nvcc; a DeepSpeed installed without prebuilt ops on a machine without nvcc (a
bare GPU node) cannot build it, and `--optimizer=auto` (default) then times torch's fused AdamW instead, saying so
and naming it in the row's `optimizer` field; `--optimizer=torch` always does.
Rows are appended to benchmarks/results/train.jsonl (or `--out=DIR`/train.jsonl) with benchmarks/common.py's
environment fields (device, versions, commit, date) plus the DeepSpeed version.
"""

import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import INTERPRETER_NOTE, append_rows, environment  # noqa: E402

from engine.config import ConfigError, parse_overrides  # noqa: E402

CPU_MODEL = "beit_tiny_patch4_32_8k_vocab"  # built at 28 px with 4 blocks on CPU (see _build_model)
CHOICES = {"attn_impls": ("eager", "sdpa", "triton"), "compile_modes": ("off", "on"),
           "tokenizer_modes": ("excluded", "included")}
OPTIMIZERS = ("auto", "deepspeed", "torch")


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
    optimizer: str = "auto"  # deepspeed (the trainer's), torch (fused AdamW), auto (deepspeed, else torch)
    out: str = ""  # directory of train.jsonl; "" → benchmarks/results/

    def validate(self) -> None:
        """Every list entry and name is checked before any work, so a typo costs no GPU time."""
        from engine.factory import registered_config

        for key, allowed in CHOICES.items():
            bad = [item for item in getattr(self, key).split(",") if item not in allowed]
            if bad:
                raise ConfigError(f"--{key}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer={self.optimizer}: choose from {', '.join(OPTIMIZERS)}")
        if self.model:
            try:
                registered_config(self.model)
            except ValueError as error:
                raise ConfigError(f"--model: {error}") from None


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


_deepspeed_optimizer_error: str | None = None  # why DeepSpeed's optimizer could not be built, once known


def _build_optimizer(cfg: BenchConfig, model, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's optimizer, or torch's fused AdamW (same hyper-parameters) per `cfg.optimizer` (module doc)."""
    global _deepspeed_optimizer_error
    from engine.param_groups import param_groups
    from engine.train.optim import ADAM_BETAS, ADAM_EPS, build_optimizer

    groups = param_groups(model, 0.05)
    if cfg.optimizer == "deepspeed" or (cfg.optimizer == "auto" and _deepspeed_optimizer_error is None):
        try:
            return build_optimizer(groups, 1e-4, device.type)
        except Exception as error:  # a JIT build without nvcc fails in many ways (RuntimeError, OSError, ...)
            if cfg.optimizer == "deepspeed":
                raise
            _deepspeed_optimizer_error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"bench_train: the trainer's optimizer is unavailable ({_deepspeed_optimizer_error}); "
                  "timing torch's fused AdamW instead")
    clean = [{k: v for k, v in group.items() if k != "param_names"} for group in groups]
    return torch.optim.AdamW(clean, lr=1e-4, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)


def bench_one(cfg: BenchConfig, attn_impl: str, compiled: bool, with_tokenizer: bool, dist_info) -> dict:
    import deepspeed

    from engine.data.masking import MaskingGenerator
    from engine.train.deepspeed_config import build_deepspeed_config
    from engine.train.flops import device_peak_flops, train_flops_per_image
    from engine.train.loop import input_dtype, train_step
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
    optimizer = _build_optimizer(cfg, model, device)
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
        "tokenizer": "included" if with_tokenizer else "excluded", "optimizer": type(optimizer).__name__,
        "img_per_s": round(img_per_s, 2),
        "step_ms": round(1000 * elapsed / cfg.steps, 2), "gflop_per_img": round(flops / 1e9, 3),
        "mfu": round(flops * img_per_s / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else
        round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_mem_kind": "cuda max_memory_allocated" if on_gpu else "process max RSS",
    }


def _cpu_model(requested: str) -> str:
    """The model a CPU run builds: `requested` when it is a patch-4 model (28 px → 7×7 tokens), else CPU_MODEL."""
    from engine.factory import registered_config

    if requested and registered_config(requested)["patch_size"] == 4:
        return requested
    if requested:
        print(f"bench_train: on CPU {CPU_MODEL} (4 blocks, 28 px) replaces --model={requested}")
    return CPU_MODEL


def main(argv: list[str] | None = None) -> None:
    try:
        import deepspeed
    except ImportError as error:
        raise SystemExit(f"bench_train needs DeepSpeed ({error}): pip install deepspeed, or on a node without network "
                         "carry the wheels of `make gpu-wheels` (benchmarks/README.md)") from None

    from engine.train.runtime import init_distributed

    logging.basicConfig(level=logging.WARNING)
    cfg = parse_overrides(BenchConfig(), [] if argv is None else argv)
    dist_info = init_distributed("auto")
    on_gpu = dist_info.device.type == "cuda"
    requested_model = cfg.model
    cfg.model = (cfg.model or "beit_base_patch16_224_8k_vocab") if on_gpu else _cpu_model(cfg.model)
    cfg.batch_size = cfg.batch_size or (128 if on_gpu else 32)
    cfg.precision = cfg.precision or ("bf16" if on_gpu else "fp32")
    cfg.mlm_loss = cfg.mlm_loss or ("fused" if on_gpu else "reference")
    if not on_gpu:
        cfg.steps, cfg.warmup = min(cfg.steps, 5), min(cfg.warmup, 2)
    meta = {**environment(dist_info.device.type), "deepspeed": deepspeed.__version__}
    if requested_model and requested_model != cfg.model:
        meta["requested_model"] = requested_model
    interpreted = not on_gpu and os.environ.get("TRITON_INTERPRET", "0") == "1"
    path = None
    for attn_impl in cfg.attn_impls.split(","):
        if attn_impl == "triton" and not on_gpu and not interpreted:
            print("attn_impl=triton skipped: Triton kernels need CUDA (or TRITON_INTERPRET=1 to see the path run)")
            continue
        note = {"note": INTERPRETER_NOTE} if interpreted else {}
        for compile_mode in cfg.compile_modes.split(","):
            for tok_mode in cfg.tokenizer_modes.split(","):
                row = bench_one(cfg, attn_impl, compile_mode == "on", tok_mode == "included", dist_info)
                path = append_rows("train", [{**meta, **note, **row}], cfg.out or None)
    print(f"rows appended to {path}" if path else "no rows: every configuration was skipped")


if __name__ == "__main__":
    main(sys.argv[1:])
