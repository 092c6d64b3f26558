"""summary.md of a benchmarks/gpu_check.py run: step table, then the key numbers of this run's JSONL rows in tables.

    python3 benchmarks/gpu_check_summary.py --out DIR [--run-id ID]   # rebuild it from DIR alone (default: last run)

Speedups are `other provider's ms / ours ms` at the same shape and mode: above 1× ours is faster. Standard library
only (it runs in gpu_check's parent process, which never imports torch).
"""

import argparse
import json
import sys
from pathlib import Path

ATTENTION_BASELINES = [  # provider, column title
    ("sdpa_bias", "× SDPA+bias"),
    ("sdpa_mem_efficient_bias", "× SDPA mem-eff+bias"),
    ("flex", "× Flex"),
    ("eager", "× eager"),
    ("sdpa_flash_nobias", "× SDPA-flash no bias"),
    ("flash_attn", "× flash-attn no bias"),
]
DRY_RUN_BANNER = ("**Dry run on CPU.** The steps' commands, flags and imports ran at tiny shapes (our kernels through "
                  "Triton's interpreter); every number below is a CPU figure that shows the code runs, not a GPU "
                  "measurement.")


def read_rows(out: Path, name: str, run_id: str) -> list[dict]:
    """This run's rows of `<out>/<name>.jsonl` (files may also hold earlier runs)."""
    path = out / f"{name}.jsonl"
    if not path.is_file():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [row for row in rows if row.get("run_id") == run_id]


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits: int = 3) -> str | None:
    if value is None:
        return None
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def ratio(other: dict | None, ours: dict | None) -> str | None:
    if not other or not ours:
        return None
    if "error" in other:
        return "error"
    if "ms" not in other or "ms" not in ours or not ours["ms"]:
        return None
    value = other["ms"] / ours["ms"]
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def by_key(rows: list[dict], *keys: str) -> dict:
    """Rows indexed by the tuple of `keys` (the last row wins)."""
    return {tuple(row.get(key) for key in keys): row for row in rows}


def ordered(values) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def attention_section(rows: list[dict]) -> str:
    index = by_key(rows, "shape", "mode", "provider")
    lines = []
    for shape in ordered(row["shape"] for row in rows):
        for mode in ordered(row["mode"] for row in rows if row["shape"] == shape):
            ours = index.get((shape, mode, "ours"))
            ms = None if not ours or "error" in ours else ours.get("ms")
            tflops = None if not ours or "error" in ours else ours.get("tflops")
            lines.append([shape, mode, number(ms), number(tflops)]
                         + [ratio(index.get((shape, mode, name)), ours) for name, _ in ATTENTION_BASELINES])
    header = ["shape", "mode", "ours ms", "ours TFLOP/s"] + [title for _, title in ATTENTION_BASELINES]
    return ("### Attention (rel_pos_attention vs the others; × = their ms / ours)\n\n" + table(header, lines)
            + "\n\nGoals (benchmarks/README.md): fwd+bwd at BEiT-L ≥ 1× SDPA-flash without bias, ≥ 2× SDPA with the "
            "bias as a mask, ≥ 1.5× FlexAttention.")


def versus_section(title: str, rows: list[dict], ours_name: str, other_name: str, also: tuple[str, ...] = ()) -> str:
    """ms and peak memory of `ours_name` against `other_name` per shape and mode (plus the ms of `also`)."""
    index = by_key(rows, "shape", "mode", "provider")
    lines = []
    for shape, mode in ordered((row["shape"], row["mode"]) for row in rows):
        ours, other = index.get((shape, mode, ours_name)) or {}, index.get((shape, mode, other_name)) or {}
        lines.append([shape, mode, number(ours.get("ms"))]
                     + [number((index.get((shape, mode, name)) or {}).get("ms")) for name in also]
                     + [number(other.get("ms")), ratio(other, ours), number(ours.get("peak_mb")),
                        number(other.get("peak_mb"))])
    header = (["shape", "mode", f"{ours_name} ms"] + [f"{name} ms" for name in also]
              + [f"{other_name} ms", f"× {other_name}", f"{ours_name} peak MB", f"{other_name} peak MB"])
    return f"### {title}\n\n" + table(header, lines)


def block_section(rows: list[dict]) -> str:
    lines = [[row["shape"], row["provider"], number(row.get("ms")), number(row.get("images_per_s")),
              number(row.get("peak_mb"))] for row in rows if "error" not in row]
    return "### Block stack fwd+bwd (bench_block)\n\n" + table(["shape", "attn_impl", "ms", "img/s", "peak MB"], lines)


def dense_section(rows: list[dict]) -> str:
    lines = [[row["shape"], row.get("batch"), number(row.get("ms")), number(row.get("images_per_s")),
              number(row.get("peak_mb"))] for row in rows if "error" not in row]
    return ("### Dense tasks: one training step, bf16 parameters (bench_dense)\n\n"
            + table(["shape", "batch", "ms", "img/s", "peak MB"], lines))


def _model_label(row: dict) -> str:
    requested = row.get("requested_model")
    return f"{row.get('model')} (for {requested})" if requested and requested != row.get("model") else row.get("model")


