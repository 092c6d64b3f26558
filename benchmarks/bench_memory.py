"""Peak memory per rank of the pretraining recipes at each ZeRO stage, next to DeepSpeed's own estimate.

    python benchmarks/bench_memory.py                              # BEiT-B and BEiT-L, ZeRO 0-3, 1 and 2 ranks
    python benchmarks/bench_memory.py --models=huge --stages=3 --ranks=2

Each case runs the recipe (recipes/pretrain_{base,large}.py; `huge` is pretrain_large with the ViT-H-size model)
as a user would, on this machine's CPU, with a DALL-E-architecture tokenizer and an ImageNet-like JPEG folder that
the benchmark generates once (benchmarks/fixtures.py), batch 1 per rank, one DataLoader worker per rank, two steps,
then the checkpoint and fp32 export. Ranks are started with RANK/WORLD_SIZE as torchrun would; each runs
benchmarks/memory_probe.py, which reads its resident memory around the model build, DeepSpeed's initialisation and
the first step. One row per case, figures in GB, the largest over ranks:

- `peak`: the rank's highest resident memory over the whole run (the kernel's VmHWM);
- `model_states`: resident memory after the first step minus before the model was built (params, grads, optimizer
  states), next to `ds_estimate`: DeepSpeed's model-state estimate for that stage and rank count (its ZeRO-2 formula
  for stages 0-2, at one rank for stage 0; its ZeRO-3 formula with zero.Init; both count mixed precision, 18 bytes
  per parameter over the ranks that share it, where an fp32 run holds 16);
- `activations`: the second step's peak above the resident memory before it: activations and whatever else a step
  allocates and frees (gradients that are freed between steps, ZeRO's buckets and gathered parameters); the first
  step is not used because it also allocates Adam's moments;
- `build_peak`: the highest resident memory while building the model and initialising DeepSpeed;
- `worker_rss` / `worker_uss`: the largest DataLoader worker, resident and unique (pages it does not share);
- `machine_peak`: the most memory the machine had in use during the case, above what it used before.

A case whose estimate does not fit in the memory this machine has free is skipped with a row saying so. Rows go to
benchmarks/results/memory.jsonl; `--table=true` prints the newest row of each case from there as a markdown table.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, append_rows, environment  # noqa: E402
from benchmarks.fixtures import imagenet_like_folder, random_dalle_tokenizer  # noqa: E402
from engine.config import parse_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30
# name: (recipe, model override)
MODELS = {"tiny": ("pretrain_base", "beit_tiny_patch16_224_8k_vocab"),  # a quick check of the benchmark itself
          "base": ("pretrain_base", "beit_base_patch16_224_8k_vocab"),
          "large": ("pretrain_large", "beit_large_patch16_224_8k_vocab"),
          "huge": ("pretrain_large", "beit_huge_patch16_224_8k_vocab")}
FP32_BYTES_PER_PARAM = 16  # fp32 weights, grads and two Adam moments


@dataclass
class MemoryBenchConfig:
    models: str = "base,large"  # of tiny, base, large, huge
    stages: str = "0,1,2,3"
    ranks: str = "1,2"
    steps: int = 2  # the first allocates the optimizer states, the second measures the activations
    batch_size: int = 1
    workers: int = 1
    cache_dir: str = "~/.cache/beit-engine/bench"  # the generated JPEG folder and tokenizer
    out: str = ""  # results directory (default benchmarks/results)
    table: bool = False  # print the newest row of every case in the results file as a markdown table, run nothing


def model_sizes(model: str) -> tuple[int, int]:
    """(parameters, parameters of the largest module's own tensors), counted on the meta device."""
    import torch

    from engine.factory import create_model

    with torch.device("meta"):
        module = create_model(model)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())
    return sum(p.numel() for p in module.parameters()), largest


