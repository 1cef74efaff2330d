"""Figure style and the plots the labs share. Every figure has a title, labelled axes and units."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

STYLE = {"figure.figsize": (6.4, 3.6), "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "font.size": 10}
MANY_BARS = 12  # beyond this many bars, :func:`bars` draws them horizontally


def use_style() -> None:
    """Apply the labs' matplotlib style."""
    plt.rcParams.update(STYLE)


def loss_curves(curves: Mapping[str, pd.DataFrame], title: str = "Training loss", smooth: int = 5,
                against: str | None = None):
    """One line per run of ``loss`` against ``step`` (rolling mean over ``smooth`` steps).

    ``against`` names one of the runs: a second panel then shows every other run's loss minus that
    one's, step by step (unsmoothed), for runs whose curves lie on top of each other."""
    use_style()
    if against is not None and against not in curves:
        raise KeyError(f"against={against!r} is not one of the runs: {', '.join(curves)}")
    fig, axes = plt.subplots(1, 2 if against else 1, figsize=(11, 3.8) if against else None, squeeze=False)
    ax = axes[0][0]
    # one colour per run in both panels, and a dash pattern per run so that lines on top of each other all show
    colors = dict(zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(curves)))
    dashes = dict(zip(curves, ["-", "--", ":", "-."] * len(curves)))
    for name, df in curves.items():
        ax.plot(df["step"], df["loss"].rolling(smooth, min_periods=1).mean(), label=name, color=colors[name],
                linestyle=dashes[name])
    ax.set(title=title if not against else "loss", xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)")
    ax.legend()
    if against:
        reference = curves[against].set_index("step")["loss"]
        diff_ax = axes[0][1]
        diff_ax.axhline(0, color=colors[against], lw=1, label=against)
        for name, df in curves.items():
            if name != against:
                gap = df.set_index("step")["loss"] - reference
                diff_ax.plot(gap.index, gap.values, label=name, color=colors[name], linestyle=dashes[name])
        diff_ax.set(title=f"loss minus {against}'s, step by step", xlabel="optimizer step", ylabel="difference (nats/token)")
        diff_ax.legend()
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def bars(df: pd.DataFrame, x: str, y: str, title: str, ylabel: str, color: str | None = None,
         error: str | None = None):
    """A bar per row of ``df`` (``x`` labels, ``y`` heights), values printed on the bars; ``error``: a
    column of half-widths drawn as error bars (e.g. a seed standard deviation). More than
    :data:`MANY_BARS` rows are drawn horizontally, one labelled row each, without the values."""
    use_style()
    labels = df[x].astype(str)
    spread = None if error is None else df[error]
    if len(df) > MANY_BARS:
        fig, ax = plt.subplots(figsize=(7, max(3.0, 0.22 * len(df))))
        ax.barh(labels, df[y], color=color, xerr=spread, capsize=3)
        ax.invert_yaxis()  # the first row on top
        ax.set(title=title, xlabel=ylabel, ylabel=x)
        ax.tick_params(axis="y", labelsize=8)
    else:
        fig, ax = plt.subplots()
        ax.bar_label(ax.bar(labels, df[y], color=color, yerr=spread, capsize=4), fmt="%.2f",
                     label_type="center" if error else "edge")
        ax.set(title=title, xlabel=x, ylabel=ylabel)
    fig.tight_layout()
    return fig


