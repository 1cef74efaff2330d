"""Figure style and the plots the labs share. Every figure has a title, labelled axes and units."""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd

STYLE = {"figure.figsize": (6.4, 3.6), "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "font.size": 10}


def use_style() -> None:
    """Apply the labs' matplotlib style."""
    plt.rcParams.update(STYLE)


def loss_curves(curves: Mapping[str, pd.DataFrame], title: str = "Training loss", smooth: int = 5):
    """One line per run of ``loss`` against ``step`` (rolling mean over ``smooth`` steps)."""
    use_style()
    fig, ax = plt.subplots()
    for name, df in curves.items():
        ax.plot(df["step"], df["loss"].rolling(smooth, min_periods=1).mean(), label=name)
    ax.set(title=title, xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    return fig


def bars(df: pd.DataFrame, x: str, y: str, title: str, ylabel: str, color: str | None = None):
    """A bar per row of ``df`` (``x`` labels, ``y`` heights), values printed on the bars."""
    use_style()
    fig, ax = plt.subplots()
    bars_ = ax.bar(df[x].astype(str), df[y], color=color)
    ax.bar_label(bars_, fmt="%.2f")
    ax.set(title=title, xlabel=x, ylabel=ylabel)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Save a figure as PNG (parents created)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")


def lines(df: pd.DataFrame, x: str, ys: list[str], title: str, xlabel: str, ylabel: str, logy: bool = False):
    """One line per column in ``ys`` against ``x``."""
    use_style()
    fig, ax = plt.subplots()
    for y in ys:
        ax.plot(df[x], df[y], marker="o", label=y)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    return fig


def bar_grid(df: pd.DataFrame, x: str, panels: Mapping[str, str], title: str):
    """Small multiples: one bar chart per ``{column: y-axis label}`` of ``panels``."""
    use_style()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (column, label) in zip(axes, panels.items()):
        ax.bar(df[x].astype(str), df[column])
        ax.set(title=column, ylabel=label)
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
