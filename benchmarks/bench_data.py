"""Input-pipeline throughput per worker core, next to what one GPU consumes at the MFU goal.

    python benchmarks/bench_data.py                        # one process pinned to one core, every pipeline
    python benchmarks/bench_data.py --workers=2            # a DataLoader with 2 workers (figures per worker)
    python benchmarks/bench_data.py --data_path=/data/imagenet --pipelines=pretrain,eval

Pipelines, each the dataset + transform a training task builds (file read and decode included):
- `pretrain`: MIM samples, both views (224 bicubic + 112 lanczos from one crop, colour jitter, flip) and the mask;
- `finetune`: timm's training transform (RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1, erasing box);
- `eval`: resize to 256 + centre crop 224;
- `segmentation`: the ADE20K training pipeline at a 512 crop (resize with ratio 0.5-2, crop, flip, photometric).

`--data_path` is an image folder (class subfolders or flat; `train/` is used when present); without it the benchmark
writes, once, 256 ImageNet-like JPEGs (sizes around ImageNet's 500x375, quality 90) from the embedded photos
(benchmarks/fixtures.py). Segmentation reads an ADE20K root (`--seg_data_path`) or a generated 512 px set.

`--workers=1` runs the pipeline in this process, pinned to one core with one torch thread; `--workers=N` iterates a
DataLoader with N workers (batch 32) and divides by N (on a machine with N spare cores, the main process's collation
included). Each figure is images over wall time after a warm-up, for at least `--seconds`.

`--data_backend=dali` measures pretraining through NVIDIA DALI (engine/data/dali.py: decode and resampling on the
GPU, or in DALI's CPU mode without one), `--workers` DataLoader workers drawing the parameters: rows give img/s per
device (`img_per_s`) and the CPU processes used.

`--stages=true` instead times the stages of the pretraining and fine-tuning workers one by one (ms per image, one
core; rows in data_stages.jsonl): what limits them.

`--startup_files=N` instead times building the training dataset twice over a folder of N small JPEGs in 100 class
folders (generated once): start-up cost per rank, without (first) and with (second) the folder index.

Each row also gives the feed requirement: the images per second one GPU trains at `--mfu` of the device's dense bf16
peak (engine/train/flops.py; BEiT-B and BEiT-L at 224 px, 75 masked patches for pretraining; eval counts the forward
only; segmentation the encoder at 512 px only, the UperNet head left out, so its requirement is an upper bound) and
the worker cores per GPU that this pipeline needs to keep up. Rows go to benchmarks/results/data.jsonl.
"""

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_rows, environment  # noqa: E402
from engine.config import ConfigError, parse_overrides  # noqa: E402

PIPELINES = ("pretrain", "finetune", "eval", "segmentation")
BATCH_SIZE = 32
# what each pipeline feeds: (model for the FLOP count, image size, masked patches, training?)
_FEEDS = {"pretrain": ("{size}_patch16_224_8k_vocab", 224, 75, True),
          "finetune": ("{size}_patch16_224", 224, None, True),
          "eval": ("{size}_patch16_224", 224, None, False),
          "segmentation": ("{size}_patch16_224", 512, None, True)}


@dataclass
class DataBenchConfig:
    pipelines: str = "pretrain,finetune,eval,segmentation"
    workers: int = 1  # 1: this process on one core; N: a DataLoader with N workers
    data_backend: str = "pil"  # pil | dali (pretraining only)
    data_path: str = ""  # an image folder; default: ImageNet-like JPEGs generated once under cache_dir
    seg_data_path: str = ""  # an ADE20K root; default: a 512 px set generated once under cache_dir
    images: int = 256  # size of the generated sets
    seconds: float = 5.0  # least measuring time per pipeline
    device: str = "H100"  # the GPU whose bf16 peak sets the feed requirement (H100 = SXM; a key of flops._PEAK_TFLOPS)
    mfu: float = 0.45  # the MFU goal of the kernels
    startup_files: int = 0  # > 0: time two dataset builds over a folder of this many files instead
    stages: bool = False  # time the workers' stages one by one instead
    cache_dir: str = "~/.cache/beit-engine/bench"
    out: str = ""  # results directory (default benchmarks/results)


