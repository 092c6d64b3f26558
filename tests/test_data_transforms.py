"""Transforms: two views from one crop box, view shapes and ranges, RandAugment, random erasing, eval resize."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.data import EvalTransform, FinetuneTransform, PretrainTransform, RandAugment, RandAugmentConfig
from engine.data.color_jitter import ColorJitter
from engine.data.randaugment import OPS, RAND_INCREASING_OPS, RAND_OPS
from engine.data.transforms import RandomErasing, random_resized_crop_box


def _gradient_image(width=96, height=80):
    """R grows with x, G with y, B is a checkerboard of 8-px cells: every region has a distinct colour."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 8 + y // 8) % 2) * 255], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def _unmap(tokenizer_view):
    return (tokenizer_view - 0.1) / 0.8  # inverse of map_pixels → [0, 1]


NO_JITTER = ColorJitter(0, 0, 0).params([], np.zeros((1, 1, 3), np.uint8))


def _finished(transform, views):
    """Worker output (uint8 views, jitter params; none: no jitter) → what the training step feeds the model and
    tokenizer (fp32)."""
    jitter = views[2] if len(views) == 3 else NO_JITTER
    patch, tokenizer = transform.model_inputs(views[0][None], views[1][None], jitter[None], torch.float32)
    return patch[0], tokenizer[0]


def test_pretrain_views_shapes_and_ranges():
    transform = PretrainTransform(input_size=32, second_input_size=16)
    views = transform(_gradient_image(), random.Random(0))
    assert views[0].shape == (3, 32, 32) and views[1].shape == (3, 16, 16) and views[2].shape == (7,)
    assert views[0].dtype == views[1].dtype == torch.uint8  # workers ship bytes; the step normalises
    patch, tokenizer = _finished(transform, views)
    assert patch.dtype == tokenizer.dtype == torch.float32
    assert patch.min() >= -1.0 and patch.max() <= 1.0  # (x - 0.5) / 0.5
    assert tokenizer.min() >= 0.1 - 1e-6 and tokenizer.max() <= 0.9 + 1e-6  # map_pixels range
    assert patch.max() - patch.min() > 1.0  # not collapsed: the checkerboard spans much of the range


def test_views_from_fixed_box_show_that_box():
    transform = PretrainTransform(input_size=32, second_input_size=16)
    image = _gradient_image()
    box = (16, 24, 40, 40)  # top, left, height, width
    patch, tokenizer = _finished(transform, transform.views_from_box(np.asarray(image), box))
    crop = torch.from_numpy(np.array(image.crop((24, 16, 64, 56)), dtype=np.float32) / 255).permute(2, 0, 1)
    # The patch view is the box at 32 px: compare red (x) and green (y) gradients with the crop at 32 px.
    expected_patch = F.interpolate(crop[None], size=32, mode="bilinear", antialias=True, align_corners=False)[0]
    assert torch.allclose(patch[:2] * 0.5 + 0.5, expected_patch[:2], atol=0.03)
    # The tokenizer view is the same box at 16 px: it matches the patch view downscaled.
    patch_down = F.avg_pool2d(patch[None] * 0.5 + 0.5, 2)[0]
    assert torch.allclose(_unmap(tokenizer)[:2], patch_down[:2], atol=0.03)
    # A box shifted by 4 px (2 tokenizer pixels) would not match: the test can tell boxes apart.
    _, shifted = _finished(transform, transform.views_from_box(np.asarray(image), (20, 28, 40, 40)))
    # Flipped: the box of the mirrored image, i.e. the mirrored box of the image, mirrored.
    flipped, _ = _finished(transform, transform.views_from_box(np.asarray(image), (16, 96 - 24 - 40, 40, 40), True))
    assert torch.allclose(flipped, patch.flip(-1), atol=1e-6)
    assert (_unmap(shifted)[:2] - patch_down[:2]).abs().max() > 0.05


@pytest.mark.parametrize("seed", range(5))
def test_random_views_come_from_one_box(seed):
    transform = PretrainTransform(input_size=32, second_input_size=16, color_jitter=0.4)
    image = _gradient_image()
    patch, tokenizer, jitter = transform(image, random.Random(seed))
    draws, flipped, box = transform.draw(image.width, image.height, random.Random(seed))
    expected_patch, expected_tokenizer = transform.views_from_box(np.asarray(image), box, flipped)
    assert torch.equal(patch, expected_patch) and torch.equal(tokenizer, expected_tokenizer)
    assert torch.equal(jitter, transform.color_jitter.params(draws, np.asarray(image)))
    patch, tokenizer = _finished(transform, (patch, tokenizer, jitter))
    patch_down = F.avg_pool2d(patch[None] * 0.5 + 0.5, 2)[0]
    # the checkerboard edges differ a little between bicubic+pool and Lanczos; the mean error stays tiny
    assert (_unmap(tokenizer) - patch_down).abs().mean() < 0.03


