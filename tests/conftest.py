"""Test-wide settings.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The variable must be set before
triton is first imported, which is why it lives here and not in the kernels package (no import-time switches there).
"""

import os
import shutil
import tempfile

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tokenizers trained by tests are cached here, never in the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("BEIT_ENGINE_CACHE", tempfile.mkdtemp(prefix="beit-engine-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# For recipes run as subprocesses (`from conftest import SUBPROCESS_ENV`): the plain PyTorch kernel paths
# (TRITON_INTERPRET would make them crawl), and not the 1-rank process group that an in-process run of this session
# exported (RANK, MASTER_PORT, ...). Taken when conftest is imported, before any test runs.
_NOT_INHERITED = {"TRITON_INTERPRET", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def save_random_tokenizer(out):
    """A randomly initialised 14 px → 7×7 tokenizer (vocab 64, seed 0), as the demo's: labels without training
    one. The same weights on every call."""
    from engine.tokenizer import save_tokenizer
    from engine.tokenizer.dalle import DalleEncoder

    torch.manual_seed(0)
    save_tokenizer(out, DalleEncoder(group_count=2, n_hid=16, n_blk_per_group=1, vocab_size=64), input_size=14)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_random_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A random tiny MIM model (2 blocks, vocab 64) saved in our format: stands in for the pretraining demo's export."""
    from engine.checkpoint import save_pretrained
    from engine.factory import create_model

    torch.manual_seed(0)
    model = create_model("beit_mini_patch4_28_256_vocab", depth=2, vocab_size=64)
    return save_pretrained(model, tmp_path_factory.mktemp("pretrained") / "weights")


def finetune_demo_config():
    """recipes/finetune_demo.py's config, as the recipe builds it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from finetune_demo import config

    return config()


def run_finetune_demo(output_dir, *overrides: str) -> dict:
    """recipes/finetune_demo.py's config with `overrides`, fine-tuned in this process → the run's summary."""
    from engine.config import apply_overrides
    from engine.train.finetune import run_finetuning

    return run_finetuning(apply_overrides(finetune_demo_config(), [*overrides, f"--output_dir={output_dir}"]))


@pytest.fixture(scope="module")
def quadrant_data(tmp_path_factory):
    """A labelled IDX set of 28 px images whose class is the quadrant holding a bright square (120 train / 60 test):
    real labels that a linear probe can read, in a few KB."""
    import numpy as np

    from engine.data import write_idx

    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("quadrants")
    for prefix, n in (("train", 120), ("t10k", 60)):
        labels = np.arange(n, dtype=np.uint8) % 4
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels):
            row, col = divmod(int(label), 2)
            image[row * 14 + 2: row * 14 + 12, col * 14 + 2: col * 14 + 12] = 230
        write_idx(out / f"{prefix}-images-idx3-ubyte", images)
        write_idx(out / f"{prefix}-labels-idx1-ubyte", labels)
    return out


def epoch_batches(loader, epoch: int, start_batch: int = 0) -> list:
    """Every batch of `epoch` from `start_batch` on (engine.data.loader.set_loader_epoch, then the loader)."""
    from engine.data.loader import set_loader_epoch

    set_loader_epoch(loader, epoch, start_batch)
    return list(loader)


def assert_same_batches(a: list, b: list) -> None:
    """Two lists of batches (tuples of tensors) are equal, tensor by tensor."""
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))


def write_tiny_coco(root, size: int = 40) -> dict:
    """A COCO-format folder of three training and two validation images: category ids 3, 17 and 90 (not
    contiguous), polygon and RLE masks, a crowd annotation and an image with no annotation → the written dicts."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    root = Path(root)
    categories = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 90, "name": "toaster"}]
    rng = np.random.default_rng(0)

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}

    written = {}
    for split, count in (("train", 3), ("val", 2)):
        (root / f"{split}2017").mkdir(parents=True)
        images, annotations = [], []
        for index in range(count):
            image_id = 10 * index + 1  # not contiguous either
            Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(
                root / f"{split}2017" / f"{image_id:012d}.jpg")
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": size, "width": size + 8})
            if split == "train" and index == 2:
                continue  # no annotation: skipped in training
            square = np.zeros((size, size + 8), dtype=bool)
            square[5:20, 8:30] = True
            polygon = [[2.0, 22.0, 14.0, 22.0, 14.0, 36.0, 2.0, 36.0]]
            annotations += [
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": 17, "iscrowd": 0,
                 "segmentation": rle(square), "bbox": [8.0, 5.0, 22.0, 15.0], "area": float(square.sum())},
                {"id": len(annotations) + 2, "image_id": image_id, "category_id": 90 if index else 3, "iscrowd": 0,
                 "segmentation": polygon, "bbox": [2.0, 22.0, 12.0, 14.0], "area": 168.0}]
            if index == 0:
                crowd = np.zeros_like(square)
                crowd[25:38, 30:46] = True
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 3,
                                    "iscrowd": 1, "segmentation": rle(crowd), "bbox": [30.0, 25.0, 16.0, 13.0],
                                    "area": float(crowd.sum())})
        (root / "annotations").mkdir(exist_ok=True)
        written[split] = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(written[split]))
    return written