def train_section(rows: list[dict]) -> str:
    lines = [[_model_label(row), row.get("attn_impl"), row.get("batch_size"), row.get("precision"),
              number(row.get("img_per_s")), number(row.get("step_ms")),
              None if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%", number(row.get("peak_mem_gib")),
              row.get("optimizer")] for row in rows]
    header = ["model", "attn_impl", "batch", "precision", "img/s", "step ms", "MFU", "peak mem GiB", "optimizer"]
    note = ""
    if any(row.get("optimizer") == "AdamW" and row.get("device") == "cuda" for row in rows):
        note = ("\n\nThe trainer's DeepSpeed FusedAdam could not be built here (see the train logs), so these rows "
                "time torch's fused AdamW.")
    return "### MIM training (bench_train: DeepSpeed engine, compile off, tokenizer excluded)\n\n" + table(
        header, lines) + note


def errors_section(named_rows: dict[str, list[dict]]) -> str:
    lines = [[name, row.get("shape", row.get("model")), row.get("provider", row.get("attn_impl")), row.get("mode"),
              row["error"].replace("|", "/")[:160]]
             for name, rows in named_rows.items() for row in rows if "error" in row]
    if not lines:
        return "### Provider errors\n\nnone"
    return "### Provider errors\n\n" + table(["bench", "shape", "provider", "mode", "error"], lines)


def environment_lines(out: Path) -> list[str]:
    path = out / "environment.json"
    if not path.is_file():
        return ["environment.json missing (the environment step failed)"]
    env = json.loads(path.read_text())
    deepspeed = env.get("deepspeed", {})
    gpu = "none (CPU)"
    if env.get("device") == "cuda":
        gpu = (f"{env.get('gpu_name')} ({env.get('sm_count')} SMs, compute capability {env.get('capability')}, "
               f"{env.get('gpu_memory_gib')} GiB, driver {env.get('driver')})")
    return [f"- GPU: {gpu}",
            f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
            f"triton {env.get('triton')}, DeepSpeed {deepspeed.get('version') or deepspeed.get('error')}",
            f"- nvcc: {env.get('nvcc') or 'none'}; commit: {env.get('commit')}"]


def _kind(outcome: dict) -> str:
    if outcome.get("informational"):
        return " (informational)"
    return " (optional)" if outcome.get("optional") else ""


def step_section(outcomes: list[dict]) -> str:
    lines = [[o["step"], o["status"] + _kind(o), f"{o['seconds']:.1f}",
              f"{o['budget_s']:.0f}", (o.get("detail") or "").replace("|", "/")] for o in outcomes]
    return "### Steps\n\n" + table(["step", "status", "seconds", "budget s", "detail"], lines)


def render(out: Path, run_id: str, outcomes: list[dict], dry_run: bool, total_s: float) -> str:
    named_rows = {name: read_rows(out, name, run_id)
                  for name in ("attention", "rel_pos_bias", "masked_lm_loss", "block", "train", "dense")}
    parts = [f"# GPU check {run_id}" + (" (dry run)" if dry_run else ""), ""]
    if dry_run:
        parts += [DRY_RUN_BANNER, ""]
    parts += environment_lines(out) + [f"- total: {total_s:.0f} s", "", step_section(outcomes)]
    if named_rows["attention"]:
        parts += ["", attention_section(named_rows["attention"])]
    if named_rows["rel_pos_bias"]:
        parts += ["", versus_section("Relative position bias gather", named_rows["rel_pos_bias"], "ours", "torch")]
    if named_rows["masked_lm_loss"]:
        parts += ["", versus_section("Masked LM loss (ours_bounded: max_masked = B·75, what the trainer passes)",
                                     named_rows["masked_lm_loss"], "ours_bounded", "torch", also=("ours",))]
    if named_rows["block"]:
        parts += ["", block_section(named_rows["block"])]
    if named_rows["train"]:
        parts += ["", train_section(named_rows["train"])]
    if named_rows["dense"]:
        parts += ["", dense_section(named_rows["dense"])]
    parts += ["", errors_section(named_rows), ""]
    return "\n".join(parts)


def write_summary(out: Path, run_id: str, outcomes: list, dry_run: bool, total_s: float) -> Path:
    """Write `<out>/summary.md`; `outcomes` are gpu_check Outcome objects or their dicts."""
    dicts = [outcome if isinstance(outcome, dict) else vars(outcome) for outcome in outcomes]
    path = out / "summary.md"
    path.write_text(render(out, run_id, dicts, dry_run, total_s))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the directory a gpu_check run wrote")
    parser.add_argument("--run-id", default=None, help="which run (default: the last one in gpu_check.jsonl)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    steps_file = out / "gpu_check.jsonl"
    if not steps_file.is_file():
        parser.exit(2, f"gpu_check_summary: {steps_file} not found: is {out} a gpu_check output directory?\n")
    steps = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    run_id = args.run_id or steps[-1]["run_id"]
    outcomes = [step for step in steps if step["run_id"] == run_id]
    if not outcomes:
        parser.exit(2, f"gpu_check_summary: no run {run_id} in {steps_file}\n")
    path = write_summary(out, run_id, outcomes, outcomes[0]["dry_run"], sum(o["seconds"] for o in outcomes))
    print(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
