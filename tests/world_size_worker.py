"""Run by tests/test_cluster.py in one or two processes (SLURM variables): short pretraining runs and output_dir
copies, one after another in the same processes, so imports and the process group are paid for once.

    python tests/world_size_worker.py TOKENIZER_DIR 'run OUT MAX_STEPS STAGE' 'copy SRC DST' ... [--key=value ...]
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

import torch.distributed as dist  # noqa: E402
from pretrain_demo import config  # noqa: E402

from engine.config import apply_overrides  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402

if __name__ == "__main__":
    tokenizer, actions = sys.argv[1], [a for a in sys.argv[2:] if not a.startswith("--")]
    overrides = [a for a in sys.argv[2:] if a.startswith("--")]
    for action in actions:
        kind, *args = action.split()
        if kind == "copy":
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.copytree(args[0], args[1])
            if dist.is_initialized():
                dist.barrier()
        else:
            out, max_steps, stage = args
            run_pretraining(apply_overrides(config(), [*overrides, f"--tokenizer={tokenizer}", f"--output_dir={out}",
                                                       f"--max_steps={max_steps}", f"--zero_stage={stage}"]))
