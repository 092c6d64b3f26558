"""The probe tool (engine/probe.py, recipes/linear_probe.py) and the held-out masked-token check
(engine/train/heldout.py): classifiers on known data, the JSON and summary of a tiny checkpoint, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import save_pretrained
from engine.factory import create_model
from engine.probe import ProbeConfig, ProbeSettings, fit_linear, knn_predict, probe, run_probe, summary_line
from engine.train.heldout import position_prior, prior_metrics

ROOT = Path(__file__).resolve().parents[1]


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four well-separated Gaussian classes in 8 dimensions: `[n, 8]` features, `[n]` labels."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    centres = torch.eye(8)[:4] * 6
    return centres[labels] + torch.randn(n, 8, generator=gen), labels


def test_linear_and_knn_separate_blobs():
    train_x, train_y = blobs(200, 0)
    test_x, test_y = blobs(100, 1)
    classifier = fit_linear(train_x, train_y, 4, l2=1e-3, steps=50)
    assert (classifier(test_x).argmax(1) == test_y).float().mean() > 0.97
    scores = knn_predict(train_x, train_y, test_x, 4, k=5, temperature=0.07)
    assert scores.shape == (100, 4) and (scores.argmax(1) == test_y).float().mean() > 0.97


def test_probe_picks_the_informative_layer_on_validation():
    train_x, train_y = blobs(200, 0)
    test_x, test_y = blobs(100, 1)
    noise = torch.randn(200, 8), torch.randn(100, 8)  # layer 1 carries no label information
    result = probe((torch.stack([noise[0], train_x]), train_y), (torch.stack([noise[1], test_x]), test_y), 4,
                   ProbeSettings(lbfgs_steps=30))
    assert result["linear"]["layer"] == 2 and result["knn"]["layer"] == 2
    assert result["linear"]["acc1"] > 95 and result["per_layer"][0]["linear_test"] < 50


def test_position_prior_baseline():
    labels = torch.tensor([[1, 2, 3], [1, 2, 0], [1, 0, 3]])  # position 0 always token 1
    masks = torch.tensor([[True, False, False], [True, True, False], [False, False, True]])
    log_prior = position_prior(labels, vocab_size=4)
    assert torch.allclose(log_prior.exp().sum(1), torch.ones(3))
    assert log_prior[0].argmax() == 1 and log_prior[2].argmax() == 3
    loss, acc = prior_metrics(log_prior, masks, labels)
    assert acc == pytest.approx(1.0) and 0 < loss < np.log(4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = create_model("beit_tiny_patch4_32_8k_vocab", img_size=28, depth=2, vocab_size=64)
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "pretrained")


def test_run_probe_writes_json_and_summary(tiny_checkpoint, quadrant_data, tmp_path):
    output = tmp_path / "probe.json"
    summary = run_probe(ProbeConfig(checkpoint=str(tiny_checkpoint), data_path=str(quadrant_data), output=str(output),
                                    batch_size=64, settings=ProbeSettings(lbfgs_steps=20)))
    written = json.loads(output.read_text())
    assert written["num_train"] == 120 and written["num_test"] == 60 and written["num_classes"] == 4
    for arm in ("pretrained", "random_init"):
        assert 1 <= written[arm]["linear"]["layer"] <= 2 and len(written[arm]["per_layer"]) == 2
        # the quadrant is readable even from a random ViT (both give 100% here; 25% is chance)
        assert written[arm]["linear"]["acc1"] > 50 and written[arm]["knn"]["acc1"] > 50
    assert written["gain"]["linear"] == pytest.approx(written["pretrained"]["linear"]["acc1"]
                                                      - written["random_init"]["linear"]["acc1"])
    line = summary_line(summary)
    assert "linear probe" in line and "k-NN" in line and "\n" not in line


@pytest.mark.slow
def test_probe_recipe_errors_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, str(ROOT / "recipes" / "linear_probe.py"),
                              f"--checkpoint={tmp_path / 'nope'}"], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_key = subprocess.run([sys.executable, str(ROOT / "recipes" / "linear_probe.py"), "--knn=3"],
                             capture_output=True, text=True)
    assert bad_key.returncode == 2 and "knn" in bad_key.stderr and "Traceback" not in bad_key.stderr
