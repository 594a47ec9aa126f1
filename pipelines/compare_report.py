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


def curve_ends(curve: dict):
    """(first size, its mean, last size, its mean) of a size curve, or None when it is empty."""
    if not curve["sizes"]:
        return None
    return curve["sizes"][0], curve["mean"][0], curve["sizes"][-1], curve["mean"][-1]


def member_curve_tables(summary: dict, metrics_shown: list[tuple[str, str]], digits=lambda metric: 3) -> list[str]:
    """One table per (metric, title): the pools' mean ± std of the metric over the number of members."""
    lines = []
    for metric, title in metrics_shown:
        sizes = sorted({m for curve in summary["curves"].values() for m in curve[metric]["sizes"]})
        rows = [[title + " / members"] + [str(m) for m in sizes]]
        for pool, curve in summary["curves"].items():
            values = dict(zip(curve[metric]["sizes"], zip(curve[metric]["mean"], curve[metric]["std"])))
            rows.append([summary["pools"][pool]["label"]] + [format_value(list(values[m]), digits(metric))
                                                            if m in values else "–" for m in sizes])
        lines += markdown_table(rows) + [""]
    return lines


def width_study_table(width_study: dict) -> list[str]:
    """The width study's distances to μ_k (ensemble mean, single members) and seconds per width."""
    w = width_study
    rows = [["width", "‖ensemble mean − μ_k‖/‖μ_k‖", "single member (mean ± std)", "seconds"]]
    for i, width in enumerate(w["widths"]):
        rows.append([str(width), f"{w['distance_mean'][i]:.4f}",
                     f"{w['distance_member_mean'][i]:.4f} ± {w['distance_member_std'][i]:.4f}", f"{w['seconds'][i]:.0f}"])
    return markdown_table(rows)


def width_study_line(width_study: dict) -> list[str]:
    """The summary line of a width study with at least two widths (else none)."""
    w = width_study
    if len(w["widths"]) < 2:
        return []
    return [f"- **width study** (centred): distance of the ensemble mean to μ_k {w['distance_mean'][0]:.3f} at "
            f"width {w['widths'][0]} → {w['distance_mean'][-1]:.3f} at width {w['widths'][-1]}"]


def timing_lines(timings: dict) -> list[str]:
    """The '## Time' section: seconds per stage."""
    return ["## Time", ""] + markdown_table([["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in timings.items()])


def errorbar_curve(ax, curve: dict, **style) -> None:
    """A size curve's mean ± std against the number of members."""
    ax.errorbar(curve["sizes"], curve["mean"], yerr=curve["std"], marker="o", ms=3, capsize=2, **style)


def sqrt_members_guide(ax, curve: dict | None) -> None:
    """The 1/√members line through a curve's first point (what independent members' noise would give)."""
    if curve and curve["sizes"]:
        m = np.asarray(curve["sizes"], float)
        ax.plot(m, curve["mean"][0] / np.sqrt(m), color="grey", lw=0.8, label="1/√members")
