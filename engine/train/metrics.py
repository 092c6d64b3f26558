"""Training metrics: metrics.jsonl, the `--report_to` targets (engine/train/reporters.py), a tqdm bar on rank 0, and a
PNG of the curves."""

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_after(path: str | Path, step: int) -> None:
    """Drops rows logged after `step` by a run that died before its next checkpoint (they will be redone)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Rank-0 sink for per-step metrics. On other ranks every method is a no-op."""

    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 reporters: list | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.bar = None
        self.reporters = reporters or []  # rank 0's --report_to targets (engine/train/reporters.py)
        if not enabled:
            return
        truncate_after(self.path, start_step)
        if progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            # log records (checkpoints saved, evaluations, warnings) print above the bar instead of through it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _finite_or_none(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for reporter in self.reporters:
            reporter.log(row, "train")
        if self.bar is not None:
            shown = {k: row[k] for k in ("loss", "mlm_acc", "acc1", "lr", "img_per_s") if row.get(k) is not None}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        else:
            logger.info("step %d %s", row["step"], {k: v for k, v in row.items() if k != "step"})

    def log_eval(self, row: dict) -> None:
        """An evaluation's row (the task writes it to eval.jsonl) to the --report_to targets."""
        for reporter in self.reporters if self.enabled else ():
            reporter.log({k: _finite_or_none(v) for k, v in row.items()}, "eval")

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
        for reporter in self.reporters:
            reporter.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], png_path: str | Path,
                panels: tuple[str | tuple[str, ...], ...] = ("loss", "mlm_acc")) -> Path:
    """One panel per entry against step; an entry that is a tuple of keys draws those series together (e.g. the
    held-out loss next to its baseline). matplotlib when installed, else a plain PIL drawing, so the PNG always
    exists."""
    png_path = Path(png_path)
    grouped = [(panel,) if isinstance(panel, str) else tuple(panel) for panel in panels]
    series = [{k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys} for keys in grouped]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_with_pil(series, png_path)
        return png_path
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], series):
        for key, points in panel.items():
            if points:
                ax.plot(*zip(*points), label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(" / ".join(panel))
        if len(panel) > 1 and any(panel.values()):
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


_PIL_COLOURS = ("royalblue", "darkorange", "seagreen", "crimson")


def _plot_with_pil(series: list[dict[str, list[tuple[int, float]]]], png_path: Path) -> None:
    from PIL import Image, ImageDraw

    panel_w, panel_h, pad = 420, 300, 40
    image = Image.new("RGB", (panel_w * len(series), panel_h), "white")
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(series):
        x0, x1, y0, y1 = i * panel_w + pad, (i + 1) * panel_w - 10, panel_h - pad, 25
        draw.rectangle([x0, y1, x1, y0], outline="black")
        points_all = [p for points in panel.values() for p in points]
        if not points_all:
            continue
        lo, hi = min(v for _, v in points_all), max(v for _, v in points_all)
        first, last = min(s for s, _ in points_all), max(s for s, _ in points_all)
        span_v, span_s = (hi - lo) or 1.0, (last - first) or 1
        for slot, (colour, (key, points)) in enumerate(zip(_PIL_COLOURS, panel.items())):
            draw.text((x0 + 110 * slot, 5), key, fill=colour)
            if len(points) < 2:
                continue
            xy = [(x0 + (s - first) / span_s * (x1 - x0), y0 - (v - lo) / span_v * (y0 - y1)) for s, v in points]
            draw.line(xy, fill=colour, width=2)
        draw.text((x0, y0 + 5), f"step {first}..{last}", fill="black")
        draw.text((x1 - 120, y1 + 3), f"max {hi:.4g}", fill="black")
        draw.text((x1 - 120, y0 - 15), f"min {lo:.4g}", fill="black")
    image.save(png_path)
