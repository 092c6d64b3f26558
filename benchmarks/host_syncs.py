"""Counts host syncs per training step: calls that make the host wait for the device (`Tensor.item`, `.tolist`,
`float(t)`, `int(t)`, `bool(t)`, `.cpu()`, `.numpy()`), made by the project's own hot-path code.

On a GPU each such call drains the launch queue; on a CPU run nothing waits, but the calls are the same, so counting
them on a CPU shows what a GPU run would stall on. Steps are delimited by calls of the DeepSpeed engine's forward:
interval k (1-based) holds step k's forward, backward, update and whatever follows it (its logging, evaluation,
saving) up to step k + 1's forward; interval 0 is the set-up. With grad_accum > 1 an interval is one micro-batch.
Data preparation (`engine/data`, which runs in DataLoader workers in real runs) is not counted.

    with HostSyncCounter(roots) as counter:
        run_pretraining(cfg)
    counter.per_interval  # {k: number of syncs in optimizer step k (and what follows it), ...}
"""

import collections
import sys
from pathlib import Path

import torch

SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")
ROOT = Path(__file__).resolve().parents[1]
HOT_PATH = tuple(str(ROOT / part) for part in ("engine/train", "engine/model.py", "engine/tokenizer", "beit_kernels"))


class HostSyncCounter:
    def __init__(self, roots: tuple[str, ...] = HOT_PATH):
        self.roots = roots
        self.steps = 0  # engine forward calls so far (optimizer steps at grad_accum 1)
        self.per_interval: collections.Counter = collections.Counter()
        self.callers: dict[int, list[str]] = collections.defaultdict(list)
        self._saved = {}

    def _wrap(self, name: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(counter.roots):
                counter.per_interval[counter.steps] += 1
                counter.callers[counter.steps].append(f"{caller.f_code.co_filename}:{caller.f_lineno} {name}")
            return original(tensor, *args, **kwargs)

        return wrapper

    def __enter__(self) -> "HostSyncCounter":
        from deepspeed.runtime.engine import DeepSpeedEngine

        for name in SYNC_METHODS:
            self._saved[(torch.Tensor, name)] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        original_forward = DeepSpeedEngine.forward
        self._saved[(DeepSpeedEngine, "forward")] = original_forward
        counter = self

        def forward(engine, *args, **kwargs):
            counter.steps += 1
            return original_forward(engine, *args, **kwargs)

        DeepSpeedEngine.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)

    def syncs_in(self, steps) -> int:
        """Syncs in the intervals of the given optimizer steps (1-based)."""
        return sum(self.per_interval[step] for step in steps)
