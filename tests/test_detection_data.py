"""COCO-format reading (against pycocotools' own decoding), the large-scale-jitter and evaluation pipelines, and the
generated demo set."""

import json
import random

import numpy as np
import pytest
import torch
from conftest import write_tiny_coco
from pycocotools.coco import COCO

from engine.config import ConfigError
from engine.data.coco import CocoDetection, DetEvalTransform, DetTrainTransform, collate_detection
from engine.data.demo_detection import build_demo_detection


@pytest.fixture
def coco_dir(tmp_path):
    write_tiny_coco(tmp_path / "coco")
    return tmp_path / "coco"


def test_the_reader_decodes_masks_as_pycocotools_and_maps_category_ids(coco_dir):
    train = CocoDetection(coco_dir, "train")
    assert train.category_ids == [3, 17, 90] and train.class_names == ["cat", "dog", "toaster"]
    assert train.image_ids == [1, 11]  # the third image has no annotation: not a training sample
    reference = COCO(str(coco_dir / "annotations" / "instances_train2017.json"))
    image, target = train[0]
    annotations = [a for a in reference.imgToAnns[1] if not a["iscrowd"]]  # the crowd region is left out
    assert image.size == (48, 40) and target["image_id"] == 1
    assert np.array_equal(target["masks"], np.stack([reference.annToMask(a) for a in annotations]))
    assert target["labels"].tolist() == [2, 1]  # id 17 → label 2, id 3 → label 1 (0 is the background)
    assert target["boxes"].tolist() == [[8, 5, 30, 20], [2, 22, 14, 36]]  # x1, y1, x2, y2
    val = CocoDetection(coco_dir, "val", training=False, category_ids=train.category_ids)
    assert val.image_ids == [1, 11] and val[1][1]["labels"].tolist() == [2, 3]  # id 90 → label 3


def test_reader_errors_name_the_file(coco_dir):
    with pytest.raises(ConfigError, match="nowhere/train2017: image folder not found"):
        CocoDetection(coco_dir / "nowhere", "train")
    (coco_dir / "annotations" / "instances_train2017.json").rename(coco_dir / "moved.json")
    with pytest.raises(ConfigError, match="instances_train2017.json: annotation file not found"):
        CocoDetection(coco_dir, "train")
    (coco_dir / "moved.json").rename(coco_dir / "annotations" / "instances_train2017.json")
    (coco_dir / "train2017" / "000000000001.jpg").unlink()
    with pytest.raises(ConfigError, match="000000000001.jpg: image of id 1 not found"):
        CocoDetection(coco_dir, "train")[0]
    path = coco_dir / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"].append({"id": 5, "name": "new"})
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"category ids \[5\] are not in the training categories"):
        CocoDetection(coco_dir, "val", category_ids=[3, 17, 90])
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="instances_val2017.json: not a readable JSON"):
        CocoDetection(coco_dir, "val")
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="missing annotations, categories"):
        CocoDetection(coco_dir, "val")


def test_large_scale_jitter_keeps_boxes_and_masks_together(coco_dir):
    train = CocoDetection(coco_dir, "train")
    transform = DetTrainTransform(32, scale_range=(0.5, 2.0))
    for seed in range(20):
        image, target = transform(*train[0], random.Random(seed))
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert target["masks"].shape == (len(target["labels"]), 32, 32)
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(ys) and xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 \
                and ys.max() <= box[3]  # every mask pixel inside its (clipped) box
    again = transform(*train[0], random.Random(3))
    first = transform(*train[0], random.Random(3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    flipped = DetTrainTransform(48, scale_range=(1.0, 1.0), flip=1.0)(*train[0], random.Random(0))[1]
    kept = DetTrainTransform(48, scale_range=(1.0, 1.0), flip=0.0)(*train[0], random.Random(0))[1]
    assert torch.equal(flipped["masks"][:, :40, :48], kept["masks"][:, :40, :48].flip(-1))
    assert flipped["boxes"][0].tolist() == [48 - 30, 5, 48 - 8, 20]


def test_evaluation_resizes_the_long_side_and_pads(coco_dir):
    val = CocoDetection(coco_dir, "val", training=False)
    image, meta = DetEvalTransform(64)(*val[0])
    assert image.shape == (3, 64, 64) and meta == {"image_id": 1, "scale": 64 / 48, "size": (40, 48),
                                                   "resized": (53, 64)}
    assert image[:, 53:].sum() == 0  # padding below the image
    images, metas = collate_detection([(image, meta), (image, meta)])
    assert images.shape == (2, 3, 64, 64) and len(metas) == 2


def test_the_demo_set_is_coco_format_with_visible_garments_as_instances(tmp_path):
    root = build_demo_detection(tmp_path / "demo", num_train=6, num_val=3, image_size=32)
    train = CocoDetection(root, "train")
    assert train.category_ids == list(range(1, 11)) and train.class_names[0] == "T-shirt/top"
    for index in range(len(train)):
        _, target = train[index]
        assert len(target["labels"]) >= 1 and target["masks"].sum(axis=(1, 2)).min() >= 4
        assert not (target["masks"].sum(axis=0) > 1).any()  # visible parts: no pixel in two instances
    assert build_demo_detection(tmp_path / "demo", num_train=6, num_val=3, image_size=32) == root  # reused
