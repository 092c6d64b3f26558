"""The workers' resampling and affine maps (engine/data/pixels.py, csrc/resample.cpp) against PIL: the same pixels,
bit for bit, natively (vectorised and portable loops) and on the PIL path."""

import numpy as np
import pytest
from PIL import Image

from engine.data import pixels

NATIVE_BUILT = pixels._native_pixels is not None
native = pytest.mark.skipif(not NATIVE_BUILT, reason="native extension engine.data._native_pixels not built "
                                                     "(needs CMake and a C++ compiler at install)")
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "lanczos": Image.Resampling.LANCZOS}


def pil_two_pass(array: np.ndarray, width: int, height: int, name: str) -> np.ndarray:
    """PIL's resize as every Pillow before 13 ran it: the horizontal pass, then the vertical one (each a one-axis
    resize, which no Pillow reorders)."""
    image = Image.fromarray(np.ascontiguousarray(array))
    if width != image.width:
        image = image.resize((width, image.height), FILTERS[name])
    if height != image.height:
        image = image.resize((width, height), FILTERS[name])
    return np.asarray(image)


def random_cases(count: int, seed: int = 0):
    """(crop view of a larger image, width, height, filter): noise and smooth images, shrinking and enlarging on
    either axis, the views' sizes, 1-pixel edges."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        height, width = (int(v) for v in rng.integers(1, 260, 2))
        image = rng.integers(0, 256, (height + 9, width + 13, 3), dtype=np.uint8)
        if case % 2:  # smooth: sums near the clip and rounding boundaries are common in photos
            image = (np.cumsum(image.astype(np.int64), axis=1) // 40 % 256).astype(np.uint8)
        top, left = int(rng.integers(0, 10)), int(rng.integers(0, 14))
        out_w, out_h = (224, 224) if case % 5 == 0 else (112, 112) if case % 5 == 1 else rng.integers(1, 260, 2)
        yield (image[top:top + height, left:left + width], int(out_w), int(out_h),
               ("bilinear", "bicubic", "lanczos")[case % 3])


@native
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
def test_native_resampling_gives_pils_pixels_bit_for_bit(simd):
    mismatches = []
    for crop, width, height, name in random_cases(600):
        got = pixels._native_pixels.resample(crop, width, height, name, simd)
        expected = pil_two_pass(crop, width, height, name)
        if not np.array_equal(got, expected):
            mismatches.append((crop.shape, width, height, name, int(np.abs(got.astype(int) - expected).max())))
    assert not mismatches, mismatches[:5]


@native
def test_native_resampling_of_photos_matches_a_single_pil_resize_when_pil_runs_horizontal_first():
    """The views of ImageNet-like crops: every Pillow runs these horizontal first (neither axis shrinks much more)."""
    from engine.data.datasets import PHOTOS_DIR

    photo = np.asarray(Image.open(sorted(PHOTOS_DIR.glob("*.jpg"))[0]).convert("RGB"))
    for size, name in ((224, "bicubic"), (112, "lanczos")):
        crop = photo[40:340, 60:330]
        expected = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), FILTERS[name]))
        assert np.array_equal(pixels.resample(crop, size, size, name), expected)


def test_the_pil_path_gives_the_same_pixels_as_the_native_one(monkeypatch):
    cases = list(random_cases(60, seed=1))
    native_results = [pixels.resample(crop, w, h, name) for crop, w, h, name in cases]
    monkeypatch.setattr(pixels, "_native_pixels", None)
    assert pixels.resampler() == "PIL"
    for (crop, w, h, name), result in zip(cases, native_results):
        assert np.array_equal(pixels.resample(crop, w, h, name), result)
        assert np.array_equal(result, pil_two_pass(crop, w, h, name))


def test_resized_crop_and_resize_shapes_and_layout():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    view = pixels.resized_crop(image, (5, 10, 40, 30), 24, "bicubic")
    assert view.shape == (3, 24, 24) and view.stride() == (1, 72, 3)  # channels-last: the worker ships it contiguous
    assert np.array_equal(view.permute(1, 2, 0).numpy(), pil_two_pass(image[5:45, 10:40], 24, 24, "bicubic"))
    assert pixels.resize(image, 33, 17, "nearest").shape == (3, 17, 33)
    assert np.array_equal(pixels.resized_crop(image, (0, 0, 24, 24), 24, "lanczos").permute(1, 2, 0).numpy(),
                          image[:24, :24])  # same size: the crop itself


@native
def test_native_resampling_rejects_what_it_cannot_read():
    resample = pixels._native_pixels.resample
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="filter must be"):
        resample(image, 4, 4, "nearest")
    with pytest.raises(ValueError, match="packed pixels"):
        resample(image[:, ::-1], 4, 4, "bicubic")  # mirrored view: negative pixel stride
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        resample(np.zeros((8, 8), np.uint8), 4, 4, "bicubic")
    with pytest.raises(ValueError, match="positive"):
        resample(image, 0, 4, "bicubic")


def random_affine_cases(count: int, seed: int = 0):
    """(pixels, coefficients, fill) for RandAugment's maps: shears, translations past the border, rotations."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        height, width = (int(v) for v in rng.integers(1, 100, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if case % 2:
            image = (np.cumsum(image.astype(np.int64), axis=0) // 30 % 256).astype(np.uint8)
        shear, shift = float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.45, 0.45))
        coefficients = [(1.0, shear, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, shear, 1.0, 0.0),
                        (1.0, 0.0, shift * width, 0.0, 1.0, shift * height),
                        pixels.rotation_coefficients(float(rng.uniform(-30, 30)), width, height)][case % 4]
        yield image, coefficients, tuple(int(v) for v in rng.integers(0, 256, 3))