def machine() -> str:
    """The CPU model and core count, e.g. 'Intel(R) Xeon(R) ... (2 cores)'."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def feed_requirement(pipeline: str, device: str, mfu: float) -> dict:
    """{"beit_base": img/s, "beit_large": img/s} one `device` GPU consumes at `mfu` in this pipeline's job."""
    from engine.factory import registered_config
    from engine.train.flops import _PEAK_TFLOPS, forward_flops_per_image

    peaks = dict(_PEAK_TFLOPS)
    if device not in peaks:
        raise ConfigError(f"--device={device!r} is not in the peak table; choose from {', '.join(peaks)}")
    model, img_size, masked, training = _FEEDS[pipeline]
    feeds = {}
    for size in ("base", "large"):
        config = dict(registered_config("beit_" + model.format(size=size)), img_size=img_size)
        flops = forward_flops_per_image(config, masked) * (3 if training else 1)
        feeds[f"beit_{size}"] = round(mfu * peaks[device]["bf16"] * 1e12 / flops)
    return feeds


def build_pipeline(pipeline: str, image_folder: str, seg_root: str):
    """The dataset a training task would build for `pipeline` (its samples are what workers produce)."""
    from engine.data.datasets import build_dataset
    from engine.data.loader import ClassificationDataset, MIMPretrainDataset, SegmentationSamples
    from engine.data.masking import MaskingGenerator
    from engine.data.segmentation import ADE20KDataset, SegTrainTransform
    from engine.data.transforms import EvalTransform, FinetuneTransform, PretrainTransform

    if pipeline == "segmentation":
        return SegmentationSamples(ADE20KDataset(seg_root, "training"), SegTrainTransform(512))
    images = build_dataset(image_folder, "train")
    if pipeline == "pretrain":
        return MIMPretrainDataset(images, PretrainTransform(), MaskingGenerator((14, 14), 75, 16, None))
    transform = FinetuneTransform() if pipeline == "finetune" else EvalTransform()
    return ClassificationDataset(images, transform)


def images_per_second(dataset, workers: int, seconds: float) -> float:
    """Samples per second of `dataset` in this process (workers=1) or through a DataLoader with `workers`."""
    if workers == 1:
        for index in range(min(16, len(dataset))):  # warm-up: page cache, lazy imports
            dataset[index]
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            dataset[count % len(dataset)]
            count += 1
        return count / (time.perf_counter() - start)
    from engine.data.loader import build_loader

    return loader_images_per_second(build_loader(dataset, BATCH_SIZE, num_workers=workers), seconds)


def loader_images_per_second(loader, seconds: float) -> float:
    """Samples per second a loader yields, from its second batch on (the first waits for the workers to start)."""
    from engine.data.loader import set_loader_epoch

    count, epoch, start = 0, 0, None
    while start is None or time.perf_counter() - start < seconds:
        set_loader_epoch(loader, epoch)
        for batch in loader:
            if start is None:  # the first batch waits for the workers to start
                start = time.perf_counter()
                continue
            count += len(batch[-1])  # labels or masks: one per sample in every pipeline
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    return count / (time.perf_counter() - start)


def dali_row(cfg: DataBenchConfig, image_folder: str, base: dict, feed: dict) -> dict:
    """Pretraining batches per second through the DALI backend, on the GPU when there is one."""
    import torch

    from engine.data.dali import build_dali_pretrain_loader
    from engine.data.datasets import build_dataset
    from engine.data.masking import MaskingGenerator
    from engine.data.transforms import PretrainTransform

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = cfg.workers if cfg.workers > 1 else 0
    loader = build_dali_pretrain_loader(build_dataset(image_folder, "train"), PretrainTransform(),
                                        MaskingGenerator((14, 14), 75, 16, None), BATCH_SIZE, 0, 1, 0, workers, device)
    images_per_s = loader_images_per_second(loader, cfg.seconds)
    row = dict(base, pipeline="pretrain", data_backend="dali", dali_device=device.type,
               img_per_s=round(images_per_s, 1), cpu_processes=workers + 1, gpu_img_per_s=feed)
    append_rows("data", [row], cfg.out or None)
    return row


