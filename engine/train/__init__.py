"""Training: DeepSpeed loop, schedules, parameter groups, atomic checkpoints, metrics (see `pretrain`/`finetune`)."""
