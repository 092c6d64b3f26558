"""BatchNorm that computes in fp32 under every precision the recipes allow, for the segmentation (and detection)
necks and heads.

DeepSpeed's bf16/fp16 modes cast a model's parameters and leave its buffers as they are (earlier DeepSpeed cast
both): a plain BatchNorm then meets bf16 weights, fp32 running statistics and bf16 activations, which fails on a CPU
(`expected scalar type BFloat16 but found Float`) and, where a GPU kernel accepts the mix, keeps statistics of
squared activations in 8 mantissa bits. These norms upcast their input, parameters and statistics for the one
operation (the gradient still reaches the low-precision parameter through the cast), update the running statistics
in their own dtype, and return the input's dtype. State-dict names and dtypes are nn.BatchNorm2d's.
"""

import torch
import torch.distributed as dist
import torch.nn as nn

_PARAMETERS = ("weight", "bias")
_STATISTICS = ("running_mean", "running_var")


class _Float32Arithmetic:
    """Mixin over a torch BatchNorm class: its own forward, run on fp32 views of the tensors. The views are taken
    inside this module's forward, i.e. after ZeRO-3's pre-forward hook has gathered the parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swapped = {}  # (store, name) → the tensor the module holds
        for store, names in ((self._parameters, _PARAMETERS), (self._buffers, _STATISTICS)):
            for name in names:
                held = store.get(name)
                if held is not None and held.dtype != torch.float32:
                    swapped[(id(store), name)] = (store, held)
                    store[name] = held.float()
        try:
            out = super().forward(x.float())
        finally:
            for (_, name), (store, held) in swapped.items():
                if name in _STATISTICS:  # updated in place in fp32 by the forward: written back in its own dtype
                    held.copy_(store[name])
                store[name] = held
        return out.to(x.dtype)


class BatchNorm2d(_Float32Arithmetic, nn.BatchNorm2d):
    """nn.BatchNorm2d in fp32 whatever the dtypes of its input, parameters and statistics."""


class SyncBatchNorm(_Float32Arithmetic, nn.SyncBatchNorm):
    """nn.SyncBatchNorm (statistics over all ranks, CUDA only) in fp32 whatever the dtypes it is given."""


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `model` (neck and heads) → `SyncBatchNorm` with the same parameters and statistics,
    returned (the model may be a new object). Call it when world_size > 1, before DDP / DeepSpeed wrap the model
    (`create_segmenter(sync_bn=True)` does). torch's own converter would build plain nn.SyncBatchNorm."""
    if isinstance(model, nn.BatchNorm2d):
        synced = SyncBatchNorm(model.num_features, model.eps, model.momentum, model.affine,
                               model.track_running_stats)
        for name, tensor in [*model._parameters.items(), *model._buffers.items()]:
            setattr(synced, name, tensor)  # the same objects (ZeRO-3 may have partitioned the parameters already)
        synced.train(model.training)
        return synced
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child))
    return model


def average_running_statistics(model: nn.Module) -> None:
    """Running means and variances of `model`'s per-rank BatchNorms (not SyncBatchNorm) averaged over the ranks of
    the default process group, in place (timm's `distribute_bn(reduce=True)`). Ranks without SyncBatchNorm (CPU
    ranks) update their statistics from their own images and drift apart; call this before evaluating or saving so
    every rank scores, and the saved weights hold, the same model. No-op without a group of several ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    statistics = [tensor for module in model.modules()
                  if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)
                  and module.track_running_stats for tensor in (module.running_mean, module.running_var)]
    if not statistics:
        return
    flat = torch.cat([tensor.detach().float().flatten() for tensor in statistics])  # one all-reduce for all
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for tensor, averaged in zip(statistics, flat.split([t.numel() for t in statistics])):
        tensor.copy_(averaged.view_as(tensor))
