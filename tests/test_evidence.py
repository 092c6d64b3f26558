"""recipes/fashion_mnist_evidence.py end to end on a tiny labelled set: every stage runs, the results JSON holds
both arms and the probe, a rerun skips finished stages, and missing data is one clear line."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


@pytest.mark.slow
def test_evidence_pipeline_on_tiny_data(quadrant_data, tmp_path, capsys):
    import fashion_mnist_evidence

    argv = [f"--data_path={quadrant_data}", f"--output_dir={tmp_path / 'run'}", f"--results={tmp_path / 'res'}",
            "--tokenizer_steps=3", "--max_steps=2", "--pretrain_batch=16", "--finetune_batch=16", "--depth=1",
            "--num_workers=0", "--seeds=0", "--finetune_overrides=--eval_batch_size=30"]
    results = fashion_mnist_evidence.main(argv)
    written = json.loads((tmp_path / "res.json").read_text())
    assert written["num_train"] == 120 and written["num_test"] == 60
    assert set(written["finetune"]) == {"pretrained_seed0", "scratch_seed0"}
    assert written["finetune"]["pretrained_seed0"]["steps"] == 2
    assert set(written["targets"]) >= {"probe_gain_at_least_10", "pretrained_2_points_above_scratch"}
    assert written["pretraining"]["heldout"] and "prior_loss" in written["pretraining"]["heldout"][-1]
    assert set(written["wall_seconds"]) == {"tokenizer", "pretraining", "probe", "finetune_pretrained_seed0",
                                            "finetune_scratch_seed0"}
    assert results["probe"]["gain"]["linear"] == pytest.approx(written["probe"]["gain"]["linear"])
    capsys.readouterr()
    fashion_mnist_evidence.main(argv)  # a rerun finds every stage done
    assert capsys.readouterr().out.count("skipped") == 5
    with pytest.raises(SystemExit, match="other settings"):  # finished stages must not be reused for other settings
        fashion_mnist_evidence.main([*argv, "--finetune_epochs=5"])


def test_missing_data_is_one_line(tmp_path, capsys):
    import fashion_mnist_evidence

    with pytest.raises(SystemExit) as stop:
        fashion_mnist_evidence.main([f"--data_path={tmp_path / 'absent'}"])
    assert stop.value.code == 2 and "does not exist" in capsys.readouterr().err
