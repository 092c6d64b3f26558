"""Draw PNG bar charts from benchmarks/results/*.jsonl (one figure per result file, one panel per mode).

    python benchmarks/plot.py [--device cuda|cpu]   # writes benchmarks/results/<name>.png
Uses the latest row of each (shape, provider, mode, device); rows with an error are skipped.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def latest_rows(path: Path, device: str) -> list[dict]:
    latest = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("device") == device and "ms" in row:
            latest[(row["shape"], row["provider"], row["mode"])] = row
    return list(latest.values())


def plot_file(path: Path, device: str, plt) -> Path | None:
    rows = latest_rows(path, device)
    if not rows:
        return None
    by_mode = defaultdict(list)
    for row in rows:
        by_mode[row["mode"]].append(row)
    figure, axes = plt.subplots(1, len(by_mode), figsize=(6 * len(by_mode), 4), squeeze=False)
    for axis, (mode, mode_rows) in zip(axes[0], sorted(by_mode.items())):
        shapes = sorted({row["shape"] for row in mode_rows})
        providers = sorted({row["provider"] for row in mode_rows})
        width = 0.8 / len(providers)
        for slot, provider in enumerate(providers):
            times = {row["shape"]: row["ms"] for row in mode_rows if row["provider"] == provider}
            axis.bar([i + slot * width for i in range(len(shapes))], [times.get(s, 0.0) for s in shapes], width,
                     label=provider)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=20)
        axis.set_ylabel("median ms (lower is better)")
        axis.set_title(f"{path.stem} {mode} ({device}: {mode_rows[0]['device_name']})")
        axis.legend(fontsize=8)
    figure.tight_layout()
    out = path.with_name(f"{path.stem}_{device}.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("benchmarks/plot.py needs matplotlib: pip install matplotlib (results stay in *.jsonl)")
    for path in sorted(RESULTS_DIR.glob("*.jsonl")):
        out = plot_file(path, args.device, plt)
        print(f"{path.name}: {out if out else f'no {args.device} rows'}")


if __name__ == "__main__":
    main()
