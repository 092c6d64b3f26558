"""The device a run, a probe or a benchmark asks for: `--device=auto|cuda|cpu`."""

import torch


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use --device=cpu (or auto)")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected auto, cuda or cpu")
    return device
