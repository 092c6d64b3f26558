"""Export to Hugging Face transformers: each exported folder loads into transformers' BEiT class with no missing,
unexpected or mismatched keys and gives our outputs; the preprocessing travels with the weights and round-trips; the
command's errors are one line; the upload is called as the hub expects (no network here: the call is stubbed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import preprocessing_record, read_preprocessing, save_pretrained
from engine.factory import create_model
from engine.train.export import export_hf, run_export_hf

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=8, attn_impl="eager")  # 4x4 token grid
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random, so that nothing matches by accident."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                fresh = torch.randn(tensor.shape, generator=generator) * 0.2
                tensor.copy_(fresh.abs() + 0.5 if name.endswith("running_var") else fresh)
    return model.eval()


def images(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def load_hf(cls, folder: Path):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def test_pretraining_model_loads_as_masked_image_modeling_with_equal_logits(tmp_path):
    ours = randomised(create_model("beit_tiny_patch4_32_8k_vocab", **TINY, vocab_size=16))
    save_pretrained(ours, tmp_path / "ours", preprocessing_record(*IMAGENET, 32, "bicubic"))
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = load_hf(transformers.BeitForMaskedImageModeling, tmp_path / "hf")
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images(), bool_masked_pos=mask).logits[mask], ours(images(), mask),
                                   atol=1e-4, rtol=1e-4)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(IMAGENET[0]) and not processor["do_center_crop"]


def test_classifier_loads_with_its_class_names_and_preprocessing(tmp_path):
    ours = randomised(create_model("beit_tiny_patch4_32", **TINY, num_classes=3))
    record = preprocessing_record((0.5,) * 3, (0.5,) * 3, 32, "bicubic", crop_pct=0.875, class_names=["a", "b", "c"])
    save_pretrained(ours, tmp_path / "ours", record)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = load_hf(transformers.BeitForImageClassification, tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images()).logits, ours(images()), atol=1e-4, rtol=1e-4)
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    # transformers' processor resizes to 32 / 0.875 → 36, centre-crops 32, normalises as we do
    processor = transformers.BeitImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.size == {"height": 36, "width": 36} and processor.crop_size == {"height": 32, "width": 32}
    assert list(processor.image_mean) == [0.5] * 3 and processor.resample == 3
    # and it round-trips: the engine reads the same record back from either folder
    assert read_preprocessing(tmp_path / "ours") == record
    back = read_preprocessing(tmp_path / "hf")
    assert (back["mean"], back["input_size"], back["interpolation"]) == (record["mean"], 32, "bicubic")
    assert back["crop_pct"] == pytest.approx(32 / 36)


def test_fine_tuning_normalises_as_the_checkpoint_was_trained_unless_told(tmp_path):
    """imagenet_mean_std=None (the published recipes' default) → the --finetune checkpoint's record, else 0.5/0.5."""
    from engine.train.resolve import checkpoint_uses_imagenet_mean_std

    model = create_model("beit_tiny_patch4_32", **TINY, num_classes=3)
    save_pretrained(model, tmp_path / "imagenet", preprocessing_record(*IMAGENET, 32, "bicubic"))
    save_pretrained(model, tmp_path / "half", preprocessing_record((0.5,) * 3, (0.5,) * 3, 32, "bicubic"))
    save_pretrained(model, tmp_path / "none")
    torch.save({"model": model.state_dict()}, tmp_path / "official.pth")
    assert checkpoint_uses_imagenet_mean_std(str(tmp_path / "imagenet")) is True
    for name in ("half", "none", "official.pth"):
        assert checkpoint_uses_imagenet_mean_std(str(tmp_path / name)) is False
    assert checkpoint_uses_imagenet_mean_std("") is False


def test_published_recipes_normalise_as_the_official_commands():
    """IN-1k pretraining with ImageNet statistics (--imagenet_default_mean_and_std), IN-22k pretraining 0.5/0.5 (the
    official default); fine-tuning and segmentation follow their checkpoint (0.5/0.5 for the released ones)."""
    from engine.train import published

    assert published.pretrain("base", "in1k").data.imagenet_mean_std is True
    assert published.pretrain("base", "in22k").data.imagenet_mean_std is False
    for cfg in (published.finetune("base"), published.finetune("large", "in22k"), published.segment("base")):
        assert cfg.data.imagenet_mean_std is None


def test_a_segmenter_is_refused_with_the_reason(tmp_path):
    from engine.config import ConfigError
    from engine.segmentation.model import create_segmenter
    from engine.train.export import ExportHFConfig

    save_pretrained(create_segmenter("beit_tiny_patch4_32", num_classes=5, **TINY), tmp_path / "ours")
    with pytest.raises(ConfigError, match="never the encoder's last block"):
        run_export_hf(ExportHFConfig(checkpoint=str(tmp_path / "ours"), output_dir=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


def test_transformers_segmentation_cannot_tap_the_last_block():
    """The fact behind the refusal, checked against the installed transformers: out_index i reads
    hidden_states[i - 1] (i.e. block i - 2, 0-based), and i may not exceed the depth."""
    config = transformers.BeitConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                     image_size=32, patch_size=8, num_labels=5, use_relative_position_bias=True,
                                     out_indices=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="out_indices"):
        transformers.BeitConfig(**{**config.to_dict(), "out_indices": [2, 3, 4, 5]})
    hf = transformers.BeitForSemanticSegmentation(config).eval()
    taps = []
    hf.fpn.register_forward_pre_hook(lambda module, args: taps.append(args[0]))
    with torch.no_grad():
        hidden = hf(pixel_values=images(), output_hidden_states=True).hidden_states
    for i, tap in zip(config.out_indices, taps[0]):
        assert torch.equal(tap, hidden[i - 1][:, 1:].transpose(1, 2).reshape(tap.shape))
    assert not any(torch.equal(tap, hidden[-1][:, 1:].transpose(1, 2).reshape(tap.shape)) for tap in taps[0])


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    """Everything up to the network: the hub client is stubbed, the calls it gets are checked."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from engine.train.export import ExportHFConfig

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    save_pretrained(create_model("beit_tiny_patch4_32", **TINY, num_classes=3), tmp_path / "ours")
    result = run_export_hf(ExportHFConfig(checkpoint=str(tmp_path / "ours"), output_dir=str(tmp_path / "hf"),
                                          push_to_hub="me/beit-tiny", private=True))
    assert result["url"] == "https://huggingface.co/me/beit-tiny"
    assert calls == [("create_repo", "me/beit-tiny", True, True),
                     ("upload_folder", "me/beit-tiny", ["config.json", "model.safetensors",
                                                        "preprocessor_config.json"])]


def test_the_command_names_a_missing_checkpoint_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "export_hf.py"), f"--checkpoint={tmp_path}/none",
                             f"--output_dir={tmp_path}/hf"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --checkpoint=")
