"""PNG plots (matplotlib, optional extra ``bitalloc[plots]``). Every function writes atomically.

Without matplotlib every plot function raises :class:`PlotsUnavailable`, which is both a
:class:`~bitalloc.errors.ConfigError` (the CLI prints it as one line) and an ``ImportError`` (callers that treat
plots as optional catch it and go on); :func:`plots_available` asks first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bitalloc.errors import ConfigError
from bitalloc.io import atomic_path


class PlotsUnavailable(ConfigError, ImportError):
    """matplotlib is not installed (a ConfigError for the CLI, an ImportError for optional callers)."""


def plots_available() -> bool:
    """Whether matplotlib can be imported."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed: plots need it (pip install 'bitalloc[plots]')") from None
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _finish(fig: Any, ax: Any, path: str | Path, *, xlabel: str, ylabel: str, title: str, logx: bool) -> Path:
    """Axis labels, title, grid and legend of a one-panel plot, then save it."""
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
            if len(vals) == 1:  # one bit width for the whole tensor: the full row, labelled
                grid[i, :] = vals[0]
                ax.text((width - 1) / 2, i, f"per tensor: {vals[0]:g} bits", ha="center", va="center", fontsize=7,
                        color="white" if vals[0] < (vmin + vmax) / 2 else "black")
            else:
                grid[i, : len(vals)] = vals
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        if width > 1:
            ax.set_xlabel("channel")
        else:
            ax.set_xticks([])
        ax.set_title(label)
    fig.colorbar(im, ax=list(axes[0]), label="bits")
    fig.suptitle(title, y=1.0, va="bottom")
    return _save(fig, path)


def sensitivity_heatmap(layers: Sequence[str], candidates: Sequence[str], values: Any, path: str | Path, *,
                        title: str = "Sensitivity", label: str = "damage", chosen: Sequence[int] | None = None) -> Path:
    """Heat map of per-layer sensitivities: one row per layer, one column per bit-width candidate, colour on a
    log scale (values <= 0, e.g. exact zeros at 32 bits, are drawn at the smallest positive value shown, and
    marked "0" when exactly 0). ``chosen[i]``: a column to outline in row i (a search's choice)."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    v = np.asarray(values, dtype=np.float64)
    if v.shape != (len(layers), len(candidates)):
        raise ValueError(f"values have shape {v.shape}, not ({len(layers)}, {len(candidates)})")
    positive = v[v > 0]
    lo = float(positive.min()) if positive.size else 1e-12
    hi = float(positive.max()) if positive.size else 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(candidates) + 3), max(3.0, 0.22 * len(layers) + 1.5)))
    im = ax.imshow(np.clip(v, lo, None), aspect="auto", interpolation="nearest", cmap="magma_r",
                   norm=LogNorm(vmin=lo, vmax=max(hi, lo * 10)))
    for i, j in zip(*np.nonzero(v == 0)):
        ax.text(j, i, "0", ha="center", va="center", fontsize=6)
    if chosen is not None:
        for i, j in enumerate(chosen):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.5))
    ax.set_xticks(range(len(candidates)))
    ax.set_xticklabels(candidates, fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6)
    ax.set_xlabel("candidate (weight bits, activation bits; f = float)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
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


def pareto_front_points(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points not dominated by another (lower or equal cost and higher or equal accuracy,
    one strictly), sorted by cost; duplicates kept once."""
    uniq = sorted(set((float(c), float(a)) for c, a in pts))
    front = [p for p in uniq
             if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in uniq)]
    return sorted(front)


