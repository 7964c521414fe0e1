"""PNG plots of a run's metric curves (headless)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                keys: Sequence[str] | None = None, title: str = "") -> Path | None:
    """One panel per metric; returns the written path, or None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (keys or sorted(history)) if history.get(k)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
