"""Does pretraining pay off? The whole pipeline on the full Fashion-MNIST (60,000 train / 10,000 test), on a CPU.

    apt-get update && apt-get install -y dataset-fashion-mnist      # once: the data, at /usr/share/datasets/
    python recipes/fashion_mnist_evidence.py [--key=value ...]      # --help lists every key

Stages, each resumable (rerun the same command after an interruption; finished stages are skipped):
1. tokenizer: the demo's dVAE (14 px → 7×7 tokens, vocabulary 256) trained on the 60,000 training images;
2. pretraining: BEiT masked image modelling (the demo's model and masking) for `pretrain_epochs`;
3. probe: linear probe and k-NN of the pretrained backbone vs a random init (recipes/linear_probe.py);
4. fine-tuning from the pretrained weights and from scratch, same recipe and budget, `seeds` seeds per arm.
Writes `<results>.json` (every number, the command, the wall time of each stage) and `<results>.png` (top-1 per
epoch of both arms, probe accuracies). What was shrunk to fit about two hours of a 2-core CPU, and why, is in
docs/results.md, "Does pretraining pay off?".
"""

import copy
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


from engine.config import exit_with_error, parse_overrides  # noqa: E402
from engine.probe import ProbeConfig, run_probe, summary_line  # noqa: E402
from engine.train import demos  # noqa: E402
from engine.train.finetune import run_finetuning  # noqa: E402
from engine.train.metrics import read_metrics  # noqa: E402
from engine.train.pretrain import run_pretraining  # noqa: E402
from engine.train.recipe import parse_recipe  # noqa: E402

STAGES_FILE = "stages.json"
SETTINGS_FILE = "settings.json"
# Keys that do not change a stage's result: seeds only select which fine-tuning stages run.
_FREE_KEYS = ("seeds", "results", "num_workers", "device")


@dataclass
class EvidenceConfig:
    data_path: str = "fashion_mnist_full"
    output_dir: str = "runs/fashion_mnist_evidence"
    results: str = "benchmarks/results/fashion_mnist_evidence"  # .json and .png are appended
    depth: int | None = None  # None: the model's own (beit_mini: 6)
    tokenizer_steps: int = 2000
    pretrain_epochs: int = 3
    pretrain_lr: float = 1.5e-3
    pretrain_warmup_steps: int = 100
    pretrain_batch: int = 64
    finetune_epochs: int = 2
    finetune_lr: float = 1e-3
    finetune_batch: int = 64
    layer_decay: float = 0.9
    seeds: tuple[int, ...] = (0, 1)
    num_workers: int = 1
    device: str = "auto"
    max_steps: int = -1  # > 0 caps every pretraining/fine-tuning run (smoke tests)
    finetune_overrides: list[str] = field(default_factory=list)  # extra --key=value for both fine-tuning arms


def check_same_settings(cfg: EvidenceConfig, output_dir: Path) -> None:
    """Finished stages are reused by name, so a rerun must use the settings that produced them."""
    settings = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in _FREE_KEYS}
    path = output_dir / SETTINGS_FILE
    if not path.exists():
        path.write_text(json.dumps(settings, indent=2) + "\n")
        return
    saved = json.loads(path.read_text())
    changed = [f"--{k}={saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise SystemExit(f"error: {output_dir} holds stages run with other settings ({'; '.join(changed)}); rerun "
                         "with the same settings, or pass a new --output_dir")


def pretrain_config(cfg: EvidenceConfig) -> demos.PretrainDemoConfig:
    pre = demos.pretrain_config()
    pre.data.data_path, pre.model.depth = cfg.data_path, cfg.depth
    pre.optim.lr, pre.optim.warmup_steps = cfg.pretrain_lr, cfg.pretrain_warmup_steps
    run = pre.run
    run.output_dir, run.epochs, run.batch_size = str(Path(cfg.output_dir) / "pretrain"), cfg.pretrain_epochs, \
        cfg.pretrain_batch
    run.num_workers, run.device, run.max_steps, run.progress = cfg.num_workers, cfg.device, cfg.max_steps, False
    run.log_every, run.save_every, pre.data.heldout_every = 50, 500, 250
    pre.tokenizer_steps = cfg.tokenizer_steps
    return pre


