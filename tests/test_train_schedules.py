"""Schedules, parameter groups (weight decay and layer-wise LR decay) and the DeepSpeed JSON."""

import math

import numpy as np
import pytest
import torch

from engine.config import ConfigError, apply_overrides
from engine.factory import create_model
from engine.param_groups import layer_id_for_vit, param_groups
from engine.train.deepspeed_config import build_deepspeed_config
from engine.train.flops import train_flops_per_image
from engine.train.loop import resolve_lr
from engine.train.schedules import Schedules, apply_schedules, cosine_scheduler
from engine.train.settings import OptimSettings, PretrainConfig, RunSettings


def test_cosine_scheduler_matches_official_formula():
    sched = cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=10, warmup_epochs=1)
    assert sched.shape == (30,)
    np.testing.assert_allclose(sched[:10], np.linspace(0, 1, 10))  # warmup starts at 0 and ends at base
    i = np.arange(20)
    np.testing.assert_allclose(sched[10:], 0.1 + 0.45 * (1 + np.cos(np.pi * i / 20)))
    assert sched[-1] > 0.1 and math.isclose(sched[10], 1.0)


def test_warmup_steps_override_and_constant_schedule():
    assert (cosine_scheduler(1.0, 0.1, 2, 10, warmup_epochs=1, warmup_steps=4)[:4] == np.linspace(0, 1, 4)).all()
    np.testing.assert_allclose(cosine_scheduler(0.05, 0.05, 2, 5), 0.05)
    with pytest.raises(ValueError, match="at least one step"):
        cosine_scheduler(1.0, 0.0, 0, 10)


@pytest.mark.parametrize("name,depth,decay",
                         [("beit_base_patch16_224", 12, 0.65), ("beit_large_patch16_224", 24, 0.75)])
def test_layer_decay_groups_official_values(name, depth, decay):
    with torch.device("meta"):
        model = create_model(name)
    groups = param_groups(model, 0.05, layer_decay=decay, num_layers=depth)
    scale_of = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert math.isclose(scale_of["cls_token"], decay ** (depth + 1))
    assert math.isclose(scale_of["patch_embed.proj.weight"], decay ** (depth + 1))
    assert math.isclose(scale_of["blocks.0.attn.qkv.weight"], decay ** depth)
    assert math.isclose(scale_of[f"blocks.{depth - 1}.mlp.fc2.weight"], decay)
    assert scale_of["head.weight"] == scale_of["fc_norm.weight"] == 1.0
    assert wd_of["blocks.0.attn.qkv.weight"] == 0.05 and wd_of["head.weight"] == 0.05
    for no_decay in ("cls_token", "blocks.0.norm1.weight", "blocks.0.attn.q_bias", "blocks.0.gamma_1", "head.bias"):
        assert wd_of[no_decay] == 0.0, no_decay
    assert all(g["name"] == f"layer_{layer_id_for_vit(g['param_names'][0], depth)}_{g['name'].split('_', 2)[2]}"
               for g in groups)


def test_pretraining_groups_and_rel_pos_option():
    with torch.device("meta"):
        model = create_model("beit_base_patch16_224_8k_vocab")
    groups = param_groups(model, 0.05)
    assert {g["lr_scale"] for g in groups} == {1.0}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert wd_of["mask_token"] == 0.0 and wd_of["lm_head.weight"] == 0.05
    assert layer_id_for_vit("rel_pos_bias.relative_position_bias_table", 12) == 13
    assert wd_of["rel_pos_bias.relative_position_bias_table"] == 0.05
    skip = param_groups(model, 0.05, skip_rel_pos_tables=True)
    assert {n: g["weight_decay"] for g in skip for n in g["param_names"]}[
        "rel_pos_bias.relative_position_bias_table"] == 0.0


