"""Certified / robust accuracy curves: tables and PNG plots (STN Fig. 1, Zhang & Liang Figs. 2–3)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, grid: Sequence[float],
                       factor: float = 1.0) -> np.ndarray:
    """Fraction of examples certified correct at each radius of ``grid``.

    An example counts at radius r when its certified prediction is the label and its
    certified radius is ≥ r (STN Section 6.1: "a lower bound of accuracy").

    Args:
        radius: certified radius per example (0 where abstained).
        correct: bool per example, certified prediction == label (False if abstained).
        grid: radii at which to evaluate.
        factor: multiply by this (STN reports accuracy × (1 − α), "multiply 95%").
    """
    radius, correct = np.asarray(radius, np.float64), np.asarray(correct, bool)
    if radius.size == 0:
        return np.zeros(len(grid))
    grid = np.asarray(grid, np.float64)[:, None]
    return factor * np.mean(correct[None, :] & (radius[None, :] >= grid), axis=1)


def average_certified_radius(radius: np.ndarray, correct: np.ndarray,
                             factor: float = 1.0) -> float:
    """The average certified radius (ACR, Zhai et al. 2020, Eq. 6): the mean over examples
    of the certified radius where the certified prediction is the label, 0 elsewhere."""
    radius, correct = np.asarray(radius, np.float64), np.asarray(correct, bool)
    return factor * float(np.mean(np.where(correct, radius, 0.0))) if radius.size else 0.0


def format_table(grid: Sequence[float], curves: Mapping[str, np.ndarray],
                 header: str = "radius", acr: Mapping[str, float] | None = None) -> str:
    """A fixed-width text table: one row per grid value, one column per curve (in %),
    and a last row with each curve's average certified radius when ``acr`` is given."""
    names = list(curves)
    width = max([8, *(len(n) + 1 for n in names)])
    lines = [f"{header:>8}" + "".join(f"{n:>{width}}" for n in names)]
    for i, r in enumerate(grid):
        lines.append(f"{r:>8.3f}" + "".join(f"{100 * curves[n][i]:>{width - 1}.1f}%"
                                             for n in names))
    if acr is not None:
        lines.append(f"{'ACR':>8}" + "".join(f"{acr[n]:>{width}.3f}" for n in names))
    return "\n".join(lines)


def plot_curves(grid: Sequence[float], curves: Mapping[str, np.ndarray], path: str,
                xlabel: str = "ℓ2 radius", ylabel: str = "certified accuracy",
                title: str | None = None,
                styles: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Writes a PNG with one line per curve (accuracy in [0, 1] against ``grid``).

    ``styles`` maps a curve's name to keyword arguments of its line (e.g. ``color``,
    ``linestyle``).  More than four curves put the legend beside the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beside = len(curves) > 4
    fig, ax = plt.subplots(figsize=(9.5 if beside else 6, 4), dpi=120)
    marker = "o" if len(grid) <= 20 else None  # a sparse grid (an ε sweep) shows its points
    for name, values in curves.items():
        ax.plot(grid, values, label=name, marker=marker, **(styles or {}).get(name, {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if beside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