def pil_affine(image: np.ndarray, coefficients, name: str, fill) -> np.ndarray:
    return np.asarray(Image.fromarray(image).transform((image.shape[1], image.shape[0]), Image.Transform.AFFINE,
                                                       coefficients, resample=FILTERS[name], fillcolor=fill))


@native
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
def test_native_affine_gives_pils_pixels_bit_for_bit(simd):
    mismatches = []
    for image, coefficients, fill in random_affine_cases(200):
        for name in ("bilinear", "bicubic"):
            got = pixels._native_pixels.affine(image, list(coefficients), name, list(fill), simd)
            if not np.array_equal(got, pil_affine(image, coefficients, name, fill)):
                mismatches.append((image.shape, coefficients, name))
    assert not mismatches, mismatches[:5]


def test_affine_and_rotation_match_pil_on_either_path(monkeypatch):
    from engine.data.datasets import PHOTOS_DIR

    photo = np.asarray(Image.open(sorted(PHOTOS_DIR.glob("*.jpg"))[1]).convert("RGB").resize((224, 224)))
    expected = [np.asarray(Image.fromarray(photo).rotate(degrees, resample=Image.Resampling.BICUBIC,
                                                         fillcolor=(124, 116, 104))) for degrees in (-27.0, 13.5)]
    for backend in ("as built", "PIL"):
        if backend == "PIL":
            monkeypatch.setattr(pixels, "_native_pixels", None)
        for degrees, rotated in zip((-27.0, 13.5), expected):
            coefficients = pixels.rotation_coefficients(degrees, 224, 224)
            assert np.array_equal(pixels.affine(photo, coefficients, "bicubic", (124, 116, 104)), rotated), backend
        for image, coefficients, fill in random_affine_cases(12, seed=3):
            assert np.array_equal(pixels.affine(image, coefficients, "bilinear", fill),
                                  pil_affine(image, coefficients, "bilinear", fill)), backend


@native
def test_native_saturation_hue_gives_the_numpy_reference_bytes():
    """Segmentation's photometric distortion: the float32 HSV round trip, natively, byte for byte."""
    from engine.data.datasets import PHOTOS_DIR

    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(sorted(PHOTOS_DIR.glob("*.jpg"))[2]).convert("RGB"))[:200, :300]
    noise = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    greys = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # chroma 0, value 0 and 255
    for image in (photo, noise, greys, photo[:, ::-1]):  # a mirrored view too (negative strides)
        for saturation, hue_shift in ((None, None), (0.5, None), (1.5, None), (None, -18), (None, 17),
                                      (float(rng.uniform(0.5, 1.5)), int(rng.integers(-18, 18)))):
            expected = pixels.saturation_hue_reference(image, saturation, hue_shift)
            assert np.array_equal(pixels._native_pixels.saturation_hue(image, saturation, hue_shift), expected), \
                (image.shape, saturation, hue_shift)
