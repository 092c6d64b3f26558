"""Segmentation data: the ADE20K-format reader and its errors, reduce_zero_label, the mmseg train / eval pipelines
(labels stay aligned with pixels, ignore index, cat_max_ratio, determinism) and the demo set builder."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError
from engine.data.demo_segmentation import DEMO_CLASSES, build_demo_segmentation
from engine.data.segmentation import (
    ADE20KDataset,
    PhotoMetricDistortion,
    SegEvalTransform,
    SegTrainTransform,
    multi_scale_sizes,
    reduce_zero_label,
    rescale_size,
)


def _write_pair(root, split, stem, image, label, image_ext=".jpg"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{stem}{image_ext}")
    Image.fromarray(label, "L").save(root / "annotations" / split / f"{stem}.png")


@pytest.fixture
def ade_root(tmp_path):
    """Three 30x20 (W x H) training pairs, labels 0..3 (raw, so 0 is 'other'); one validation pair as .png."""
    rng = np.random.default_rng(0)
    for index, stem in enumerate(("b_img", "a_img", "c_img")):
        label = np.full((20, 30), index, dtype=np.uint8)
        label[:, 15:] = 3
        _write_pair(tmp_path, "training", stem, rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), label)
    _write_pair(tmp_path, "validation", "v", np.zeros((20, 30, 3), np.uint8), np.ones((20, 30), np.uint8), ".png")
    return tmp_path


def test_reader_pairs_sorted_files_and_maps_labels(ade_root):
    dataset = ADE20KDataset(ade_root, "training")
    assert len(dataset) == 3
    assert [image.name for image, _ in dataset.files] == ["a_img.jpg", "b_img.jpg", "c_img.jpg"]
    assert [label.name for _, label in dataset.files] == ["a_img.png", "b_img.png", "c_img.png"]
    image, label = dataset[1]  # b_img: raw 0 (left) and 3 (right)
    assert image.mode == "RGB" and label.mode == "L" and image.size == label.size == (30, 20)
    labels = np.asarray(label)
    assert labels.dtype == np.uint8 and (labels[:, :15] == 255).all() and (labels[:, 15:] == 2).all()
    raw = np.asarray(ADE20KDataset(ade_root, "training", reduce_zero_label=False)[1][1])
    assert (raw[:, :15] == 0).all() and (raw[:, 15:] == 3).all()
    assert len(ADE20KDataset(ade_root, "validation")) == 1  # .png images are accepted


def test_reduce_zero_label_matches_mmseg():
    raw = np.array([[0, 1, 2], [150, 254, 255]], dtype=np.uint8)
    expected = np.array([[255, 0, 1], [149, 253, 255]], dtype=np.uint8)
    out = reduce_zero_label(raw)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    assert raw[0, 0] == 0  # the input is not modified
    with pytest.raises(ValueError, match="uint8"):
        reduce_zero_label(raw.astype(np.int64))


def test_reader_errors_name_the_path(ade_root, tmp_path_factory):
    with pytest.raises(ConfigError, match="nowhere"):  # a ValueError that recipes print as one line
        ADE20KDataset(ade_root / "nowhere")
    with pytest.raises(ValueError, match="split must be"):
        ADE20KDataset(ade_root, "train")
    empty = tmp_path_factory.mktemp("empty")
    (empty / "images" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match="annotations/training"):
        ADE20KDataset(empty)
    (empty / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ADE20KDataset(empty)
    # an image without an annotation, then an annotation without an image
    Image.new("RGB", (30, 20)).save(ade_root / "images" / "training" / "lonely.jpg")
    with pytest.raises(ValueError, match="lonely.jpg: no annotation"):
        ADE20KDataset(ade_root)
    (ade_root / "images" / "training" / "lonely.jpg").rename(ade_root / "lonely.jpg")
    Image.new("L", (30, 20)).save(ade_root / "annotations" / "training" / "orphan.png")
    with pytest.raises(ValueError, match="orphan.png: annotation without an image"):
        ADE20KDataset(ade_root)


def test_reader_load_errors_name_the_file(ade_root):
    dataset = ADE20KDataset(ade_root)
    image_a, label_a = dataset.files[0]
    Image.new("L", (31, 20)).save(label_a)  # size mismatch
    with pytest.raises(ConfigError, match="a_img.png: label map is 31x20 but its image .*a_img.jpg is 30x20"):
        dataset[0]
    image_b, label_b = dataset.files[1]
    image_b.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="b_img.jpg: cannot read the image"):
        dataset[1]
    Image.new("RGB", (30, 20)).save(dataset.files[2][1])  # a colour PNG as a label map
    with pytest.raises(ValueError, match="c_img.png: label map has mode 'RGB'"):
        dataset[2]


def test_reader_num_classes_check(ade_root):
    dataset = ADE20KDataset(ade_root, num_classes=3)  # raw 0..3 → 255, 0, 1, 2: all valid
    assert [np.asarray(dataset[i][1]).max() for i in range(3)] == [2, 255, 2]
    with pytest.raises(ValueError, match=r"c_img.png: label value 2 \(stored as 3\) is outside \[0, 2\)"):
        ADE20KDataset(ade_root, num_classes=2)[2]
    with pytest.raises(ValueError, match="a_img.png: label value 3"):
        ADE20KDataset(ade_root, reduce_zero_label=False, num_classes=3)[0]


def _encoded_pair(width=90, height=60, cell=10):
    """label = cell column + 9 x cell row (distinct per 10 px cell, raw 0 = other), image channels = 4 x label:
    each image pixel names its label, so any misalignment between the two shows."""
    y, x = np.mgrid[0:height, 0:width]
    label = ((x // cell) + 9 * (y // cell)).astype(np.uint8)
    label[:cell, :cell] = 255  # an ignored cell
    pixels = np.repeat((label.astype(np.int64) * 4 % 256).astype(np.uint8)[..., None], 3, axis=-1)
    return Image.fromarray(pixels), Image.fromarray(label, "L")


def _interior(labels, radius=2):
    """True where the (2r+1)^2 neighbourhood holds one label: away from cell edges that resampling blends."""
    h, w = labels.shape
    padded = np.pad(labels.astype(np.int64), radius, constant_values=-1)
    same = np.ones_like(labels, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy:dy + h, dx:dx + w] == labels
    return same


def test_train_transform_keeps_labels_aligned_with_pixels():
    image, label = _encoded_pair()
    transform = SegTrainTransform(48, img_scale=(120, 60), photometric=False)
    flipped = checked = 0
    for seed in range(20):
        pixels, labels = transform(image, label, random.Random(seed))
        assert pixels.shape == (3, 48, 48) and labels.shape == (48, 48)
        assert pixels.dtype == labels.dtype == torch.uint8
        labels_np, pixels_np = labels.numpy(), pixels[0].numpy().astype(np.int64)
        ok = _interior(labels_np) & (labels_np != 255)
        assert ok.sum() > 100
        assert np.abs(pixels_np[ok] - labels_np[ok].astype(np.int64) * 4 % 256).max() <= 2
        assert set(np.unique(labels_np)) <= set(np.unique(np.asarray(label)))  # nearest: no blended labels
        checked += ok.sum()
        # the label grows left to right inside a row of cells unless the crop was flipped
        row = labels_np[ok.any(1).argmax()]
        values = row[(row != 255)]
        flipped += bool(values[0] > values[-1])
    assert 3 <= flipped <= 17 and checked > 2000  # both flip outcomes were exercised


def test_crop_flip_pad_align_every_pixel():
    """Without a resize (ratio 1, scale = the size), each pixel's value names its own label: exact alignment."""
    labels_in = np.random.default_rng(0).integers(0, 64, (40, 50)).astype(np.uint8)
    labels_in[5:9, 7:20] = 255
    image = Image.fromarray(np.repeat(labels_in[..., None] * 4, 3, axis=-1))
    transform = SegTrainTransform(44, img_scale=(50, 40), ratio_range=None, photometric=False)
    for seed in range(8):  # 44 > 40: crops are 40 rows (padded) x 44 of the 50 columns
        pixels, labels = transform(image, Image.fromarray(labels_in, "L"), random.Random(seed))
        valid = labels.numpy() != 255
        assert valid.sum() > 1500 and (labels[40:] == 255).all()
        assert np.array_equal(pixels[0].numpy()[valid], labels.numpy()[valid] * 4)
        windows = [labels_in[:, offset:offset + 44] for offset in range(7)]  # every possible crop, then flipped
        assert any(np.array_equal(labels[:40].numpy(), w) or np.array_equal(labels[:40].numpy(), w[:, ::-1])
                   for w in windows)