def finetune_configs(cfg: EvidenceConfig, pretrained: Path) -> dict[str, object]:
    """{"pretrained_seed0": FinetuneConfig, "scratch_seed0": ..., ...}: the same recipe, only the init differs."""
    base = demos.finetune_config()
    base.data.data_path, base.model.depth, base.optim.lr = cfg.data_path, cfg.depth, cfg.finetune_lr
    base.optim.layer_decay = cfg.layer_decay
    run = base.run
    run.epochs, run.batch_size, run.num_workers, run.device = cfg.finetune_epochs, cfg.finetune_batch, \
        cfg.num_workers, cfg.device
    run.max_steps, run.progress, run.log_every = cfg.max_steps, False, 50
    base.data.finetune = ""  # each arm sets its own below; the demo's default path must not be validated here
    base = parse_overrides(base, cfg.finetune_overrides)
    configs = {}
    for seed in cfg.seeds:
        for arm, init in (("pretrained", str(pretrained)), ("scratch", "")):
            arm_cfg = copy.deepcopy(base)
            arm_cfg.data.finetune, arm_cfg.run.seed = init, seed
            arm_cfg.run.output_dir = str(Path(cfg.output_dir) / "finetune" / f"{arm}_seed{seed}")
            configs[f"{arm}_seed{seed}"] = arm_cfg
    return configs


class Stages:
    """Results and wall time of each finished stage, kept in `<output_dir>/stages.json` so a rerun skips them."""

    def __init__(self, output_dir: Path, commit: str):
        self.commit = commit  # of the code that runs the stages (read when the invocation starts)
        self.path = output_dir / STAGES_FILE
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, fn) -> dict:
        if name in self.done:
            print(f"[evidence] {name}: done before ({self.done[name]['seconds']:.0f} s), skipped")
            return self.done[name]["result"]
        print(f"[evidence] {name} ...", flush=True)
        started = time.time()
        result = fn()
        if result is None:  # interrupted (SIGTERM/SIGINT): the stage's own checkpoint resumes it
            raise SystemExit(f"[evidence] {name} was interrupted; run the same command again to resume")
        self.done[name] = {"seconds": round(time.time() - started, 1), "commit": self.commit, "result": result}
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.done, indent=2, default=str) + "\n")
        staging.replace(self.path)
        return result


def _pretrain(pre) -> dict | None:
    summary = run_pretraining(pre)
    if summary["stopped_by"] is not None:
        return None
    rows = read_metrics(Path(pre.run.output_dir) / "metrics.jsonl")
    return {"steps": summary["step"], "export_dir": str(summary["export_dir"]),
            "heldout": [{k: r[k] for k in ("step", "heldout_loss", "heldout_acc", "prior_loss", "prior_acc")}
                        for r in rows if r.get("heldout_loss") is not None],
            "final_train_loss": rows[-1]["loss"], "final_mlm_acc": rows[-1]["mlm_acc"]}


def _finetune(ft_cfg) -> dict | None:
    summary = run_finetuning(ft_cfg)
    if summary["stopped_by"] is not None:
        return None
    return {"steps": summary["step"], "best": summary["best"],
            "evals": [{k: e[k] for k in ("step", "epoch", "acc1", "acc5", "eval_loss")} for e in summary["evals"]]}


