"""Run by tests/test_train_deepspeed.py under `deepspeed --num_gpus 2` (two CPU ranks, gloo): one short pretraining
run per ZeRO stage in the same two processes, so the launch and import cost is paid once.

    deepspeed --num_gpus 2 tests/train_zero_stages_worker.py OUT_ROOT TOKENIZER_DIR STAGES [--key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from pretrain_demo import config  # noqa: E402

from engine.config import apply_overrides  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_root, tokenizer, stages, overrides = Path(args[0]), args[1], args[2], args[3:]
    for stage in stages.split(","):
        cfg = apply_overrides(config(), [*overrides, f"--tokenizer={tokenizer}", f"--zero_stage={stage}",
                                         f"--output_dir={out_root / f'zero{stage}'}"])
        run_pretraining(cfg)