def test_photometric_changes_pixels_never_labels():
    image, label = _encoded_pair()
    plain = SegTrainTransform(48, img_scale=(120, 60), photometric=False)
    jittered = SegTrainTransform(48, img_scale=(120, 60), photometric=True)
    changed = 0
    for seed in range(6):  # the photometric draws come last: same ratio, crop and flip
        pixels_a, labels_a = plain(image, label, random.Random(seed))
        pixels_b, labels_b = jittered(image, label, random.Random(seed))
        assert torch.equal(labels_a, labels_b)
        changed += not torch.equal(pixels_a, pixels_b)
    assert changed >= 3
    gray = np.full((8, 8, 3), 100, np.uint8)
    outs = [PhotoMetricDistortion()(gray, random.Random(seed)) for seed in range(30)]
    assert all(out.dtype == np.uint8 and out.shape == gray.shape for out in outs)
    assert min(out.mean() for out in outs) < 80 and max(out.mean() for out in outs) > 120


def test_padding_is_ignored_and_ignore_index_survives():
    image, label = _encoded_pair(width=30, height=20)
    transform = SegTrainTransform(32, img_scale=(30, 20), ratio_range=None, flip_prob=0.0, photometric=False)
    pixels, labels = transform(image, label, random.Random(0))  # 30x20 stays 30x20 → padded to 32x32
    assert (labels[20:] == 255).all() and (labels[:, 30:] == 255).all()
    assert (labels[:10, :10] == 255).all()  # the ignored cell
    assert np.array_equal(labels[:20, :30].numpy(), np.asarray(label))
    assert torch.equal(pixels[:, 25, 31], torch.tensor([124, 116, 104], dtype=torch.uint8))  # the mean colour
    normalised = transform.model_inputs(pixels[None], torch.float32)
    assert normalised.dtype == torch.float32 and normalised[0, :, 25:, 30:].abs().max() < 0.01  # mmseg: pad 0