def stage_rows(image_folder: str) -> list[dict]:
    """Milliseconds per image of each worker stage on one core (median over the folder's images, 3 passes)."""
    import random

    import numpy as np
    from PIL import Image

    from engine.data.datasets import build_dataset
    from engine.data.pixels import affine, resampler, resized_crop, rotation_coefficients
    from engine.data.transforms import FinetuneTransform, PretrainTransform

    images = build_dataset(image_folder, "train")
    pixels = [images[i][0] for i in range(len(images))]
    pretrain, finetune = PretrainTransform(), FinetuneTransform()
    draws = [pretrain.draw(p.shape[1], p.shape[0], random.Random(i)) for i, p in enumerate(pixels)]
    views = [resized_crop(p, d[2], 224, "bicubic").permute(1, 2, 0).numpy() for p, d in zip(pixels, draws)]
    pil_images = [Image.fromarray(p) for p in pixels]
    pil_boxes = [(left, top, left + width, top + height) for _, _, (top, left, height, width) in draws]
    stages = {
        "decode (simplejpeg)": lambda i: images.read(i),
        "decode (PIL), replaced": lambda i: np.asarray(Image.open(images.samples[i][0]).convert("RGB")),
        "PIL round trip (fromarray + asarray), avoided": lambda i: np.asarray(Image.fromarray(pixels[i])),
        f"patch view 224 bicubic ({resampler()})": lambda i: resized_crop(pixels[i], draws[i][2], 224, "bicubic"),
        "patch view 224 bicubic (PIL), replaced": lambda i: pil_images[i].resize(
            (224, 224), Image.Resampling.BICUBIC, box=pil_boxes[i]),
        f"tokenizer view 112 lanczos ({resampler()})": lambda i: resized_crop(pixels[i], draws[i][2], 112, "lanczos"),
        "tokenizer view 112 lanczos (PIL), replaced": lambda i: pil_images[i].resize(
            (112, 112), Image.Resampling.LANCZOS, box=pil_boxes[i]),
        "jitter params + contrast mean": lambda i: pretrain.color_jitter.params(draws[i][0], pixels[i]),
        f"rotation of a 224 view, bicubic ({resampler()})": lambda i: affine(
            views[i], rotation_coefficients(15.0, 224, 224), "bicubic", (124, 116, 104)),
        "rotation of a 224 view, bicubic (PIL), replaced": lambda i: Image.fromarray(views[i]).rotate(
            15.0, resample=Image.Resampling.BICUBIC, fillcolor=(124, 116, 104)),
        "RandAugment on a 224 view": lambda i: finetune.color_op(Image.fromarray(views[i]), random.Random(i)),
    }
    rows = []
    for name, stage in stages.items():
        passes = []
        for _ in range(3):
            start = time.perf_counter()
            for index in range(len(pixels)):
                stage(index)
            passes.append((time.perf_counter() - start) / len(pixels) * 1e3)
        rows.append({"stage": name, "ms_per_image": round(sorted(passes)[1], 3)})
    return rows


