"""The DALI backend (engine/data/dali.py) in DALI's CPU mode, against the PIL backend's contract: batch structure,
shapes, dtypes and ranges, the same draws and masks, determinism and exact resume, pixels close to the PIL backend's
(which tests/test_data_pipeline_distribution.py bounds against the official pipeline), a short training run, and
one-line errors. The GPU mode is a `make gpu-check` step (benchmarks/gpu_check.py)."""

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_batches, epoch_batches
from PIL import Image

from engine.config import ConfigError
from engine.data import MIMPretrainDataset, PretrainTransform, build_dataset, build_loader
from engine.data.datasets import PHOTOS_DIR
from engine.data.masking import MaskingGenerator

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e '.[dali]')")
from engine.data.dali import build_dali_pretrain_loader, require_dali  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """ImageNet-sized JPEG crops of the embedded photos (and one PNG), in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index, path in enumerate(sorted(PHOTOS_DIR.glob("*.jpg")) * 3):
        photo = Image.open(path).convert("RGB")
        width, height = (500, 375) if index % 3 else (375, 500)
        scale = min(photo.width / width, photo.height / height, 1.0)
        w, h = int(width * scale), int(height * scale)
        left, top = rng.integers(photo.width - w + 1), rng.integers(photo.height - h + 1)
        image = photo.crop((left, top, left + w, top + h)).resize((width, height))
        folder = root / "train" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / (f"{index:03d}.png" if index == 5 else f"{index:03d}.jpg"), quality=90)
    return root


def _loaders(folder, batch_size=8, seed=3, workers=0):
    base = build_dataset(folder, "train")
    transform, masking = PretrainTransform(), MaskingGenerator((14, 14), 75, 16, None, backend="python")
    pil = build_loader(MIMPretrainDataset(base, transform, masking, seed=seed), batch_size, seed=seed)
    ours = build_dali_pretrain_loader(base, transform, masking, batch_size, 0, 1, seed, workers, CPU)
    return pil, ours


def test_batches_keep_the_pil_backends_contract_and_draws(photo_folder):
    pil, ours = _loaders(photo_folder)
    for reference, batch in zip(epoch_batches(pil, 0), epoch_batches(ours, 0)):
        assert [tuple(t.shape) for t in batch] == [tuple(t.shape) for t in reference]
        assert [t.dtype for t in batch] == [t.dtype for t in reference]
        assert torch.equal(batch[3], reference[3])  # masks
        assert torch.equal(batch[2][:, :6], reference[2][:, :6])  # jitter order and factors
        assert (batch[2][:, 6] - reference[2][:, 6]).abs().max() <= 2  # contrast means: thumbnail vs grid
        for view, reference_view in zip(batch[:2], reference[:2]):
            difference = (view.float() - reference_view.float()).abs()
            assert difference.mean() < 1.0, difference.mean()  # DALI's resampling vs torch's / PIL's
            assert view.float().mean() > 10 and view.max() > 200  # real pixels, the full range


def test_pixels_match_the_pil_backend_in_distribution(photo_folder):
    pil, ours = _loaders(photo_folder, batch_size=4)
    transform = PretrainTransform()
    moments = []
    for loader in (pil, ours):
        batches = [batch for epoch in range(3) for batch in epoch_batches(loader, epoch)]
        views = [transform.model_inputs(*batch[:3], torch.float32) for batch in batches]
        patches = torch.cat([patch for patch, _ in views])  # normalised, jittered: what the model sees
        moments.append((patches.mean(dim=(0, 2, 3)), patches.std(dim=(0, 2, 3))))
    (pil_mean, pil_std), (dali_mean, dali_std) = moments
    assert (pil_mean - dali_mean).abs().max() < 0.01 and (pil_std - dali_std).abs().max() < 0.01


@pytest.mark.slow
def test_deterministic_and_resumes_exactly(photo_folder):
    _, ours = _loaders(photo_folder, workers=2)
    first = epoch_batches(ours, 1)
    assert_same_batches(epoch_batches(ours, 1), first)
    assert_same_batches(epoch_batches(ours, 1, start_batch=1), first[1:])


def test_pretraining_runs_on_dali(photo_folder, tokenizer_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from pretrain_demo import config

    from engine.config import apply_overrides
    from engine.train.pretrain import run_pretraining

    cfg = apply_overrides(config(), [f"--data_path={photo_folder}", f"--tokenizer={tokenizer_dir}",
                                     f"--output_dir={tmp_path}", "--data_backend=dali", "--depth=1",
                                     "--batch_size=8", "--max_steps=2", "--num_workers=0", "--progress=false",
                                     "--heldout_images=0"])
    summary = run_pretraining(cfg)
    assert summary["step"] == 2 and (tmp_path / "pretrained" / "model.safetensors").is_file()


def test_errors_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="image folders and shards"):
        build_dali_pretrain_loader(build_dataset("embedded:fashion_mnist", "train"), PretrainTransform(28, 14),
                                   MaskingGenerator((7, 7), 10, 4, None, backend="python"), 4, 0, 1, 0, 0, CPU)
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(ConfigError, match="pip install nvidia-dali-cuda120"):
        require_dali()