def grouped_bars(df: pd.DataFrame, x: str, ys: Mapping[str, str], title: str, xlabel: str, ylabel: str):
    """Categories side by side: for each row of ``df`` (``x`` labels), one bar per ``{column: legend}``
    of ``ys``. For categorical results, where lines between categories would suggest an order."""
    use_style()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(df) * len(ys)), 4.0))
    width = 0.8 / len(ys)
    positions = np.arange(len(df))
    for k, (column, label) in enumerate(ys.items()):
        ax.bar(positions + (k - (len(ys) - 1) / 2) * width, df[column], width, label=label)
    ax.set_xticks(positions, df[x].astype(str))
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    """Save a figure as PNG (parents created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")


def lines(df: pd.DataFrame, x: str, ys: "list[str] | Mapping[str, str]", title: str, xlabel: str, ylabel: str, logy: bool = False,
          logx: bool = False):
    """One line per column in ``ys`` against ``x`` (log axes on request). ``ys`` may map each column to
    the words its legend shows; a single line has no legend (the y label names it)."""
    use_style()
    fig, ax = plt.subplots()
    labels = ys if isinstance(ys, Mapping) else {y: y for y in ys}
    for y, label in labels.items():
        ax.plot(df[x], df[y], marker="o", label=label)
    if logy:
        ax.set_yscale("log")
    if logx:  # a few values over a decade or two: label them, not the powers of ten around them
        ax.set_xscale("log")
        ax.set_xticks(sorted(df[x].unique()), [f"{v:g}" for v in sorted(df[x].unique())])
        ax.minorticks_off()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(labels) > 1:
        ax.legend()
    fig.tight_layout()
    return fig


def bar_grid(df: pd.DataFrame, x: str, panels: Mapping[str, str], title: str):
    """Small multiples: one bar chart per ``{column: title}`` of ``panels`` (the title names the quantity
    and its unit, in words: the column names stay out of the figure), each bar labelled with its value."""
    use_style()
    width = max(3.2, 0.45 * len(df))  # room for each bar's label
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.4), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels.items()):
        ax.bar_label(ax.bar(df[x].astype(str), df[column]), fmt="%.2g", fontsize=7)  # small values stay readable
        ax.margins(y=0.12)  # room for the labels under the panel's title
        ax.set_title(label, fontsize=10)
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def tradeoff(df: pd.DataFrame, x: str, y: str, label: str, title: str, xlabel: str, ylabel: str,
             group: str | None = None):
    """A numbered point per row (e.g. domain score against retained general score), with the numbers
    explained beside the axes; ``group`` colours the points of one family and joins them with a line."""
    use_style()
    fig, ax = plt.subplots(figsize=(8.4, 4.6), layout="constrained")
    groups = df.groupby(group, sort=False) if group is not None else [(None, df)]
    for name, part in groups:
        line = ax.plot(part[x], part[y], marker="o", linestyle="-" if len(part) > 1 else "none", alpha=0.8,
                       label=None if name is None else str(name))[0]
        line.set_zorder(3)
    offsets = [(5, 5), (5, -11), (-12, 5), (-12, -11), (9, -3), (-16, -3), (-3, 9), (-3, -15)]
    key = []
    for i, (_, row) in enumerate(df.iterrows(), start=1):
        ax.annotate(str(i), (row[x], row[y]), textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=8)
        key.append(f"{i}: {row[label]}")
    ax.text(1.02, 1.0, "\n".join(key), transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if group is not None:
        ax.legend(fontsize=8, loc="lower left")
    return fig


def heatmaps(frames: Mapping[str, pd.DataFrame], title: str, xlabel: str, ylabel: str, fmt: str = "{:.2f}",
             vmin: float = 0.0, vmax: float = 1.0):
    """One annotated heat map per DataFrame (index on the y axis, columns on the x axis)."""
    use_style()
    rows = max(frame.shape[0] for frame in frames.values())
    size = (max(6.5, 5.0 * len(frames)), max(3.8, 0.3 * rows + 1.4))  # a readable row for each of many rows
    fig, axes = plt.subplots(1, len(frames), figsize=size, squeeze=False, layout="constrained")
    for ax, (name, frame) in zip(axes[0], frames.items()):
        values = frame.to_numpy(dtype=float)
        image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_xticks(range(frame.shape[1]), [f"{c:g}" if isinstance(c, float) else str(c) for c in frame.columns])
        ax.set_yticks(range(frame.shape[0]), [str(i) for i in frame.index])
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, fmt.format(value), ha="center", va="center", color="w" if value < (vmin + vmax) / 2 else "k")
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        ax.grid(False)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    return fig


def stacked_bars(df: pd.DataFrame, x: str, parts: Mapping[str, str], title: str, ylabel: str,
                 marker: str | None = None, marker_label: str = "measured peak"):
    """One stacked bar per row: the columns of ``parts`` (``{column: legend label}``) on top of each
    other; ``marker`` (a column) is drawn as a black tick on each bar (e.g. the measured peak)."""
    use_style()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(df) + 2), 4.0))
    labels = df[x].astype(str)
    bottom = np.zeros(len(df))
    for column, label in parts.items():
        ax.bar(labels, df[column], bottom=bottom, label=label)
        bottom += df[column].to_numpy(dtype=float)
    if marker is not None:
        ax.scatter(labels, df[marker], marker="_", s=400, color="k", zorder=3, label=marker_label)
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right", rotation_mode="anchor")
    ax.set(title=title, xlabel=x, ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def levels_histogram(values, levels, title: str, xlabel: str):
    """Histogram of ``values`` with vertical lines at the quantization ``levels``."""
    use_style()
    fig, ax = plt.subplots()
    ax.hist(np.asarray(values).ravel(), bins=120, color="tab:blue", alpha=0.7, density=True)
    for level in np.asarray(levels):
        ax.axvline(level, color="tab:red", linewidth=0.8)
    ax.set(title=title, xlabel=xlabel, ylabel="density (1 / unit of x)")
    fig.tight_layout()
    return fig


def power_law(df: pd.DataFrame, x: str, y: str, group: str, fits: Mapping[str, tuple[float, float]], title: str,
              xlabel: str, ylabel: str):
    """Log-log scatter of ``y`` against ``x``, one colour per value of ``group``, each with its fitted
    line ``y = a * x**b`` from ``fits`` (``{group value: (b, a)}``), the slope ``b`` in the legend."""
    use_style()
    fig, ax = plt.subplots()
    for (name, part), color in zip(df.groupby(group, sort=False), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax.scatter(part[x], part[y], color=color, zorder=3)
        b, a = fits[name]
        span = np.geomspace(part[x].min(), part[x].max(), 50)
        ax.plot(span, a * span ** b, color=color, label=f"{name}: slope {b:+.2f}")
    ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    return fig