def startup_row(cfg: DataBenchConfig, cache: Path) -> dict:
    """Seconds to build the dataset over `startup_files` JPEGs: first build (no index) and second; and the bytes per
    sample of its sample table against the list of (path, label) tuples it replaced (tracemalloc)."""
    import io
    import tracemalloc

    from PIL import Image

    from engine.data.datasets import build_dataset

    root = cache / f"startup_{cfg.startup_files}"
    if not (root / ".complete").is_file():
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), (90, 120, 30)).save(buffer, "JPEG")
        for index in range(cfg.startup_files):
            folder = root / "train" / f"n{index % 100:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:08d}.JPEG").write_bytes(buffer.getvalue())
        (root / ".complete").write_text("")
    for index_dir in (root / "train").glob(".beit-index"):  # the first build is a cold one
        for file in index_dir.iterdir():
            file.unlink()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        dataset = build_dataset(str(root), "train")
        times.append(round(time.perf_counter() - start, 3))
    table = dataset.samples
    tracemalloc.start()
    as_tuples = list(table)
    tuple_bytes = tracemalloc.get_traced_memory()[0] / len(as_tuples)
    tracemalloc.stop()
    table_bytes = sum(array.nbytes for array in (table._names, table._offsets, table.labels)) / len(table)
    return dict(environment("cpu"), machine=machine(), files=cfg.startup_files, first_build_s=times[0],
                second_build_s=times[1], sample_bytes_as_tuples=round(tuple_bytes, 1),
                sample_bytes_as_table=round(table_bytes, 1))


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_overrides(DataBenchConfig(), sys.argv[1:] if argv is None else argv)
    if cfg.stages:
        import torch

        from benchmarks.fixtures import imagenet_like_folder

        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        folder = cfg.data_path or str(imagenet_like_folder(Path(cfg.cache_dir).expanduser() /
                                                           f"imagenet_like_{cfg.images}", cfg.images))
        base = dict(environment("cpu"), machine=machine(), data_path=cfg.data_path or "generated")
        rows = [dict(base, **row) for row in stage_rows(folder)]
        append_rows("data_stages", rows, cfg.out or None)
        return rows
    if cfg.startup_files > 0:
        row = startup_row(cfg, Path(cfg.cache_dir).expanduser())
        append_rows("data_startup", [row], cfg.out or None)
        return [row]
    pipelines = [name for name in cfg.pipelines.split(",") if name]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown or not pipelines:
        raise SystemExit(f"bench_data.py: unknown pipeline {', '.join(unknown) or '(none)'}; choose from "
                         f"{', '.join(PIPELINES)}")
    if cfg.workers < 1 or cfg.seconds <= 0 or not 0 < cfg.mfu <= 1 or cfg.images < 1:
        raise SystemExit("bench_data.py: need --workers >= 1, --seconds > 0, 0 < --mfu <= 1 and --images >= 1")
    if cfg.data_backend not in ("pil", "dali") or (cfg.data_backend == "dali" and pipelines != ["pretrain"]):
        raise SystemExit("bench_data.py: --data_backend is pil or dali; dali runs --pipelines=pretrain only")
    feeds = {name: feed_requirement(name, cfg.device, cfg.mfu) for name in pipelines}  # checks --device first

    import torch

    from benchmarks.fixtures import imagenet_like_folder

    cache = Path(cfg.cache_dir).expanduser()
    image_folder = cfg.data_path or str(imagenet_like_folder(cache / f"imagenet_like_{cfg.images}", cfg.images))
    seg_root = cfg.seg_data_path
    if "segmentation" in pipelines and not seg_root:
        from engine.data.demo_segmentation import build_demo_segmentation

        seg_root = str(build_demo_segmentation(cache / f"ade_like_512_{cfg.images}", num_train=cfg.images, num_val=1,
                                               image_size=512))
    if cfg.workers == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
    from engine.data.pixels import resampler

    base = dict(environment("cpu"), machine=machine(), workers=cfg.workers, data_path=cfg.data_path or "generated",
                feed_device=cfg.device, feed_mfu=cfg.mfu, resampler=resampler())
    if cfg.data_backend == "dali":
        return [dali_row(cfg, image_folder, base, feeds["pretrain"])]
    rows = []
    for name in pipelines:
        dataset = build_pipeline(name, image_folder, seg_root)
        per_core = images_per_second(dataset, cfg.workers, cfg.seconds) / cfg.workers
        feed = feeds[name]
        rows.append(dict(base, pipeline=name, data_backend="pil", img_per_s_per_core=round(per_core, 1),
                         gpu_img_per_s=feed,
                         cores_per_gpu={model: round(need / per_core, 1) for model, need in feed.items()}))
    append_rows("data", rows, cfg.out or None)
    return rows


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        raise SystemExit(f"bench_data.py: {error}") from None
