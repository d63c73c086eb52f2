"""Curves from a metrics JSON-lines file: one panel per metric, any stage (``plot_curves(jsonl, png)``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from model.logging_utils import read_jsonl

SKIP_KEYS = {"step", "time", "epoch"}


def plot_curves(jsonl_path: str | Path, png_path: str | Path, keys: Optional[Sequence[str]] = None,
                x: str = "step", title: Optional[str] = None) -> Optional[Path]:
    """Plot each numeric metric against ``x``; returns the PNG path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(jsonl_path) if isinstance(r.get(x), (int, float))]
    if keys is None:
        keys = []
        for r in rows:
            for k, v in r.items():
                if k not in SKIP_KEYS and k != x and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and k not in keys:
                    keys.append(k)
    series = {k: [(r[x], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    n = len(series)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (k, pts) in zip(axes.flat, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(k)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if "loss" in k and min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