def test_apply_schedules_scales_lr_and_leaves_no_decay_groups():
    p1, p2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p1], "weight_decay": 0.05, "lr_scale": 0.5},
                             {"params": [p2], "weight_decay": 0.0, "lr_scale": 1.0}])
    lr, wd = apply_schedules(opt, Schedules(lr=np.array([2.0]), wd=np.array([0.1])), 0)
    assert (lr, wd) == (2.0, 0.1)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 2.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_lr_rule_and_deepspeed_json():
    assert resolve_lr(OptimSettings(lr=None, blr=1.5e-3), 2048) == pytest.approx(0.012)
    assert resolve_lr(OptimSettings(lr=1.5e-3), 2048) == 1.5e-3
    ds = build_deepspeed_config(RunSettings(batch_size=8, grad_accum=2, zero_stage=2, precision="fp16"),
                                OptimSettings(clip_grad=3.0), world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 3.0 and ds["zero_optimization"] == {"stage": 2}
    assert ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds


def test_bad_overrides_are_clear_errors():
    cfg = apply_overrides(PretrainConfig(), ["--lr=2e-3", "--run.zero_stage=2", "--precision=fp16"])
    assert cfg.optim.lr == 2e-3 and cfg.run.zero_stage == 2 and cfg.run.precision == "fp16"
    with pytest.raises(ConfigError, match="unknown config key --learning_rate"):
        apply_overrides(PretrainConfig(), ["--learning_rate=1"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(PretrainConfig(), ["--batch_size=big"])
    with pytest.raises(ConfigError, match="expected one of"):
        apply_overrides(PretrainConfig(), ["--precision=fp8"])


def test_flops_per_image_matches_reference_anchor():
    config = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, mlp_ratio=4.0, in_chans=3, vocab_size=8192)
    assert train_flops_per_image(config, 75) / 1e9 == pytest.approx(373.4, rel=2e-3)


class _FakeFp16Engine:
    """What StepHealth reads from a DeepSpeed engine: the skipped-step counter and the loss scale."""

    def __init__(self):
        self.skipped_steps = 0
        self.optimizer = type("Opt", (), {"cur_scale": 1.0})()

    def fp16_enabled(self) -> bool:
        return True


def test_fp16_overflow_steps_are_skipped_then_stop_with_a_clear_message():
    from engine.train.guards import StepHealth

    engine = _FakeFp16Engine()
    health = StepHealth(engine, "fp16", max_bad_steps=3, device=torch.device("cpu"))
    engine.skipped_steps += 1
    health.count_step(torch.tensor(float("nan")))  # skipped by the loss scaler: training goes on
    health.count_step(torch.tensor(1.0))  # a clean step resets the count
    health.check(2)  # fp16: non-finite losses are the loss scaler's business
    assert health.consecutive == 0 and health.total_skipped == 1
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite/overflowed steps"):
        for _ in range(3):
            engine.skipped_steps += 1
            health.count_step(torch.tensor(float("inf")))


def test_non_finite_loss_under_bf16_stops_at_the_next_check():
    from engine.train.guards import StepHealth

    health = StepHealth(_FakeFp16Engine(), "bf16", max_bad_steps=20, device=torch.device("cpu"))
    health.count_step(torch.tensor(float("nan")))  # counted on the device, no host sync
    health.count_step(torch.tensor(2.0))
    with pytest.raises(FloatingPointError, match="non-finite in 1 step\\(s\\) up to step 7 under bf16"):
        health.check(7)


def test_warmup_steps_zero_means_no_warmup():
    from engine.train.schedules import build_schedules
    from engine.train.settings import OptimSettings

    optim = OptimSettings(lr=1.0, min_lr=0.0, warmup_epochs=5, warmup_steps=0, lr_schedule="poly")
    assert build_schedules(optim, 1.0, total_steps=10, steps_per_epoch=2).lr[0] == 1.0  # not 5 epochs of warm-up
    optim.warmup_steps = -1  # the epochs then count
    assert build_schedules(optim, 1.0, total_steps=20, steps_per_epoch=2).lr[0] < 1e-5
