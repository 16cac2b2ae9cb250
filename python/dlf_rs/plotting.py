"""Plots of the per-step DLF weights (the paper's Figures 2-3): the last stop of a generation.

``plot_alphas`` takes a :class:`dlf_rs.results.GenerationResult` (or a ``[steps, T]`` array of
weights) and draws alpha over the decoding steps, one line per expert. It uses matplotlib's Agg
backend so it works headless (the demo and the CLI call it on servers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_alphas"]


def plot_alphas(
    result_or_alphas: Any,
    row: int = 0,
    expert_names: list[str] | None = None,
    path: str | None = None,
    title: str | None = None,
) -> Any:
    """Plot alpha_t over decoding steps for one row; save to ``path`` when given.

    Returns the matplotlib ``Figure``. ``expert_names`` defaults to the result's expert names
    (or ``expert 0..T-1``). Steps where an expert is inactive (one-active rule) show as 0.
    ``title`` defaults to "DLF weights per step". The legend sits outside the axes, so it never
    hides a data point.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if hasattr(result_or_alphas, "alphas"):
        if not 0 <= row < len(result_or_alphas.alphas):
            raise ValueError(f"row: {row} out of range for {len(result_or_alphas.alphas)} rows")
        alphas = np.asarray(result_or_alphas.alphas[row], dtype=np.float32)
        names = expert_names or list(getattr(result_or_alphas, "expert_names", []) or [])
    else:
        alphas = np.asarray(result_or_alphas, dtype=np.float32)
        names = list(expert_names or [])
    if alphas.ndim == 1:
        alphas = alphas[:, None]
    if alphas.ndim != 2:
        raise ValueError(f"alphas: expected [steps, T], got shape {alphas.shape}")
    n_exp = alphas.shape[1]
    if len(names) != n_exp:
        names = [f"expert {t}" for t in range(n_exp)]

    fig = Figure(figsize=(8.0, 3.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(alphas.shape[0])
    for t in range(n_exp):
        ax.plot(steps, alphas[:, t], marker="o", markersize=2.5, linewidth=1.2, label=names[t])
    ax.set_xlabel("decoding step")
    ax.set_ylabel("alpha")
    ax.set_title(title or "DLF weights per step", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.02, y=0.08)
    if n_exp:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