def deepspeed_estimate(stage: int, ranks: int, params: int, largest: int) -> int:
    """DeepSpeed's model-state bytes per rank (no offload)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        return estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=ranks, cpu_offload=False,
                                                     cpu_offload_params=False, zero_init=True)[1]
    return estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks if stage else 1,
                                                 cpu_offload=False)[1]


class MachineSampler(threading.Thread):
    """The most memory in use on the machine (total - available) while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            memory = psutil.virtual_memory()
            self.peak = max(self.peak, memory.total - memory.available)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(cfg: MemoryBenchConfig, model: str, stage: int, ranks: int, data: Path, tokenizer: Path,
             work: Path) -> dict:
    recipe, model_name = MODELS[model]
    case = work / f"{model}_zero{stage}_{ranks}"
    case.mkdir(parents=True)
    spec = case / "spec.json"
    spec.write_text(json.dumps({"recipe": recipe, "result": str(case / "rank{rank}.json"), "overrides": [
        f"--model={model_name}", f"--data_path={data}", f"--tokenizer={tokenizer}", f"--output_dir={case / 'run'}",
        f"--zero_stage={stage}", f"--batch_size={cfg.batch_size}", f"--global_batch={cfg.batch_size * ranks}",
        f"--max_steps={cfg.steps}", f"--num_workers={cfg.workers}", "--save_every=0", "--log_every=1",
        "--progress=false", "--precision=fp32"]}))
    port, idle = _free_port(), psutil.virtual_memory()
    env = dict(os.environ, WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=str(max(1, os.cpu_count() // ranks)))
    sampler = MachineSampler()
    sampler.start()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "memory_probe.py"), str(spec)],
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(ranks)]
    logs = [proc.communicate()[0] for proc in procs]
    machine_peak = sampler.stop() - (idle.total - idle.available)
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        rank, code = failed[0]
        (case / "failed.log").write_text(logs[rank])
        return {"error": f"rank {rank} exited {code}: {logs[rank].strip().splitlines()[-1][:300]}"}
    results = [json.loads((case / f"rank{rank}.json").read_text()) for rank in range(ranks)]

    def largest(figure) -> float:
        return round(max(figure(r) for r in results) / 1024, 2)

    return {
        "peak_gb": largest(lambda r: max(r["peak_mb"].values())),
        "model_states_gb": largest(lambda r: r["rss_mb"]["step"] - r["rss_mb"]["before_model"]),
        "activations_gb": largest(lambda r: r["peak_mb"]["step2"] - r["rss_mb"]["before_step2"]),
        "build_peak_gb": largest(lambda r: max(r["peak_mb"]["model"], r["peak_mb"]["engine"])),
        "base_gb": largest(lambda r: r["rss_mb"]["before_model"]),
        "worker_rss_gb": largest(lambda r: r["worker_rss_mb"]),
        "worker_uss_gb": largest(lambda r: r["worker_uss_mb"]),
        "machine_peak_gb": round(machine_peak / GB, 2),
        "seconds": max(r["seconds"] for r in results),
        "rank0_marks_gb": {name: [round(rss / 1024, 2), round(results[0]["peak_mb"][name] / 1024, 2)]
                           for name, rss in results[0]["rss_mb"].items()},  # resident, peak of the phase ending there
    }


TABLE_COLUMNS = (("model", "model"), ("ZeRO", "zero_stage"), ("ranks", "ranks"), ("batch", "batch_per_rank"),
                 ("peak", "peak_gb"), ("states", "model_states_gb"), ("DS est.", "ds_estimate_gb"),
                 ("step", "activations_gb"), ("build", "build_peak_gb"), ("worker", "worker_uss_gb"),
                 ("machine", "machine_peak_gb"), ("commit", "commit"))


def markdown_table(rows: list[dict]) -> str:
    """The newest row of each (model, stage, ranks, batch) case, smallest model first."""
    newest = {}
    for row in rows:
        newest[(row["params_m"], row["zero_stage"], row["ranks"], row["batch_per_rank"])] = row
    lines = ["| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |", "|---" * len(TABLE_COLUMNS) + "|"]
    for _, row in sorted(newest.items()):
        cells = [str(row.get(key, "")) for _, key in TABLE_COLUMNS]
        cells[0] = cells[0].replace("_patch16_224_8k_vocab", "")
        if "skipped" in row or "error" in row:
            cells[4:-1] = [row.get("skipped") or row["error"]] + [""] * (len(cells) - 6)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_overrides(MemoryBenchConfig(), sys.argv[1:] if argv is None else argv)
    if cfg.table:
        results = Path(cfg.out or RESULTS_DIR) / "memory.jsonl"
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        print(markdown_table(rows))
        return rows
    models = [name for name in cfg.models.split(",") if name]
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        sys.exit(f"error: --models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if cfg.steps < 2:
        sys.exit(f"error: --steps={cfg.steps}: use 2 or more (the second step measures the activations)")
    try:
        stages = [int(s) for s in cfg.stages.split(",")]
        rank_counts = [int(r) for r in cfg.ranks.split(",")]
    except ValueError:
        sys.exit(f"error: --stages={cfg.stages} --ranks={cfg.ranks}: give comma-separated integers, e.g. "
                 "--stages=0,3 --ranks=1,2")
    if not set(stages) <= {0, 1, 2, 3} or min(rank_counts) < 1:
        sys.exit(f"error: --stages={cfg.stages} --ranks={cfg.ranks}: ZeRO stages are 0-3 and ranks at least 1")
    cache = Path(cfg.cache_dir).expanduser()
    data = imagenet_like_folder(cache / "imagenet_like")
    tokenizer = random_dalle_tokenizer(cache / "dalle_random")
    env = environment("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model in models:
            params, largest_module = model_sizes(MODELS[model][1])
            for stage in stages:
                for ranks in rank_counts:
                    estimate = deepspeed_estimate(stage, ranks, params, largest_module)
                    row = dict(env, model=MODELS[model][1], params_m=round(params / 1e6, 1), zero_stage=stage,
                               ranks=ranks, batch_per_rank=cfg.batch_size, workers_per_rank=cfg.workers,
                               steps=cfg.steps, precision="fp32", ds_estimate_gb=round(estimate / GB, 2),
                               fp32_states_gb=round(FP32_BYTES_PER_PARAM * params / (ranks if stage else 1) / GB, 2))
                    need = ranks * (FP32_BYTES_PER_PARAM * params / (ranks if stage else 1) + 3 * GB)
                    if need > psutil.virtual_memory().available:
                        row["skipped"] = (f"needs about {need / GB:.0f} GB ({ranks} rank(s) of model states + 3 GB), "
                                          f"{psutil.virtual_memory().available / GB:.0f} GB free")
                    else:
                        row.update(run_case(cfg, model, stage, ranks, data, tokenizer, Path(work)))
                    rows.append(row)
                    append_rows("memory", [row], cfg.out or None)
    return rows


if __name__ == "__main__":
    main()
