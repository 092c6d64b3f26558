"""Mixup / CutMix: soft targets, lam behaviour, cutmix box, even-batch rule, soft-target cross-entropy."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data import Mixup, SoftTargetCrossEntropy, mixup_target


def _batch(batch_size=4, size=8):
    x = torch.arange(batch_size, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()
    return x, torch.tensor([0, 1, 2, 3][:batch_size])  # sample i is filled with the value i


def test_mixup_target_smoothing_and_sum():
    target = mixup_target(torch.tensor([0, 2]), num_classes=4, lam=0.7, smoothing=0.1)
    assert torch.allclose(target.sum(dim=1), torch.ones(2))
    on, off = 1 - 0.1 + 0.025, 0.025
    expected_row0 = torch.tensor([0.7 * on + 0.3 * off, off, 0.7 * off + 0.3 * on, off])
    assert torch.allclose(target[0], expected_row0)


def test_mixup_only_blends_with_flipped_batch():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=4, label_smoothing=0.0)
    x, y = _batch()
    rng = np.random.default_rng(0)
    lam, _ = mixup.sample_params(np.random.default_rng(0))
    mixed, target = mixup(x, y, rng)
    assert torch.allclose(mixed[0], torch.full((3, 8, 8), lam * 0 + (1 - lam) * 3))
    assert torch.allclose(mixed[1], torch.full((3, 8, 8), lam * 1 + (1 - lam) * 2))
    assert torch.allclose(target[0, 0], torch.tensor(lam)) and torch.allclose(target[0, 3], torch.tensor(1 - lam))
    assert torch.allclose(target.sum(dim=1), torch.ones(4))


def test_cutmix_lam_is_the_pasted_area():
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=4, label_smoothing=0.1)
    for seed in range(10):
        x, y = _batch(size=16)
        mixed, target = mixup(x, y, np.random.default_rng(seed))
        pasted = (mixed[0, 0] == 3).float().mean()  # sample 0 (value 0) receives pixels of sample 3
        lam = 1 - pasted
        assert torch.allclose(target.sum(dim=1), torch.ones(4))
        on, off = 1 - 0.1 + 0.025, 0.025
        assert torch.allclose(target[0, 0], lam * on + (1 - lam) * off)


def test_switch_and_prob():
    x, y = _batch()
    never = Mixup(prob=0.0, num_classes=4, label_smoothing=0.0)
    mixed, target = never(x.clone(), y, np.random.default_rng(0))
    assert torch.equal(mixed, x) and torch.equal(target, F.one_hot(y, 4).float())
    both = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, num_classes=4)
    choices = [both.sample_params(np.random.default_rng(seed))[1] for seed in range(200)]
    assert 60 < sum(choices) < 140  # cutmix about half of the time
    assert all(0 <= both.sample_params(np.random.default_rng(s))[0] <= 1 for s in range(50))


def test_odd_batch_and_bad_arguments_are_clear_errors():
    x, y = _batch(batch_size=3)
    with pytest.raises(ValueError, match="even batch size"):
        Mixup(num_classes=4)(x, y)
    with pytest.raises(ValueError, match="mode"):
        Mixup(mode="elem", num_classes=4)
    with pytest.raises(ValueError, match="not both 0"):
        Mixup(mixup_alpha=0, cutmix_alpha=0, num_classes=4)


def test_soft_target_cross_entropy_matches_hard_labels():
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    loss = SoftTargetCrossEntropy()(logits, F.one_hot(labels, 5).float())
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    smoothed = mixup_target(labels, 5, lam=1.0, smoothing=0.1)
    assert torch.allclose(SoftTargetCrossEntropy()(logits, smoothed), F.cross_entropy(logits, labels,
                                                                                      label_smoothing=0.1))