def _two_halves(size=100):
    label = np.zeros((size, size), np.uint8)
    label[:, size // 2:] = 1
    return Image.new("RGB", (size, size)), Image.fromarray(label, "L")


def _balanced(labels, max_ratio=0.75, count_ignored=False):
    counts = np.bincount(labels.numpy().ravel(), minlength=256)[:256 if count_ignored else 255]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() < max_ratio * counts.sum()


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    image, label = _two_halves()  # a 20 px crop is balanced only across the middle: ~11 of 81 offsets
    common = dict(img_scale=(100, 100), ratio_range=None, flip_prob=0.0, photometric=False)
    with_ratio, without = SegTrainTransform(20, **common), SegTrainTransform(20, cat_max_ratio=1.0, **common)
    balanced = sum(_balanced(with_ratio(image, label, random.Random(s))[1]) for s in range(60))
    balanced_plain = sum(_balanced(without(image, label, random.Random(s))[1]) for s in range(60))
    assert balanced >= 40 and balanced_plain <= 20
    # ignored pixels do not count: with class 0 + ignore no crop qualifies, so the draws stay uniform (the last
    # one is kept), rather than seeking the middle as they would if 255 were a class
    ignore_half = Image.fromarray(np.where(np.asarray(label) == 1, 255, 0).astype(np.uint8), "L")
    crops = [with_ratio(image, ignore_half, random.Random(s))[1] for s in range(60)]
    assert not any(_balanced(crop) for crop in crops)
    assert sum(_balanced(crop, count_ignored=True) for crop in crops) <= 20


def test_eval_transform_keeps_the_original_label():
    image, label = _encoded_pair(width=30, height=20)
    transform = SegEvalTransform(img_scale=(64, 16))
    pixels, labels = transform(image, label)
    assert rescale_size(30, 20, (64, 16)) == (24, 16)  # min(64 / 30, 16 / 20) = 0.8
    assert pixels.shape == (3, 16, 24) and pixels.dtype == torch.uint8
    assert labels.dtype == torch.uint8 and np.array_equal(labels.numpy(), np.asarray(label))
    assert rescale_size(56, 56, (224, 56)) == (56, 56) and rescale_size(100, 50, (224, 56)) == (112, 56)
    assert transform.model_inputs(pixels[None], torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="label map"):
        transform(image, Image.new("L", (31, 20)))


def test_the_multi_scale_test_sizes_are_the_official_setr_resize():
    # BEiT's ADE20K multi-scale test at 512 (img_scale (2048, 512)): the ORIGINAL image's short side becomes
    # max(512, int(512 · r)), so 0.5 and 0.75 run at 512 too, and the long side is not bounded
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    sizes = multi_scale_sizes(683, 512, (2048, 512), 512, ratios)
    assert sizes == [(683, 512)] * 3 + [(854, 640), (1025, 768), (1195, 896)]
    assert multi_scale_sizes(300, 1200, (2048, 512), 512, (1.0, 1.75)) == [(512, 2048), (896, 3584)]
    assert multi_scale_sizes(1000, 600, (2560, 640), 640, (0.5, 1.25)) == [(1067, 640), (1333, 800)]  # L at 640
    image, label = _encoded_pair(width=30, height=20)
    transform = SegEvalTransform(img_scale=(64, 16), scales=ratios, crop_size=16)
    pixels, labels = transform(image, label)
    assert pixels.shape == (3, 20, 30) and labels.shape == (20, 30)  # the original: each size is taken from it
    assert transform.sizes(20, 30) == [(16, 24)] * 3 + [(20, 30), (24, 36), (28, 42)]
    assert SegEvalTransform(img_scale=(64, 16)).sizes(16, 24) == [(16, 24)]  # single scale: as resized
    with pytest.raises(ValueError, match="crop size"):
        SegEvalTransform(scales=ratios)


def test_train_transform_is_deterministic_per_rng():
    image, label = _encoded_pair()
    transform = SegTrainTransform(40, img_scale=(120, 60))
    first, again = transform(image, label, random.Random(7)), transform(image, label, random.Random(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [transform(image, label, random.Random(s)) for s in range(4)]
    assert any(not torch.equal(first[0], other[0]) for other in others)
    random.seed(3)
    seeded = transform(image, label)
    random.seed(3)
    assert torch.equal(seeded[0], transform(image, label)[0])  # rng=None draws its seed from `random`


def test_demo_segmentation_set(tmp_path):
    root = build_demo_segmentation(tmp_path / "demo", num_train=8, num_val=4, image_size=56, seed=0)
    assert json.loads((root / ".complete").read_text())["num_train"] == 8
    assert len(DEMO_CLASSES) == 11 and DEMO_CLASSES[0] == "background" and DEMO_CLASSES[1] == "T-shirt/top"
    seen = set()
    for split, count in (("training", 8), ("validation", 4)):
        dataset = ADE20KDataset(root, split, num_classes=len(DEMO_CLASSES))  # checks every value on load
        assert len(dataset) == count
        for index in range(count):
            image, label = dataset[index]
            assert image.size == label.size == (56, 56)
            values = set(np.unique(np.asarray(label)).tolist())
            assert 0 in values and len(values - {0, 255}) >= 1  # background and at least one garment
            seen |= values
    assert seen <= set(range(11)) | {255} and len(seen - {0, 255}) >= 4
    # idempotent: a second call with the same parameters writes nothing
    stamps = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    assert build_demo_segmentation(tmp_path / "demo", num_train=8, num_val=4, image_size=56, seed=0) == root
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == stamps
    # deterministic: the same parameters elsewhere give the same labels; new parameters rebuild in place
    other = build_demo_segmentation(tmp_path / "other", num_train=8, num_val=4, image_size=56, seed=0)
    assert (other / "annotations/training/training_00003.png").read_bytes() == \
        (root / "annotations/training/training_00003.png").read_bytes()
    build_demo_segmentation(tmp_path / "demo", num_train=3, num_val=2, image_size=56, seed=1)
    assert len(ADE20KDataset(root, "training")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "other"]  # no temporary folders left
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a demo segmentation set"):
        build_demo_segmentation(tmp_path / "user", num_train=2, num_val=1)


def test_demo_set_of_the_segmentation_demo_grey_single_garment(tmp_path):
    """The demo's settings: grey photos, one white garment per image, 0.75-1.0 of the image wide."""
    root = build_demo_segmentation(tmp_path / "grey", num_train=6, num_val=2, image_size=28, garment_scale=(0.75, 1.0),
                                   max_garments=1, grey=True)
    dataset = ADE20KDataset(root, "training", num_classes=len(DEMO_CLASSES))
    for index in range(len(dataset)):
        image, label = dataset[index]
        pixels, labels = np.asarray(image).astype(int), np.asarray(label)
        assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 8  # grey up to JPEG chroma noise
        garments = set(np.unique(labels).tolist()) - {0, 255}  # background, ignore
        assert len(garments) == 1  # one garment, one class
    with pytest.raises(ValueError, match="garment_scale"):
        build_demo_segmentation(tmp_path / "bad", num_train=1, num_val=1, image_size=28, garment_scale=(0.5, 1.5))
