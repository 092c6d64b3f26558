"""Trained tokenizers, cached by what determines them: the training settings and the identity of the data.

A pretraining run without `--tokenizer` trains one (minutes on a CPU). The result depends only on the settings of
`TokenizerTrainConfig` (not where it is written, how often it logs, or on which device) and on the data, so it is
kept under `<cache>/<key>/` (`<cache>` = `$BEIT_ENGINE_CACHE/tokenizers`, by default
`~/.cache/beit-engine/tokenizers`) and reused by every later run with the same inputs, whatever its `--output_dir`.
The data's identity: the dataset name for the embedded and installed sets; for a folder, its resolved path and, for
every directory under it, the number of entries and the modification time (adding, removing or renaming files
changes them; editing a file in place does not: delete the cache entry then). Only directories are listed, no image
is opened, so this stays quick on large folders. A tokenizer is trained
into a temporary directory and renamed into place when complete, so a killed run never leaves a half-written entry.
"""

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from engine.data.datasets import EMBEDDED_PREFIX, build_dataset
from engine.tokenizer.io import CONFIG_FILE as TOKENIZER_CONFIG
from engine.tokenizer.train import TokenizerTrainConfig, train_tokenizer

logger = logging.getLogger(__name__)

CACHE_ENV = "BEIT_ENGINE_CACHE"
_RUN_ONLY_FIELDS = ("output_dir", "log_every", "device", "num_threads")  # do not change the trained weights


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/beit-engine")).expanduser() / "tokenizers"


def data_identity(data_path: str) -> dict:
    """What identifies the images a tokenizer is trained on (see the module docstring)."""
    if data_path.startswith(EMBEDDED_PREFIX) or data_path == "fashion_mnist_full":
        return {"dataset": data_path}
    root = Path(data_path).expanduser().resolve()
    if not root.is_dir():
        build_dataset(data_path, "train")  # raises the data path's own clear error
    directories = {}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        directories[os.path.relpath(directory, root)] = (len(subdirs) + len(files), os.stat(directory).st_mtime_ns)
    return {"folder": str(root), "directories": directories}


def cache_key(cfg: TokenizerTrainConfig) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_ONLY_FIELDS}
    blob = json.dumps({"settings": settings, "data": data_identity(cfg.data_path)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_tokenizer(cfg: TokenizerTrainConfig, cache_dir: str | Path | None = None, is_main: bool = True) -> Path:
    """The tokenizer directory for `cfg`: from the cache, or trained into it now (by the main rank; the others wait).
    The entry also holds the training run's metrics.json, config.json and reconstructions.png."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache_dir / cache_key(cfg)
    tokenizer_dir = entry / "tokenizer"
    if (tokenizer_dir / TOKENIZER_CONFIG).is_file():
        logger.info("reusing the cached tokenizer %s (same settings and data; delete it to retrain)", tokenizer_dir)
        return tokenizer_dir
    if not is_main:
        logger.info("waiting for rank 0 to train the tokenizer into %s", tokenizer_dir)
        while not (tokenizer_dir / TOKENIZER_CONFIG).is_file():
            time.sleep(2)
        return tokenizer_dir
    staging = cache_dir / f"{entry.name}.partial"  # a stopped training's state stays here and is continued
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run training this entry now: wait for it, then reuse its result
        if (tokenizer_dir / TOKENIZER_CONFIG).is_file():
            logger.info("reusing the tokenizer another run just trained: %s", tokenizer_dir)
            return tokenizer_dir
        logger.info("training a tokenizer (%d steps on %s) into the cache: %s", cfg.steps, cfg.data_path, entry)
        train_tokenizer(dataclasses.replace(cfg, output_dir=str(staging)))
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry (no tokenizer.json) left by an older version
        os.replace(staging, entry)
    return tokenizer_dir
