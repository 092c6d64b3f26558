"""No host syncs in the hot path: between two non-logging optimizer steps, the project's own code never reads a
device value on the host (benchmarks/host_syncs.py counts `item`, `tolist`, `float()`, `bool()`, `.cpu()`, ...)."""

import sys
from pathlib import Path

import pytest

from engine.config import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

from benchmarks.host_syncs import HostSyncCounter  # noqa: E402

# 7 steps, logs at steps 1 (first), 4 and 7 (last): steps 2, 3, 5 and 6 are quiet.
COMMON = ["--depth=2", "--batch_size=8", "--epochs=1", "--max_steps=7", "--log_every=4", "--num_workers=0",
          "--progress=false", "--save_every=0", "--warmup_steps=2", "--seed=3"]
QUIET_STEPS = (2, 3, 5, 6)


def _check(counter: HostSyncCounter) -> None:
    assert counter.steps == 7
    loud = counter.syncs_in((1, 4))
    assert loud > 0, "the counter saw no sync at all: it is not counting"
    quiet = {step: counter.callers[step] for step in QUIET_STEPS if counter.callers[step]}
    assert not quiet, f"host syncs after non-logging steps: {quiet}"


def test_pretraining_steps_do_not_sync(tokenizer_dir, tmp_path, monkeypatch):
    from pretrain_demo import config

    from engine.train.pretrain import run_pretraining

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = apply_overrides(config(), [*COMMON, f"--tokenizer={tokenizer_dir}", f"--output_dir={tmp_path}",
                                     "--heldout_every=4"])
    with HostSyncCounter() as counter:
        run_pretraining(cfg)
    _check(counter)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--mixup=0.8", "--cutmix=1.0", "--model_ema=true"], ["--mixup=0", "--cutmix=0"]])
def test_finetuning_steps_do_not_sync(tmp_path, monkeypatch, extra):
    from finetune_demo import config

    from engine.train.finetune import run_finetuning

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = apply_overrides(config(), [*COMMON, "--finetune=", f"--output_dir={tmp_path}", "--eval_batch_size=500",
                                     *extra])
    with HostSyncCounter() as counter:
        run_finetuning(cfg)
    _check(counter)


def test_logged_loss_is_weighted_by_masked_tokens_across_micro_batches():
    """Two micro-batches with different masked counts: the logged loss is the mean over all their masked tokens,
    as one batch would give, not the mean of the two means."""
    import torch

    from engine.factory import create_model
    from engine.train.loop import reduce_stats
    from engine.train.pretrain import MaskedImageModeling, MaskedImageModelingLoss

    torch.manual_seed(0)
    model = create_model("beit_mini_patch4_28_256_vocab", depth=1, vocab_size=32).eval()
    module = MaskedImageModelingLoss(model)
    images = torch.randn(4, 3, 28, 28)
    labels = torch.randint(0, 32, (4, 49))
    mask = torch.zeros(4, 49, dtype=torch.bool)
    mask[:2, :5] = True  # first micro-batch: 10 masked tokens
    mask[2:, :30] = True  # second: 60
    with torch.no_grad():
        halves = [module(images[i:i + 2], mask[i:i + 2], labels[i:i + 2]) for i in (0, 2)]
        whole_loss, whole_acc = model(images, mask, labels)
    values, weight = reduce_stats(halves[0][1] + halves[1][1], MaskedImageModeling.stat_names)
    assert weight == 70
    assert abs(values["loss"] - float(whole_loss)) < 1e-5 and abs(values["mlm_acc"] - float(whole_acc)) < 1e-6
    assert abs(values["loss"] - (float(halves[0][0]) + float(halves[1][0])) / 2) > 1e-4  # not a mean of means
