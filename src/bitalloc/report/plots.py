"""PNG plots (matplotlib, optional extra ``bitalloc[plots]``). Every function writes atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitalloc.errors import ConfigError
from bitalloc.io import atomic_path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'bitalloc[plots]'") from None
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def bit_heatmap(layers: Sequence[dict[str, Any]], path: str | Path, *, title: str = "Bits per channel") -> Path:
    """Heat map of per-channel bit widths: one row per layer, weights (left) and input activations (right).

    ``layers``: dicts with ``name``, ``w_bits_per_channel`` and ``a_bits_per_channel`` lists (either may be
    empty or absent). Channels beyond a layer's count are blank.
    """
    plt = _pyplot()
    names = [l["name"] for l in layers]
    panels = [("weight (output channels)", "w_bits_per_channel"), ("input activation (channels)", "a_bits_per_channel")]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(3.0, 0.28 * len(names) + 1.5)), squeeze=False)
    vmin, vmax = 1, 8
    for l in layers:
        for _, key in panels:
            vals = l.get(key) or []
            if vals:
                vmin, vmax = min(vmin, min(vals)), max(vmax, max(vals))
    im = None
    for ax, (label, key) in zip(axes[0], panels):
        width = max([len(l.get(key) or []) for l in layers] + [1])
        grid = np.full((len(layers), width), np.nan)
        for i, l in enumerate(layers):
            vals = l.get(key) or []
            grid[i, : len(vals)] = vals
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("channel")
        ax.set_title(label)
    fig.colorbar(im, ax=list(axes[0]), label="bits")
    fig.suptitle(title)
    return _save(fig, path)


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], path: str | Path, *, ylabel: str,
              title: str = "") -> Path:
    """Grouped bar chart: one group per label, one bar per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(series)) / 2), 4))
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def pareto_plot(points: dict[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str = "relative BOPs (%)",
                ylabel: str = "top-1 (%)", title: str = "", logx: bool = True) -> Path:
    """Scatter/line plot of (cost, accuracy) points per method; each series is drawn as its Pareto front."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, pts in points.items():
        pts = sorted(pts)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def line_plot(series: dict[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
              title: str = "") -> Path:
    """One line per series of (x, y) points (e.g. each layer's bit width over training)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) <= 20:
        ax.legend(fontsize=7)
    return _save(fig, path)