def _label_groups(named: list[tuple[tuple[float, float], str]], logx: bool,
                  near: float = 0.025) -> list[tuple[tuple[float, float], str]]:
    """Point names grouped so that labels do not print over each other: points closer than ``near`` of the
    axes' spans (in both directions; cost on a log scale when ``logx``) share one label at the first of them,
    the names joined by commas."""
    if not named:
        return []

    def x_of(c: float) -> float:
        return math.log10(c) if logx and c > 0 else c

    xs, ys = [x_of(c) for (c, _), _ in named], [a for (_, a), _ in named]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for (c, a), text in named:
        for anchor, texts in groups:
            if abs(x_of(anchor[0]) - x_of(c)) <= near * sx and abs(anchor[1] - a) <= near * sy:
                texts.append(text)
                break
        else:
            groups.append(((c, a), [text]))
    return [(anchor, ", ".join(texts)) for anchor, texts in groups]


def pareto_plot(points: dict[str, Sequence[tuple[float, float]]], path: str | Path, *, xlabel: str = "relative BOPs (%)",
                ylabel: str = "top-1 (%)", title: str = "", logx: bool = True,
                labels: dict[str, Sequence[str]] | None = None) -> Path:
    """Accuracy vs cost: every (cost, accuracy) point of each series as a marker, and the series' Pareto front
    (:func:`pareto_front_points`, the points no other point of the series dominates) as a line through them.
    Dominated points are drawn hollow. ``labels[series]`` (in the order of ``points[series]``) names each point
    in small type next to it (points closer than 2.5% of the axes' spans share one label: :func:`_label_groups`)."""
    labels = labels or {}
    for name, texts in labels.items():
        if name in points and len(texts) != len(points[name]):
            raise ValueError(f"labels[{name!r}] has {len(texts)} names for {len(points[name])} points")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    named = [((float(c), float(a)), str(t)) for n, pts in points.items() for (c, a), t in zip(pts, labels.get(n, []))]
    for (c, a), text in _label_groups(named, logx):
        ax.annotate(text, (c, a), textcoords="offset points", xytext=(4, 4), fontsize=6, alpha=0.8)
    for name, pts in points.items():
        pts = sorted((float(c), float(a)) for c, a in pts)
        if not pts:
            continue
        front = pareto_front_points(pts)
        fx, fy = zip(*front)
        (line,) = ax.plot(fx, fy, marker="o", linestyle="-", label=f"{name} (Pareto front)")
        rest = [p for p in pts if p not in front]
        if rest:
            rx, ry = zip(*rest)
            ax.scatter(rx, ry, facecolors="none", edgecolors=line.get_color(), label=f"{name} (dominated)")
    return _finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx)


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


def rd_plot(curves: dict[str, Sequence[tuple[float, float]]], path: str | Path, *, title: str, xlabel: str = "kbps",
            ylabel: str = "PSNR (dB)", logx: bool = False) -> Path:
    """Rate-distortion curves: one line with markers per codec through its (rate, quality) points, sorted by
    rate (e.g. ``{"x265 medium": [(kbps, psnr_yuv), ...], "bitalloc": [...]}``); rate on a log axis when
    ``logx``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, pts in curves.items():
        pts = sorted((float(r), float(q)) for r, q in pts)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", linestyle="-", label=name)
    return _finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx)


def roi_frames(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], titles: Sequence[str],
               path: str | Path, *, title: str = "") -> Path:
    """Frames side by side (RGB uint8 [H, W, 3] each), each with its region of interest (a bool [H, W] mask, or
    None) tinted red and outlined."""
    plt = _pyplot()
    if not len(images) == len(masks) == len(titles):
        raise ValueError(f"{len(images)} images, {len(masks)} masks and {len(titles)} titles: give one of each per panel")
    h, w = images[0].shape[:2]
    fig, axes = plt.subplots(1, len(images), figsize=(4.2 * len(images) * w / max(h, w) + 0.5, 4.2 * h / max(h, w) + 0.6),
                             squeeze=False)
    for ax, img, mask, name in zip(axes[0], images, masks, titles):
        ax.imshow(img, interpolation="nearest")
        if mask is not None and mask.any():
            tint = np.zeros((*mask.shape, 4))
            tint[mask] = (1.0, 0.1, 0.1, 0.3)
            ax.imshow(tint, interpolation="nearest")
            ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save(fig, path)
