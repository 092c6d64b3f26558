"""The DALI data backend of pretraining (`--data_backend=dali`): images decoded and both views resampled by NVIDIA
DALI, on the GPU (nvJPEG) or, on a CPU device, in DALI's CPU mode.

What stays the engine's: the sample order, sharding and resume (EpochShardSampler), every random draw (jitter, flip,
crop box, from (seed, epoch, index)), the masks and the colour jitter (applied in batch on the device). DataLoader
workers only read each sample's encoded bytes and draw its parameters from the header's image size, no decode
(`PretrainDraws`); the main process hands each batch to a DALI pipeline that decodes, crops the drawn box, resamples
it to both views (cubic and Lanczos-3, antialiased), flips them, and makes a 64x64 thumbnail of the whole image from
which the contrast op's grey mean is computed on the device. So a batch has the PIL backend's structure and the same
draws; its pixels differ by DALI's resampling (tests/test_data_dali.py bounds that against the official pipeline).

When to choose it: when the CPU cores of a node cannot feed its GPUs (benchmarks/bench_data.py prints the cores per
GPU each pipeline needs). Limits: pretraining only (fine-tuning's RandAugment is PIL's), image folders and shards
only; a file whose header is not an image's is replaced as in the PIL backend, but one that is cut short after a valid
header stops the run with DALI's error (the PIL backend replaces it).
"""

from __future__ import annotations

import logging
import random

import torch

from engine.config import ConfigError
from engine.data.color_jitter import contrast_means
from engine.data.loader import MIMPretrainDataset, build_loader

logger = logging.getLogger(__name__)

THUMBNAIL = 64  # side of the whole-image thumbnail the contrast mean is read from
INSTALL_HINT = "pip install nvidia-dali-cuda120 (CUDA 12; nvidia-dali-cuda130 for CUDA 13), or --data_backend=pil"


def require_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ConfigError(f"--data_backend=dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}") from None


class EncodedImages:
    """An encoded-image dataset seen as `dataset[i]` → ((bytes, (width, height)), label), no decode."""

    def __init__(self, base):
        if not hasattr(base, "encoded"):
            raise ConfigError(f"--data_backend=dali reads image folders and shards; {type(base).__name__} holds "
                              "decoded images (use --data_backend=pil)")
        self.base = base
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base.encoded(index)


class PretrainDraws:
    """A PretrainTransform's draws, without its pixels: `(encoded, rng)` → (bytes uint8 [n], box int32 [4] (top, left,
    height, width) of the unflipped image, flipped uint8 [], jitter params float32 [7] with the contrast mean still
    to be filled in on the device)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, encoded, rng: random.Random):
        data, (width, height) = encoded
        jitter, flipped, (top, left, box_h, box_w) = self.transform.draw(width, height, rng)
        if flipped:  # the box of the mirrored image, in the image
            left = width - left - box_w
        params = self.transform.color_jitter.params(jitter, None)  # the contrast mean: on the device
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor([top, left, box_h, box_w],
                dtype=torch.int32), torch.tensor(flipped, dtype=torch.uint8), params)


def collate_encoded(samples):
    """→ (list of byte tensors, boxes [B, 4], flips [B], jitter [B, 7], masks [B, N])."""
    data, boxes, flips, jitter, masks = zip(*samples)
    return list(data), torch.stack(boxes), torch.stack(flips), torch.stack(jitter), torch.stack(masks)


def _pipeline(batch_size: int, patch: int, second: int, interpolation, second_interpolation, device: torch.device,
              threads: int):
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=(device.index or 0) if on_gpu else None,
                  exec_dynamic=True, prefetch_queue_depth=1)
    def views():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT)  # (x, y)
        shape = fn.external_source(name="shape", dtype=types.FLOAT)  # (w, h)
        flip = fn.external_source(name="flip", dtype=types.INT32)
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        crops = fn.slice(images, anchor, shape, axis_names="WH", normalized_anchor=False, normalized_shape=False)
        outputs = []
        for size, filter_ in ((patch, interpolation), (second, second_interpolation)):
            view = fn.resize(crops, size=(size, size), interp_type=filter_, antialias=True, dtype=types.UINT8)
            outputs.append(fn.transpose(fn.flip(view, horizontal=flip), perm=[2, 0, 1]))  # [3, S, S]
        thumbnail = fn.resize(images, size=(THUMBNAIL, THUMBNAIL), interp_type=types.INTERP_LINEAR, antialias=True,
                              dtype=types.UINT8)
        return (*outputs, fn.transpose(thumbnail, perm=[2, 0, 1]))

    pipe = views()
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = tensor_list.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(tensor_list.as_array())


class DaliPretrainLoader:
    """Batches (patch views uint8 [B, 3, S, S], tokenizer views uint8 [B, 3, s, s], jitter [B, 7], masks [B, N]) on
    `device`, as the PIL backend's loader yields them; `sampler`/`dataset` are the inner DataLoader's, so
    `set_loader_epoch` and resume work unchanged."""

    def __init__(self, loader, transform, device: torch.device, threads: int = 4):
        from nvidia.dali import types

        filters = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "lanczos": types.INTERP_LANCZOS3,
                   "nearest": types.INTERP_NN}
        self.loader, self.device = loader, device
        self.pipe = _pipeline(loader.batch_size, transform.input_size, transform.second_input_size,
                              filters[transform.interpolation], filters[transform.second_interpolation], device,
                              threads)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for data, boxes, flips, jitter, masks in self.loader:
            top, left, height, width = boxes.T.float()
            self.pipe.feed_input("encoded", [tensor.numpy() for tensor in data])
            self.pipe.feed_input("anchor", list(torch.stack([left, top], 1).numpy()))
            self.pipe.feed_input("shape", list(torch.stack([width, height], 1).numpy()))
            self.pipe.feed_input("flip", list(flips.int().numpy()))
            patches, tokenizer_views, thumbnails = (_to_torch(out, self.device) for out in self.pipe.run())
            jitter = jitter.to(self.device)
            jitter[:, 6] = contrast_means(thumbnails.float(), jitter)
            yield patches, tokenizer_views, jitter, masks


def build_dali_pretrain_loader(base, transform, masking, batch_size: int, rank: int, world_size: int, seed: int,
                               num_workers: int, device: torch.device) -> DaliPretrainLoader:
    """The pretraining loader of `--data_backend=dali` over an image folder or shards `base`."""
    require_dali()
    dataset = MIMPretrainDataset(EncodedImages(base), PretrainDraws(transform), masking, seed=seed)
    loader = build_loader(dataset, batch_size, rank, world_size, seed, num_workers=num_workers,
                          collate_fn=collate_encoded)
    logger.info("data backend: DALI (%s decode and resampling)", "GPU" if device.type == "cuda" else "CPU")
    return DaliPretrainLoader(loader, transform, device)
