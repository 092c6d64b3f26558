"""Sampler sharding / determinism / resume and the MIM loader's independence from the number of workers."""

import pytest
import torch
from conftest import assert_same_batches, epoch_batches

from engine.data import (
    ClassificationDataset,
    EpochShardSampler,
    EvalTransform,
    MaskingGenerator,
    MIMPretrainDataset,
    PretrainTransform,
    build_loader,
    embedded_dataset,
)


def _shards(n, world_size, epoch=0, **kwargs):
    shards = []
    for rank in range(world_size):
        sampler = EpochShardSampler(n, rank, world_size, seed=5, **kwargs)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    return shards


def test_shards_are_disjoint_and_cover_with_drop_last():
    shards = _shards(103, 4)
    assert all(len(shard) == 103 // 4 for shard in shards)
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == 100 and set(flat) <= set(range(103))


def test_shards_cover_everything_when_padded():
    shards = _shards(103, 4, drop_last=False)
    assert all(len(shard) == 26 for shard in shards)
    assert set(i for shard in shards for i in shard) == set(range(103))


def test_order_is_deterministic_per_epoch_and_changes_across_epochs():
    assert _shards(50, 2, epoch=3) == _shards(50, 2, epoch=3)
    assert _shards(50, 2, epoch=3) != _shards(50, 2, epoch=4)
    assert _shards(10, 1, shuffle=False)[0] == list(range(10))


def test_resume_skips_exactly_the_consumed_batches():
    sampler = EpochShardSampler(64, rank=1, world_size=2, seed=0, batch_size=4)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(3)
    assert len(sampler) == 32 - 12 and list(sampler) == full[12:]
    sampler.set_epoch(3)  # the next epoch starts from its beginning again
    assert len(list(sampler)) == 32


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="rank"):
        EpochShardSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot give every one"):
        EpochShardSampler(3, rank=0, world_size=4)
    sampler = EpochShardSampler(10, batch_size=4)
    with pytest.raises(ValueError, match="past the 10 samples"):
        sampler.skip(3)


def _mim_dataset(size=16):
    base = torch.utils.data.Subset(embedded_dataset("fashion_mnist", "train"), range(size))
    transform = PretrainTransform(input_size=28, second_input_size=14)
    masking = MaskingGenerator((7, 7), num_masking_patches=20, min_num_patches=4, backend="python")
    return MIMPretrainDataset(base, transform, masking, seed=11)


def test_mim_samples_and_collate():
    dataset = _mim_dataset()
    patch, tokenizer, jitter, mask = dataset[3]
    assert patch.shape == (3, 28, 28) and tokenizer.shape == (3, 14, 14) and jitter.shape == (7,)
    assert mask.shape == (49,) and mask.dtype == torch.bool and 0 < mask.sum() <= 20
    assert torch.equal(mask, torch.from_numpy(dataset.masking_generator.for_sample(11, 0, 3).reshape(-1)))
    again = dataset[3]
    assert all(torch.equal(a, b) for a, b in zip((patch, tokenizer, jitter), again))
    dataset.set_epoch(1)
    assert not torch.equal(patch, dataset[3][0])
    loader = build_loader(dataset, batch_size=4, seed=0)
    patches, tokenizers, jitters, masks = next(iter(loader))
    assert patches.shape == (4, 3, 28, 28) and tokenizers.shape == (4, 3, 14, 14) and masks.shape == (4, 49)
    assert jitters.shape == (4, 7) and jitters.dtype == torch.float32


def test_mim_loader_is_independent_of_workers_and_resumable():
    serial = build_loader(_mim_dataset(), batch_size=4, seed=3, num_workers=0)
    parallel = build_loader(_mim_dataset(), batch_size=4, seed=3, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):  # epoch 1 also checks that set_epoch reaches the persistent workers
        assert_same_batches(epoch_batches(serial, epoch), epoch_batches(parallel, epoch))
    epoch_1 = epoch_batches(serial, 1)
    assert_same_batches(epoch_batches(serial, 1, start_batch=2), epoch_1[2:])
    assert not torch.equal(epoch_batches(serial, 0)[0][0], epoch_1[0][0])


def test_classification_loader():
    base = torch.utils.data.Subset(embedded_dataset("fashion_mnist", "test"), range(10))
    dataset = ClassificationDataset(base, EvalTransform(28, crop_pct=1.0))
    loader = build_loader(dataset, batch_size=4, seed=0, shuffle=False, drop_last=False)
    batches = epoch_batches(loader, 0)
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert torch.cat([labels for _, labels in batches]).tolist() == [base[i][1] for i in range(10)]
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loader(dataset, batch_size=16)


def test_workers_outlive_a_stop_signal_to_their_fork_server():
    """A scheduler signals the whole process group, the workers' fork server included: the server and the workers
    ignore the signal, so the main process gets its batches until it stops (a killed server took its workers along:
    'DataLoader worker exited unexpectedly' before the step at which the ranks agreed to stop)."""
    import os
    import signal
    import time

    dataset = MIMPretrainDataset(embedded_dataset("fashion_mnist", "train"), PretrainTransform(28, 14),
                                 MaskingGenerator((7, 7), 16, 4, None))
    batches = iter(build_loader(dataset, 8, num_workers=1))
    next(batches)
    worker = batches._workers[0].pid
    with open(f"/proc/{worker}/stat") as stat:
        server = int(stat.read().rsplit(")", 1)[1].split()[1])  # the worker's parent: the fork server
    assert server != os.getpid()
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        os.kill(server, stop_signal)
        os.kill(worker, stop_signal)
    time.sleep(0.5)
    for _ in range(10):
        next(batches)
    assert batches._workers[0].is_alive()
