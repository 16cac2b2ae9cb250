"""The demo's figures: alpha over decoding steps (the paper's Figures 2-3) and the fixed-alpha
ablation (Figure 2, left). Needs matplotlib (``pip install 'dlf_rs[plot]'``); the demo writes
its tables before calling this, so a missing matplotlib costs only the pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_ablation", "plot_trace"]


def plot_trace(trace: dict[str, Any], path: Path, title: str) -> Any:
    """Alpha over decoding steps of one row, titled with what the row is."""
    from dlf_rs.plotting import plot_alphas

    return plot_alphas(np.asarray(trace["alphas"]), row=0, expert_names=trace["experts"],
                path=str(path), title=title)  # fmt: skip


def plot_ablation(tabs: dict[str, Any], path: Path, title: str) -> Any:
    """Fixed alpha 0.5/1.0/1.5 against DLF per seen task."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = {r[0]: r[1:] for r in tabs["table1"]["rows"]}
    labels = [k for k in rows if k.startswith(("Static", "Proxy", "DLF"))]
    cols = tabs["table1"]["columns"]
    fig = Figure(figsize=(8.0, 3.4), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        vals = [100 * (v or 0.0) for v in rows[lab]]
        ax.bar(np.arange(len(cols)) + i * width, vals, width, label=lab)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols)
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return fig
