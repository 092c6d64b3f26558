"""Tar shards (engine/data/shards.py): webdataset layout, the folder's samples in the folder's order, the same batches
for a seed, exact resume, the bad-file rule, one-line errors."""

import logging
import tarfile

import numpy as np
import pytest
from conftest import assert_same_batches, epoch_batches
from PIL import Image

from engine.config import ConfigError
from engine.data import ClassificationDataset, MIMPretrainDataset, PretrainTransform, build_dataset, build_loader
from engine.data.datasets import ImageFolderDataset
from engine.data.masking import MaskingGenerator
from engine.data.shards import ShardDataset, convert, main
from engine.data.transforms import EvalTransform


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ (3 classes × 6 images, JPEG and PNG, sizes vary, one undecodable .jpg) and val/ (3 × 2)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in range(3):
            for index in range(count):
                size = (int(rng.integers(40, 72)), int(rng.integers(40, 72)))
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                path = root / split / f"class_{label}" / f"{index}.{'png' if index % 3 == 0 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    (root / "train" / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    destination = tmp_path_factory.mktemp("shards") / "imagenet-shards"
    assert convert(folder, destination, samples_per_shard=5) == ["train", "val"]
    return destination


def test_shards_hold_the_folders_samples_in_its_order(folder, shards):
    for split in ("train", "test"):
        images, packed = build_dataset(folder, split), build_dataset(shards, split)
        assert isinstance(packed, ShardDataset) and packed.classes == images.classes
        assert len(packed) == len(images) and packed.targets == images.targets
        for index in range(len(images)):
            if "broken" not in images.samples[index][0]:
                assert np.array_equal(packed[index][0], images[index][0])
    train = ShardDataset(shards / "train")
    assert len(train.shards) == 4  # 19 samples, 5 per shard
    with tarfile.open(train.shards[0]) as tar:  # webdataset: <key>.<ext> then <key>.cls
        names = tar.getnames()
        assert names[:4] == ["000000000.png", "000000000.cls", "000000001.jpg", "000000001.cls"]
        assert tar.extractfile("000000001.cls").read() == b"0"


def test_a_bad_sample_is_replaced_by_its_class_mate_as_in_the_folder(folder, shards, caplog):
    images, packed = ImageFolderDataset(folder / "train"), ShardDataset(shards / "train")
    broken = next(i for i, (path, _) in enumerate(images.samples) if "broken" in path)
    with caplog.at_level(logging.WARNING):
        ours, label = packed[broken]
    expected, expected_label = images[broken]
    assert label == expected_label == 1 and np.array_equal(ours, expected) and packed.num_skipped == 1
    assert "cannot decode" in caplog.text and "shard-" in caplog.text


def _mim(base):
    masking = MaskingGenerator((4, 4), num_masking_patches=6, min_num_patches=2, backend="python")
    return MIMPretrainDataset(base, PretrainTransform(input_size=32, second_input_size=16), masking, seed=3)


def test_a_run_on_shards_sees_the_folders_batches_and_resumes_exactly(folder, shards):
    on_folder = build_loader(_mim(build_dataset(folder, "train")), batch_size=4, seed=3)
    on_shards = build_loader(_mim(build_dataset(shards, "train")), batch_size=4, seed=3, num_workers=2)
    for epoch in (0, 1):
        assert_same_batches(epoch_batches(on_folder, epoch), epoch_batches(on_shards, epoch))
    assert_same_batches(epoch_batches(on_shards, 1, start_batch=2), epoch_batches(on_folder, 1)[2:])
    evaluated = [build_loader(ClassificationDataset(build_dataset(root, "test"), EvalTransform(32)), batch_size=4,
                              shuffle=False, drop_last=False) for root in (folder, shards)]
    assert_same_batches(*(epoch_batches(loader, 0) for loader in evaluated))


def test_errors_are_one_line(folder, shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), str(shards)])  # not empty
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    copy = tmp_path / "copy"
    convert(folder / "val", copy, samples_per_shard=2)
    (copy / "train" / "shard-000001.tar").unlink()
    with pytest.raises(ConfigError, match="shard missing"):
        build_dataset(copy, "train")
