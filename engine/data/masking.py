"""BEiT block-wise masking (unilm `beit/masking_generator.py`), with a deterministic per-sample API.

A mask is built block by block until it holds `num_masking_patches` patches. Each block gets up to 10 attempts:
draw an area in U(min_num_patches, patches still allowed) and an aspect ratio log-uniform in
[min_aspect, max_aspect], round to an h x w rectangle strictly smaller than the grid, place it uniformly, and
accept it if it adds between 1 and the allowed number of new patches. A block with 10 failed attempts ends the
mask early, so a mask never exceeds the target but can fall short of it (75 of 196: 74.5 on average).

Determinism: `for_sample(seed, epoch, index)` and `batch(seed, epoch, indices)` depend only on those numbers (and
the backend), not on worker count, batch composition or call order, so a resumed run sees the same masks.

Backends (constructor argument `backend`, resolved once and logged):
- "python": numpy; sample `index` uses `np.random.default_rng([seed, epoch, index])`.
- "native": the C++ extension `engine.data._native_masking` (csrc/masking.cpp, built by `pip install -e .`);
  same algorithm and distribution, different random stream (xoshiro256** seeded from (seed, epoch, index)),
  so its masks differ from the Python ones for the same sample. About 100x faster (benchmarks/bench_masking.py).
- "auto": native when importable, else python.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence
from typing import Literal

import numpy as np

try:
    from engine.data import _native_masking
    _NATIVE_IMPORT_ERROR: str | None = None
except ImportError as err:  # extension not built (or built for another interpreter): the Python path is used
    _native_masking = None
    _NATIVE_IMPORT_ERROR = str(err)

logger = logging.getLogger(__name__)

Backend = Literal["auto", "native", "python"]
_BACKENDS = ("auto", "native", "python")
_ATTEMPTS_PER_BLOCK = 10  # as in the official generator
_MAX_KEY = 2**63  # seed, epoch and index must fit a signed 64-bit int (numpy index arrays, the C++ uint64 keys)


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _as_key(name: str, value: object) -> int:
    key = _as_int(name, value)
    if not 0 <= key < _MAX_KEY:
        raise ValueError(f"{name} must be in [0, 2**63), got {key}")
    return key


def _as_index_array(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Sample indices → int64 [n], all in [0, 2**63)."""
    array = np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D sequence of ints, got shape {array.shape} of {array.dtype}")
    if array.min() < 0 or (array.dtype == np.uint64 and array.max() >= _MAX_KEY):
        raise ValueError(f"indices must be in [0, 2**63), got values from {array.min()} to {array.max()}")
    return array.astype(np.int64, copy=False)


def _parse_input_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, Sequence) and not isinstance(input_size, str):
        if len(input_size) != 2:
            raise ValueError(f"input_size must be an int or (height, width), got {input_size!r}")
        height, width = (_as_int("input_size", v) for v in input_size)
    else:
        height = width = _as_int("input_size", input_size)
    if height < 2 or width < 2:
        raise ValueError(f"input_size must be at least 2 x 2 patches (a block is strictly smaller than the grid in "
                         f"both directions, so a 1-wide grid can never be masked), got {height} x {width}")
    return height, width


def _resolve_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "python" or (backend == "auto" and _native_masking is None):
        return "python"
    if _native_masking is None:
        raise ImportError(f"backend='native' needs the compiled extension engine.data._native_masking, which could "
                          f"not be imported ({_NATIVE_IMPORT_ERROR}). Build it with `pip install -e .` (needs cmake "
                          f"and a C++17 compiler), or pass backend='auto' or 'python'.")
    return "native"


