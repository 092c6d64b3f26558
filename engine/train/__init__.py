"""The training loop and its tasks (pretraining, classification, segmentation)."""

import os

import torch

# Without a GPU, DeepSpeed warns at import that it "was unable to detect" one, on every CPU run. Naming its CPU
# accelerator (unless the user chose one) keeps that message off CPU machines; on GPU machines nothing changes.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"