def _arm_stats(finetune: dict, arm: str) -> dict:
    finals = [r["evals"][-1]["acc1"] for name, r in finetune.items() if name.startswith(arm + "_")]
    return {"final_acc1": finals, "mean": statistics.mean(finals),
            "spread": max(finals) - min(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0}


def _targets(probe: dict, arms: dict) -> dict:
    pre, scratch = arms["pretrained"], arms["scratch"]
    return {"scratch_at_least_90": scratch["mean"] >= 90.0, "pretrained_at_least_90": pre["mean"] >= 90.0,
            "pretrained_2_points_above_scratch": pre["mean"] - scratch["mean"] >= 2.0,
            "probe_gain_at_least_10": probe["gain"]["linear"] >= 10.0}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(results: dict, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[evidence] matplotlib is not installed (pip install matplotlib): no plot, the JSON has every number")
        return None
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in results["finetune"].items():
        arm, seed = name.split("_seed")
        curves.plot([e["epoch"] + 1 for e in run["evals"]], [e["acc1"] for e in run["evals"]], marker="o",
                    color="tab:blue" if arm == "pretrained" else "tab:gray", linestyle="-" if seed == "0" else "--",
                    label=name)
    curves.set_xlabel("fine-tuning epoch")
    test_images = f"top-1 on the {results['num_test']:,} test images (%)"
    curves.set_ylabel(test_images)
    curves.set_title("fine-tuning: from pretrained vs from scratch")
    curves.grid(alpha=0.3)
    curves.legend()
    probe = results["probe"]
    kinds = ["linear", "knn"]
    for offset, (arm, colour) in enumerate((("pretrained", "tab:blue"), ("random_init", "tab:gray"))):
        values = [probe[arm][kind]["acc1"] for kind in kinds]
        bars.bar([i + 0.4 * offset for i in range(2)], values, width=0.4, color=colour, label=arm)
        for i, value in enumerate(values):
            bars.text(i + 0.4 * offset, value + 0.5, f"{value:.1f}", ha="center")
    bars.set_xticks([0.2, 1.2], ["linear probe", "k-NN"])
    bars.set_ylabel(test_images)
    bars.set_title("frozen features: pretrained vs random init")
    bars.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main(argv: list[str]) -> dict:
    cfg = parse_recipe(EvidenceConfig(), argv)
    from engine.data import build_dataset

    try:
        build_dataset(cfg.data_path, "test")
    except (FileNotFoundError, ValueError) as err:
        exit_with_error(str(err))
    started = time.time()
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_same_settings(cfg, output_dir)
    stages = Stages(output_dir, _commit())
    pre = pretrain_config(cfg)

    def tokenizer() -> dict:
        demos.ensure_tokenizer(pre)
        metrics = json.loads((Path(pre.data.tokenizer).parent / "metrics.json").read_text())
        return {**metrics, "tokenizer_dir": pre.data.tokenizer}

    tokenizer_metrics = stages.run("tokenizer", tokenizer)
    # runs before the tokenizer cache kept theirs in the pretraining output dir
    pre.data.tokenizer = tokenizer_metrics.get("tokenizer_dir",
                                               str(output_dir / "pretrain" / "tokenizer_run" / "tokenizer"))
    pretraining = stages.run("pretraining", lambda: _pretrain(pre))
    probe_cfg = ProbeConfig(checkpoint=pretraining["export_dir"], data_path=cfg.data_path, device=cfg.device,
                            imagenet_mean_std=pre.data.imagenet_mean_std, init_seed=pre.run.seed,
                            output=str(output_dir / "probe.json"))
    probe = stages.run("probe", lambda: run_probe(probe_cfg))
    print(summary_line(probe))
    finetune = {name: stages.run(f"finetune_{name}", lambda c=ft_cfg: _finetune(c))
                for name, ft_cfg in finetune_configs(cfg, Path(pretraining["export_dir"])).items()}
    arms = {arm: _arm_stats(finetune, arm) for arm in ("pretrained", "scratch")}
    import torch

    results = {
        "command": "python recipes/fashion_mnist_evidence.py " + " ".join(shlex.quote(a) for a in argv),
        "commit": {name: stage.get("commit", "unknown") for name, stage in stages.done.items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "config": asdict(cfg),
        "wall_seconds": {name: stage["seconds"] for name, stage in stages.done.items()},
        "wall_seconds_total": round(sum(stage["seconds"] for stage in stages.done.values()), 1),
        "tokenizer": {k: tokenizer_metrics[k] for k in ("mse", "psnr", "codebook_used", "perplexity", "steps")},
        "num_train": probe["num_train"], "num_test": probe["num_test"],
        "pretraining": pretraining, "probe": {k: probe[k] for k in ("pretrained", "random_init", "gain")},
        "finetune": finetune, "arms": arms,
    }
    results["targets"] = _targets(results["probe"], arms)
    json_path = Path(cfg.results).with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    png = plot(results, Path(cfg.results).with_suffix(".png"))
    print(f"\n=== evidence finished ({time.time() - started:.0f} s this invocation, "
          f"{results['wall_seconds_total']:.0f} s in all stages) ===")
    for arm, stats in arms.items():
        print(f"fine-tuned from {arm:>10}: top-1 {stats['mean']:.2f}% (seeds: "
              f"{', '.join(f'{a:.2f}' for a in stats['final_acc1'])})")
    print(summary_line(probe))
    print(f"targets: {results['targets']}")
    print(f"results: {json_path}" + (f", {png}" if png else ""))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