class MaskingGenerator:
    """Block-wise mask generator for a `height x width` patch grid (official BEiT arguments and defaults).

    Args:
        input_size: patch grid, an int for a square grid or (height, width); each side >= 2.
        num_masking_patches: target masked patches per mask, 1..height*width (BEiT: 75 of 196).
        min_num_patches: smallest block area drawn (BEiT pretraining: 16).
        max_num_patches: largest block area; None -> num_masking_patches.
        min_aspect: smallest block aspect ratio h / w, > 0.
        max_aspect: largest block aspect ratio; None -> 1 / min_aspect.
        backend: "auto" | "native" | "python" (see the module docstring).
        num_threads: threads the native backend uses per `batch` call (results do not depend on it).
    """

    def __init__(self, input_size: int | Sequence[int], num_masking_patches: int, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                 *, backend: Backend = "auto", num_threads: int = 1):
        self.height, self.width = _parse_input_size(input_size)
        self.num_masking_patches = _as_int("num_masking_patches", num_masking_patches)
        if not 1 <= self.num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches must be in [1, {self.num_patches}] for a {self.height} x "
                             f"{self.width} grid, got {self.num_masking_patches}")
        self.min_num_patches = _as_int("min_num_patches", min_num_patches)
        if not 1 <= self.min_num_patches <= self.num_patches:
            raise ValueError(f"min_num_patches must be in [1, {self.num_patches}], got {self.min_num_patches}")
        if max_num_patches is None:
            # May be below min_num_patches (e.g. 1 masked patch with blocks of >= 16): areas are then drawn
            # between the two, as Python's uniform does with reversed bounds.
            self.max_num_patches = self.num_masking_patches
        else:
            self.max_num_patches = _as_int("max_num_patches", max_num_patches)
            if self.max_num_patches < self.min_num_patches:
                raise ValueError(f"max_num_patches ({self.max_num_patches}) must be >= min_num_patches "
                                 f"({self.min_num_patches}), or None for num_masking_patches")

        if not (isinstance(min_aspect, (int, float)) and math.isfinite(min_aspect) and min_aspect > 0):
            raise ValueError(f"min_aspect must be a finite number > 0, got {min_aspect!r}")
        if max_aspect is None:
            max_aspect = 1 / min_aspect  # reversed when min_aspect > 1, which uniform handles like the official code
        elif not (isinstance(max_aspect, (int, float)) and math.isfinite(max_aspect) and max_aspect >= min_aspect):
            raise ValueError(f"max_aspect must be a finite number >= min_aspect ({min_aspect}), or None for "
                             f"1 / min_aspect; got {max_aspect!r}")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

        self.num_threads = _as_int("num_threads", num_threads)
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        self.backend = _resolve_backend(backend)
        if self.backend == "native":
            logger.info("%r: native backend (engine.data._native_masking, %d thread(s))", self, self.num_threads)
        else:
            reason = "requested" if backend == "python" else f"native extension unavailable: {_NATIVE_IMPORT_ERROR}"
            logger.info("%r: python backend (%s)", self, reason)

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def get_shape(self) -> tuple[int, int]:
        """(height, width) of the masks, as in the official generator."""
        return self.height, self.width

    def __repr__(self) -> str:
        return "MaskingGenerator(%d, %d -> [%d ~ %d], max = %d, %.3f ~ %.3f, backend=%s)" % (
            self.height, self.width, self.min_num_patches, self.max_num_patches, self.num_masking_patches,
            self.log_aspect_ratio[0], self.log_aspect_ratio[1], self.backend)

    def _place_block(self, mask: np.ndarray, max_mask: int, rng: np.random.Generator) -> int:
        """Up to 10 attempts to add one rectangle with 1..max_mask new patches to `mask` [h, w]; returns how many."""
        log_low, log_high = self.log_aspect_ratio
        for _ in range(_ATTEMPTS_PER_BLOCK):
            u_area, u_aspect, u_top, u_left = rng.random(4).tolist()  # one numpy call per attempt
            # uniform(a, b) = a + (b - a) * u, which (like Python's random.uniform) accepts b < a.
            target_area = self.min_num_patches + (max_mask - self.min_num_patches) * u_area
            aspect = math.exp(log_low + (log_high - log_low) * u_aspect)
            h = round(math.sqrt(target_area * aspect))  # round half to even, as Python's round
            w = round(math.sqrt(target_area / aspect))
            if w >= self.width or h >= self.height:
                continue
            top = int(u_top * (self.height - h + 1))  # randint(0, height - h), inclusive
            left = int(u_left * (self.width - w + 1))
            block = mask[top:top + h, left:left + w]
            added = h * w - int(np.count_nonzero(block))
            if 0 < added <= max_mask:
                block[...] = True
                return added
        return 0

    def gen(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """One mask (Python algorithm, whatever the backend): bool [height, width].

        Args:
            rng: numpy Generator to draw from; None -> a fresh `np.random.default_rng()` (not reproducible).
        """
        if rng is None:
            rng = np.random.default_rng()
        elif not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(seed)) or None, "
                            f"got {type(rng).__name__}")
        mask = np.zeros((self.height, self.width), dtype=bool)  # [h, w]
        count = 0
        while count < self.num_masking_patches:
            max_mask = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._place_block(mask, max_mask, rng)
            if added == 0:  # a block with 10 failed attempts ends the mask early, as in the official generator
                break
            count += added
        return mask

    __call__ = gen

    def for_sample(self, seed: int, epoch: int, index: int) -> np.ndarray:
        """The mask of dataset sample `index` in `epoch` of a run seeded with `seed`: bool [height, width].

        Depends only on (seed, epoch, index) and the backend, so a resumed run sees the same masks, and equals
        `batch(seed, epoch, [index])[0]`. Python backend: drawn from `np.random.default_rng([seed, epoch, index])`.
        """
        return self.batch(seed, epoch, [index])[0]

    def batch(self, seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Masks of samples `indices` (n non-negative ints) → bool [n, height, width]; row k = for_sample(..., k)."""
        seed, epoch = _as_key("seed", seed), _as_key("epoch", epoch)
        index_array = _as_index_array(indices)  # [n] int64
        if self.backend == "native":
            return _native_masking.generate_masks(
                self.height, self.width, self.num_masking_patches, float(self.min_num_patches),
                self.max_num_patches, *self.log_aspect_ratio, seed, epoch, index_array, self.num_threads)
        masks = np.zeros((len(index_array), self.height, self.width), dtype=bool)  # [n, h, w]
        for k, index in enumerate(index_array.tolist()):
            masks[k] = self.gen(np.random.default_rng([seed, epoch, index]))
        return masks
