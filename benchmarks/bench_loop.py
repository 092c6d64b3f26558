"""The training loop before and after a change, in one run: demo pretraining throughput (img/s), host syncs per
step, and the loss curve, for two source trees on the same machine.

    git worktree add ../before <commit>          # the tree to compare against
    python benchmarks/bench_loop.py --before=../before --steps=150 --repeats=2

Each run is a subprocess that imports `engine` from its tree and pretrains the CPU demo model (recipes/pretrain_demo.py
settings: beit_mini at 28 px, batch 64, fp32, 1 worker) for `steps` steps with a fixed seed, on a random stand-in
tokenizer (or `--tokenizer`), counting host syncs with benchmarks/host_syncs.py. Runs alternate between the trees
(before, after, before, after, ...) so that machine drift hits both alike. img/s is the median over the logged
windows after the first (start-up); syncs are counted per step, logging steps apart from the others. Rows go to
benchmarks/results/train_loop.jsonl, the loss curves of the first repeat to benchmarks/results/train_loop.png.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, append_rows, environment  # noqa: E402
from engine.config import parse_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 10

# Runs inside the subprocess: argv = tree, output dir, tokenizer dir, steps, result file.
_CHILD = """
import json, sys
from pathlib import Path
tree, out, tokenizer, steps, result = sys.argv[1:6]
sys.path[:0] = [tree, str(Path(tree) / "recipes")]
import importlib.util
spec = importlib.util.spec_from_file_location("host_syncs", {host_syncs!r})
host_syncs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_syncs)
from pretrain_demo import config
from engine.config import apply_overrides
from engine.train.pretrain import run_pretraining
cfg = apply_overrides(config(), [f"--tokenizer={{tokenizer}}", f"--output_dir={{out}}", f"--max_steps={{steps}}",
                                 "--log_every={log_every}", "--save_every=0", "--progress=false",
                                 f"--heldout_every={{10 ** 9}}"])
roots = tuple(str(Path(tree) / p) for p in ("engine/train", "engine/model.py", "engine/tokenizer", "beit_kernels"))
with host_syncs.HostSyncCounter(roots) as counter:
    run_pretraining(cfg)
Path(result).write_text(json.dumps({{"per_interval": dict(counter.per_interval), "steps": counter.steps}}))
"""


@dataclass
class LoopBenchConfig:
    before: str = ""  # source tree to compare with (a `git worktree` of an older commit); "" runs this one only
    steps: int = 150
    repeats: int = 2
    tokenizer: str = ""  # "" → a random 14 px / 256-token stand-in (the demo tokenizer's shape)
    threads: int = 0  # torch threads per run; 0 keeps the default


def _stand_in_tokenizer(directory: Path) -> Path:
    import torch

    from engine.tokenizer import save_tokenizer
    from engine.tokenizer.dalle import DalleEncoder

    torch.manual_seed(0)
    return save_tokenizer(directory, DalleEncoder(group_count=2, n_hid=32, n_blk_per_group=1, vocab_size=256),
                          input_size=14)


def _commit(tree: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def run_tree(tree: Path, tokenizer: Path, steps: int, work: Path, threads: int) -> dict:
    out, result = work / "run", work / "syncs.json"
    child = _CHILD.format(host_syncs=str(ROOT / "benchmarks" / "host_syncs.py"), log_every=LOG_EVERY)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", child, str(tree), str(out), str(tokenizer), str(steps), str(result)],
                          cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    syncs = {int(k): v for k, v in json.loads(result.read_text())["per_interval"].items()}
    logged = {row["step"] for row in rows}
    quiet = [syncs.get(step, 0) for step in range(1, steps + 1) if step not in logged]
    loud = [syncs.get(step, 0) for step in sorted(logged)]
    return {"img_per_s": statistics.median(row["img_per_s"] for row in rows[1:]),
            "syncs_per_quiet_step": statistics.mean(quiet) if quiet else 0.0,
            "syncs_per_logging_step": statistics.mean(loud) if loud else 0.0,
            "losses": [(row["step"], row["loss"]) for row in rows]}


def plot(curves: dict[str, list], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        ax.plot(*zip(*points), label=label, linestyle="--" if label.startswith("before") else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-token loss (logged steps)")
    ax.set_title("demo pretraining, same seed: before vs after")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> list[dict]:
    cfg = parse_overrides(LoopBenchConfig(), argv)
    trees = {"after": ROOT}
    if cfg.before:
        if not (Path(cfg.before) / "engine").is_dir():
            raise SystemExit(f"--before={cfg.before} is not a source tree of this project (no engine/ in it)")
        trees = {"before": Path(cfg.before).resolve(), "after": ROOT}
    meta = environment("cpu")
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else _stand_in_tokenizer(Path(tmp) / "tokenizer")
        for repeat in range(cfg.repeats):
            for label, tree in trees.items():
                work = Path(tmp) / f"{label}{repeat}"
                result = run_tree(tree, tokenizer, cfg.steps, work, cfg.threads)
                losses = result.pop("losses")
                if repeat == 0:
                    curves[f"{label} ({_commit(tree)})"] = losses
                row = {**meta, "bench": "train_loop", "tree": label, "tree_commit": _commit(tree), "repeat": repeat,
                       "steps": cfg.steps, "model": "beit_mini_patch4_28_256_vocab (pretrain_demo)",
                       "tokenizer": cfg.tokenizer or "random stand-in", **result,
                       "final_logged_loss": losses[-1][1]}
                print(json.dumps({k: row[k] for k in ("tree", "tree_commit", "repeat", "img_per_s",
                                                      "syncs_per_quiet_step", "syncs_per_logging_step")}))
                rows.append(row)
    append_rows("train_loop", rows)
    plot(curves, RESULTS_DIR / "train_loop.png")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
