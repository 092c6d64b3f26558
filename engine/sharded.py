"""Parameters that DeepSpeed ZeRO-3 partitions while the model is being built (`deepspeed.zero.Init`).

Under zero.Init each parameter is split over the ranks as soon as the module that owns it is constructed: a rank
keeps its shard (`param.ds_tensor`), `param.data` is empty and `param.ds_shape` is the real shape. Code that reads or
writes whole parameters outside a forward pass (initialisation after a child module exists, loading weights, rules
that look at shapes) goes through these helpers, which do nothing to ordinary parameters.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_partitioned(param) else param.numel()


@contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = 0) -> Iterator[None]:
    """Whole parameters inside the block (an all-gather per block, so gather one module's at a time). What rank
    `modifier_rank` writes there is what every rank keeps (it is broadcast on exit); None: read only."""
    partitioned = [param for param in params if is_partitioned(param)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
