"""Memory that shards: a model built under ZeRO-3's `deepspeed.zero.Init` is the model built whole (same seed, same
weights, same optimizer groups), ZeRO's buffers are sized from the model, and DataLoader workers do not keep a copy
of the training process's memory."""

import gc

import deepspeed
import psutil
import pytest
import torch
from torch.utils.data import Dataset

from engine.data.loader import build_loader
from engine.factory import create_model
from engine.param_groups import param_groups
from engine.segmentation.model import create_segmenter
from engine.sharded import full_shape, gathered, is_partitioned
from engine.train.deepspeed_config import bucket_elements, build_deepspeed_config
from engine.train.runtime import init_distributed
from engine.train.settings import OptimSettings, RunSettings

BUILDS = {
    "pretraining": lambda: create_model("beit_tiny_patch4_32_8k_vocab", depth=2),
    "classifier": lambda: create_model("beit_tiny_patch4_32", depth=2, num_classes=10),
    "segmenter": lambda: create_segmenter("beit_tiny_patch4_32", 5, img_size=32, depth=4, channels=16,
                                          aux_channels=8),
}


def _zero3_config() -> dict:
    return build_deepspeed_config(RunSettings(batch_size=2, zero_stage=3), OptimSettings(), world_size=1)


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_a_model_built_under_zero_init_has_the_weights_of_one_built_whole(kind):
    init_distributed("cpu")
    torch.manual_seed(3)
    whole = BUILDS[kind]()
    torch.manual_seed(3)
    with deepspeed.zero.Init(config_dict_or_path=_zero3_config()):
        sharded = BUILDS[kind]()
    params = dict(sharded.named_parameters())
    assert all(is_partitioned(p) for p in params.values())
    with gathered(params.values(), modifier_rank=None):
        for name, param in whole.named_parameters():
            assert torch.equal(params[name].data, param.data), name  # init after partitioning reached the weights
    groups = {g["name"]: (g["weight_decay"], g["param_names"]) for g in param_groups(whole, 0.05)}
    assert {g["name"]: (g["weight_decay"], g["param_names"]) for g in param_groups(sharded, 0.05)} == groups
    assert [full_shape(p) for p in params.values()] == [p.shape for p in whole.parameters()]


def test_buckets_hold_one_transformer_block():
    with torch.device("meta"):
        model = create_model("beit_base_patch16_224_8k_vocab")
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert bucket_elements(model) == block == 7_088_640  # 12·768² weights + biases, norms, layer scales, rel-pos
    zero = build_deepspeed_config(RunSettings(batch_size=2, zero_stage=3), OptimSettings(), 2, block)
    assert zero["zero_optimization"]["reduce_bucket_size"] == block
    assert zero["zero_optimization"]["stage3_prefetch_bucket_size"] == block


class _Ones(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.ones(4)


def test_workers_do_not_keep_a_copy_of_memory_the_trainer_writes():
    """A forked worker would keep the old pages of every tensor the training process writes after the fork."""
    model_states = torch.zeros(256 * 2**20 // 4)  # 256 MiB, resident
    loader = build_loader(_Ones(), batch_size=4, num_workers=1)
    batches = iter(loader)
    next(batches)
    model_states.add_(1.0)  # the optimizer step: writes every page
    workers = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    largest_unique = max(p.memory_full_info().uss for p in workers)
    del batches, loader
    gc.collect()
    assert largest_unique < 192 * 2**20, f"a worker holds {largest_unique / 2**20:.0f} MiB of its own"


def test_pretrained_weights_load_into_a_model_partitioned_by_zero_init(tmp_path):
    from engine.checkpoint import load_checkpoint, save_pretrained

    init_distributed("cpu")
    pretrained = save_pretrained(create_model("beit_tiny_patch4_32_8k_vocab", depth=2), tmp_path / "pretrained")
    whole = BUILDS["classifier"]()
    load_checkpoint(whole, pretrained)
    with deepspeed.zero.Init(config_dict_or_path=_zero3_config()):
        sharded = BUILDS["classifier"]()
    with gathered(sharded.parameters()):  # as the fine-tuning and segmentation tasks load --finetune
        load_checkpoint(sharded, pretrained)
    params = dict(sharded.named_parameters())
    with gathered(params.values(), modifier_rank=None):
        for name, param in whole.named_parameters():
            if not name.startswith(("head.", "fc_norm.")):  # the classifier's own layers are not in the checkpoint
                assert torch.equal(params[name].data, param.data), name
