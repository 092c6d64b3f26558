"""Training datasets (MIM pretraining, classification), the sharded epoch sampler and the DataLoader factory.

Determinism: sample `index` of `epoch` in a run seeded with `seed` is a pure function of (seed, epoch, index): its
transform draws from `random.Random(sample_seed(seed, epoch, index, stream))` and its mask from
`masking_generator.for_sample(seed, epoch, index)`. The sampler's order is a pure function of (seed, epoch). So
batches do not depend on the number of workers, and a run resumed mid-epoch (`set_loader_epoch(loader, epoch,
start_batch)`) sees exactly the batches it would have seen. The current epoch lives in a shared-memory tensor, so
`set_epoch` reaches persistent DataLoader workers too.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.config import ConfigError

# Workers are forked from a clean server process, not from the training process: a worker forked after the model and
# the optimizer exist keeps the old copy of every page that a training step then writes (copy-on-write), so each one
# came to hold the model states a second time (benchmarks/bench_memory.py). The server imports these modules once; the
# first makes it ignore the stop signals, as the workers do.
WORKER_START_METHOD = "forkserver"
WORKER_PRELOAD = ["engine.data._forkserver_signals", "engine.data.loader", "engine.data.datasets",
                  "engine.data.transforms", "engine.data.masking"]
_TRANSFORM_STREAM = 1  # keeps transform seeds apart from the masking generator's default_rng([seed, epoch, index])


class ImageDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...  # (RGB uint8 [H, W, 3], label)


class SampleMasker(Protocol):
    def for_sample(self, seed: int, epoch: int, index: int) -> np.ndarray: ...


def sample_seed(seed: int, epoch: int, index: int, stream: int = _TRANSFORM_STREAM) -> int:
    """A 64-bit seed that depends only on (seed, epoch, index, stream), all non-negative ints."""
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, np.uint64)[0])


def _check_non_negative(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


class _EpochSeededDataset(Dataset):
    """Wraps an image dataset; each sample's randomness is seeded from (seed, current epoch, index)."""

    def __init__(self, base: ImageDataset, transform: Callable, seed: int = 0):
        if len(base) == 0:
            raise ValueError("the dataset is empty")
        self.base = base
        self.transform = transform
        self.seed = _check_non_negative("seed", seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with DataLoader workers

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(_check_non_negative("epoch", epoch))

    def sample_rng(self, index: int) -> random.Random:
        return random.Random(sample_seed(self.seed, self.epoch, index))

    def __len__(self) -> int:
        return len(self.base)


class SegmentationSamples(_EpochSeededDataset):
    """Segmentation samples: `dataset[i]` → (image uint8 [3, H, W], label map uint8 [H, W]) with a
    `SegTrainTransform`-like `transform(img, label, rng)` (engine/data/segmentation.py)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[index]
        return self.transform(image, label, self.sample_rng(index))


class DetectionSamples(_EpochSeededDataset):
    """Detection samples: `dataset[i]` → (image uint8 [3, S, S], target or meta dict) with a `DetTrainTransform` /
    `DetEvalTransform`-like `transform(img, target, rng)` (engine/data/coco.py); batch with `collate_detection`."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.base[index]
        return self.transform(image, target, self.sample_rng(index))


class MIMPretrainDataset(_EpochSeededDataset):
    """Masked-image-modelling samples: `dataset[i]` → (patch_view uint8 [3, H, W], tokenizer_view uint8 [3, h, w],
    jitter params float32 [7], bool_masked_pos bool [num_patches]) with a PretrainTransform-like
    `transform(img, rng)` → (patch_view, tokenizer_view, jitter) and the mask
    `masking_generator.for_sample(seed, epoch, i)` flattened row-major, last (another transform's outputs come
    first, e.g. engine/data/dali.py's draws). Labels of `base` are ignored."""

    def __init__(self, base: ImageDataset, transform: Callable, masking_generator: SampleMasker, seed: int = 0):
        super().__init__(base, transform, seed)
        self.masking_generator = masking_generator

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image, _ = self.base[index]
        views = self.transform(image, self.sample_rng(index))  # PretrainTransform: patch, tokenizer view, jitter
        mask = self.masking_generator.for_sample(self.seed, self.epoch, index)  # [h, w] bool
        return *views, torch.from_numpy(np.ascontiguousarray(mask).reshape(-1))


class ClassificationDataset(_EpochSeededDataset):
    """Classification samples: `dataset[i]` → (image float [3, H, W], int label) with `transform(img, rng)`."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image, self.sample_rng(index)), label


def collate_mim(samples: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """MIM samples → (patch views [B, 3, H, W], tokenizer views [B, 3, h, w], jitter [B, 7], bool_masked_pos
    [B, N] bool)."""
    return tuple(torch.stack(field) for field in zip(*samples))


class EpochShardSampler(Sampler[int]):
    """Deterministic per-epoch order, sharded over ranks, resumable mid-epoch.

    Order of epoch e: `torch.randperm(dataset_len, generator=torch.Generator().manual_seed(seed + e))` (or
    0..n-1 without shuffle). The first `world_size·k` entries are dealt round-robin: rank r gets positions
    r, r + world_size, ... With drop_last every rank gets floor(n / world_size) samples (the tail is dropped);
    otherwise ceil(n / world_size), the order being padded by repeating its start, as DistributedSampler does.

    `set_epoch(epoch)` selects the epoch (and restarts it); `skip(n_batches)` or `set_epoch(epoch, start_index)`
    makes the next iteration start after that many of this rank's samples.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, batch_size: int = 1):
        self.dataset_len = _check_non_negative("dataset_len", dataset_len)
        self.world_size = _check_non_negative("world_size", world_size)
        self.rank = _check_non_negative("rank", rank)
        if self.world_size == 0 or self.rank >= self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.seed = _check_non_negative("seed", seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.batch_size = _check_non_negative("batch_size", batch_size)
        if drop_last:
            self.num_samples = self.dataset_len // self.world_size
        else:
            self.num_samples = math.ceil(self.dataset_len / self.world_size)
        if self.num_samples == 0:
            raise ValueError(f"{self.dataset_len} samples cannot give every one of {self.world_size} ranks a sample")
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        self.epoch = _check_non_negative("epoch", epoch)
        start_index = _check_non_negative("start_index", start_index)
        if start_index > self.num_samples:
            raise ValueError(f"start_index {start_index} is past the {self.num_samples} samples of this rank's shard")
        self.start_index = start_index

    def skip(self, n_batches: int) -> None:
        """Start the current epoch after `n_batches` batches of `batch_size` samples (resume mid-epoch)."""
        self.set_epoch(self.epoch, _check_non_negative("n_batches", n_batches) * self.batch_size)

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's full sample order for `epoch`: int64 [num_samples]."""
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.dataset_len)
        total = self.num_samples * self.world_size
        if total > self.dataset_len:  # pad (drop_last=False): repeat the order from its start
            order = order.repeat(math.ceil(total / self.dataset_len))
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start_index:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def ignore_stop_signals() -> None:
    """SIGINT/SIGTERM/SIGUSR1 ignored in this process (a DataLoader worker, or their fork server): see `worker_init`."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop_signal, signal.SIG_IGN)


def worker_init(worker_id: int) -> None:
    """Each DataLoader worker ignores SIGINT/SIGTERM/SIGUSR1: a Ctrl-C or a scheduler's signal goes to the whole process
    group, and a worker that died first would crash the main process before it saved. The main process handles the
    signal, saves, and shuts its workers down (they also exit when it dies).

    Also seeds Python's and numpy's global RNGs from the worker's torch seed (base seed + worker id), so even code
    that uses them is reproducible; the datasets here do not (their samples are independent of the worker)."""
    ignore_stop_signals()
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def build_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = True, drop_last: bool = True,
                 persistent_workers: bool = True, shuffle: bool = True,
                 collate_fn: Callable[[list], Any] | None = None) -> DataLoader:
    """A DataLoader over this rank's shard (an `EpochShardSampler`, reachable as `loader.sampler`).

    `drop_last` applies to both the shard (equal sample counts per rank) and the last partial batch. `pin_memory`
    is used only when CUDA is available, `persistent_workers` only with workers. MIM datasets default to
    `collate_mim`. Call `set_loader_epoch(loader, epoch)` before each epoch.
    """
    if _check_non_negative("batch_size", batch_size) == 0:
        raise ValueError("batch_size must be >= 1")
    sampler = EpochShardSampler(len(dataset), rank, world_size, seed, shuffle, drop_last, batch_size)
    if drop_last and len(sampler) < batch_size:
        raise ConfigError(f"rank {rank}'s shard holds {len(sampler)} samples, fewer than one batch of {batch_size} "
                          f"with drop_last; lower --batch_size or add data")
    if collate_fn is None and isinstance(dataset, MIMPretrainDataset):
        collate_fn = collate_mim
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=persistent_workers and num_workers > 0, collate_fn=collate_fn,
                      worker_init_fn=worker_init, generator=torch.Generator().manual_seed(seed + rank),
                      multiprocessing_context=worker_context(num_workers))


def worker_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """The start method of DataLoader workers (see WORKER_START_METHOD); None without workers."""
    if num_workers == 0:
        return None
    context = multiprocessing.get_context(WORKER_START_METHOD)
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def set_loader_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Selects `epoch` in the loader's sampler and dataset; the next iteration starts after `start_batch` batches."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip(start_batch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