def test_pretrain_transform_is_deterministic_given_rng():
    transform = PretrainTransform(input_size=32, second_input_size=16)
    image = _gradient_image()
    first, second = transform(image, random.Random(7)), transform(image, random.Random(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    random.seed(3)
    third = transform(image)
    random.seed(3)
    assert all(torch.equal(a, b) for a, b in zip(third, transform(image)))
    assert not torch.equal(first[0], transform(image, random.Random(8))[0])


def test_imagenet_normalisation_option():
    from engine.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    transform = PretrainTransform(32, 16, color_jitter=0, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    white = np.full((40, 40, 3), 255, np.uint8)
    patch, _ = _finished(transform, transform.views_from_box(white, (0, 0, 40, 40)))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    assert torch.allclose(patch.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_random_resized_crop_box_follows_torchvision_rules():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(96, 80, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 96
        assert 0.08 * 96 * 80 * 0.8 <= h * w <= 96 * 80
    # No attempt fits a 100x4 strip at ratio ~1, so the fallback centre crop is clamped to the largest ratio.
    assert random_resized_crop_box(100, 4, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (0, 47, 4, 5)


def test_randaugment_string_parsing():
    config = RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")
    assert config == RandAugmentConfig(magnitude=9, num_layers=2, magnitude_std=0.5, magnitude_max=10,
                                       increasing=True)
    assert RandAugmentConfig.parse("rand-n3-m5-mstd101").magnitude_std == math.inf
    assert RandAugment("rand-m9-inc0").op_names == RAND_OPS
    assert RandAugment("rand-m9-mstd0.5-inc1").op_names == RAND_INCREASING_OPS
    for bad, message in [("rnd-m9", "must start with 'rand'"), ("rand-x3", "unknown RandAugment section"),
                         ("rand-m9-mstd", "not a key followed by a number"), ("rand-m9.5", "bad value")]:
        with pytest.raises(ValueError, match=message):
            RandAugmentConfig.parse(bad)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_runs_on_rgb(name):
    image = _gradient_image(48, 40)
    for magnitude in (0.0, 5.0, 10.0):
        out = OPS[name](image, magnitude, random.Random(0), RandAugment("rand-m9").geometry)
        assert out.mode == "RGB" and out.size == image.size


def test_randaugment_changes_images_deterministically():
    augment = RandAugment("rand-m9-mstd0.5-inc1", fill=(124, 116, 104))
    image = _gradient_image(48, 40)
    outputs = [np.asarray(augment(image, random.Random(seed))) for seed in range(20)]
    assert sum(not np.array_equal(out, np.asarray(image)) for out in outputs) >= 10
    np.testing.assert_array_equal(outputs[3], np.asarray(augment(image, random.Random(3))))


def test_random_erasing_pixel_mode():
    erase = RandomErasing(probability=1.0, mode="pixel")
    boxes = torch.stack([erase.draw_box(32, 32, random.Random(seed)) for seed in range(4)])  # [4, 4] in the worker
    assert (boxes[:, 2] > 0).all() and (boxes[:, 0] + boxes[:, 2] <= 32).all()
    assert (boxes[:, 1] + boxes[:, 3] <= 32).all()
    images = erase.erase(torch.zeros(4, 3, 32, 32), boxes, torch.Generator().manual_seed(0))  # on the device
    for image, (top, left, h, w) in zip(images, boxes.tolist()):
        erased = image != 0
        assert 0.02 * 1024 * 0.5 <= erased[0].sum() <= 1024 / 3 * 1.5  # one rectangle of 2%..33% of the area
        assert erased[:, top:top + h, left:left + w].all() and erased.sum() == 3 * h * w  # exactly the box
        assert torch.equal(erased[0], erased[1]) and image[erased].std() > 0.5  # per-pixel N(0, 1) noise
    none = RandomErasing(probability=0.0).draw_box(8, 8, random.Random(0))
    assert not none.any()
    assert not RandomErasing(1.0).erase(torch.zeros(1, 3, 8, 8), none[None], None).any()


def test_finetune_transform():
    transform = FinetuneTransform(input_size=32, re_prob=0.25)
    image = _gradient_image()
    pixels, box = transform(image, random.Random(1))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8 and box.shape == (4,)
    again = transform(image, random.Random(1))
    assert torch.equal(pixels, again[0]) and torch.equal(box, again[1])
    out = transform.model_inputs(pixels[None], box[None], torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    jitter_only = FinetuneTransform(input_size=32, auto_augment=None, re_prob=0)
    pixels, box = jitter_only(image, random.Random(1))
    assert pixels.shape == (3, 32, 32) and not box.any()


@pytest.mark.parametrize("size, crop_pct, image_size, resized", [(224, None, (300, 400), 256),
                                                                  (384, None, (500, 400), 384),
                                                                  (28, 0.875, (28, 28), 32)])
def test_eval_transform_size(size, crop_pct, image_size, resized):
    transform = EvalTransform(size, crop_pct)
    assert transform.resize_size == resized
    assert transform(Image.new("RGB", image_size, (255, 0, 0))).shape == (3, size, size)


def test_eval_transform_takes_the_centre():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (16, 16, 48, 48))  # white centre square of 32 px
    transform = EvalTransform(28, crop_pct=28 / 64, mean=(0, 0, 0), std=(1, 1, 1))
    pixels = transform(image)  # no resize, crop 28 centre
    assert pixels.dtype == torch.uint8 and pixels.min() == 255
    assert transform.model_inputs(pixels[None]).min() > 0.99


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        PretrainTransform(32, 16, second_interpolation="sinc")
    with pytest.raises(ValueError, match="scale"):
        PretrainTransform(32, 16, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="input_size"):
        EvalTransform(0)
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(32, crop_pct=1.5)
