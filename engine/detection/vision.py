"""torchvision, checked once: detection is built from its models and ops, and its wheels on the package index are
built against the CUDA build of torch, so next to a CPU-only build of torch (`torch==2.13.0+cpu`) its compiled ops
do not load and its import fails. That is a one-line error naming the pair to install, never a traceback."""

import functools
import importlib

import torch

from engine.config import ConfigError

INSTALL_HINT = ("install a matching pair: `make install-detection` (torch===2.13.0, the CUDA build, which also runs "
                "on a CPU, and torchvision==0.28.0), or torch and torchvision from the same CPU wheel index")


@functools.cache
def require_torchvision():
    """The torchvision module, or ConfigError saying why it cannot be used and what to install."""
    try:
        torchvision = importlib.import_module("torchvision")
    except ImportError:
        raise ConfigError(f"detection needs torchvision, which is not installed: {INSTALL_HINT}") from None
    except RuntimeError as err:  # "operator torchvision::nms does not exist": its compiled ops did not load
        raise ConfigError(f"torchvision does not load its compiled ops with torch {torch.__version__} ({err}): "
                          f"{INSTALL_HINT}") from None
    importlib.import_module("torchvision.models.detection")
    return torchvision
