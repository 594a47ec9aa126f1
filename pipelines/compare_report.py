"""Pieces shared by the histology and molecule comparison reports (`eqk compare`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mean_std(rows: list[dict]) -> dict:
    """{measure: [mean, std]} over repeated ensembles, from one {measure: value} dict per ensemble."""
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))] for k in rows[0]}


def format_value(value, digits: int = 3) -> str:
    """'m ± s' for [mean, std] pairs (repeated ensembles), plain for single values (kernels), '–' for None."""
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    return f"{value:.{digits}f}"


def markdown_table(rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table whose first row is the header."""
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def save_figure(fig, axes, path: Path, *, legend_size: int = 6) -> None:
    """Legend and log grid on every axis, then write the figure to `path` and close it."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend(fontsize=legend_size)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_width_study(width_study: dict, path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """Distance of the centred ensemble mean and of single members to μ_k against width, log-log, to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = width_study
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    widths = np.asarray(w["widths"], float)
    ax.plot(widths, w["distance_mean"], "o-", label=f"ensemble mean ({w['members']} members)")
    ax.errorbar(widths, w["distance_member_mean"], yerr=w["distance_member_std"], fmt="s--", capsize=2,
                label="single members")
    if len(widths):  # the guide passes through the widest point, where the scaling should hold best
        ax.plot(widths, w["distance_member_mean"][-1] * np.sqrt(widths[-1] / widths), color="grey", lw=0.8,
                label="1/√width")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    save_figure(fig, [ax], path, legend_size=7)
