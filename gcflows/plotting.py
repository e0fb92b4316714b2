"""Figure helpers shared by the experiment scripts (matplotlib, Agg backend, PNG files).

Imported only by ``experiments/*`` (``import gcflows`` never imports matplotlib). Every function
takes plain numbers (lists / numpy arrays / floats), draws one figure, writes it to ``path`` and
returns the path; nothing is shown on screen.

- :func:`plot_curves`: several ``y(x)`` curves with optional error bands (log axes optional), and
  optional horizontal reference lines with their own bands;
- :func:`plot_panels`: the same, one panel per key (e.g. one per distance or per metric);
- :func:`plot_scatter_grid`: 2D point clouds, one panel each, over a reference cloud;
- :func:`plot_trajectories`: 2D paths (one panel per key), each ending at a marked point.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from gcflows import checks

plt.switch_backend("Agg")  # figures are written to files: no display needed

__all__ = [
    "Curve",
    "plot_curves",
    "plot_panels",
    "plot_scatter_grid",
    "plot_trajectories",
    "save",
    "panel_grid",
    "finish_grid",
]

PathLike = str | os.PathLike


class Curve:
    """One curve: ``x``, ``y`` and an optional band ``(lo, hi)`` (e.g. a 95 % interval).

    ``style`` goes to ``Axes.plot`` (e.g. ``{"marker": "o", "linestyle": "--"}``).
    """

    def __init__(self, x, y, lo=None, hi=None, label: str | None = None, style=None) -> None:
        self.x = np.asarray(x, dtype=float)
        self.y = np.asarray(y, dtype=float)
        if self.x.ndim != 1:
            raise checks.bad("x.shape", self.x.shape, "use a 1-D array of x values")
        if self.x.shape != self.y.shape:
            raise ValueError(
                f"x and y must be 1-D of the same length, got {self.x.shape} and {self.y.shape}"
            )
        self.lo = None if lo is None else np.asarray(lo, dtype=float)
        self.hi = None if hi is None else np.asarray(hi, dtype=float)
        for name, band in (("lo", self.lo), ("hi", self.hi)):
            if band is not None and band.shape != self.y.shape:
                raise checks.bad(f"{name}.shape", band.shape, f"use the shape of y {self.y.shape}")
        self.label = label
        self.style = dict(style or {})

    @classmethod
    def from_intervals(
        cls, x, intervals, label: str | None = None, *, band: str = "interval", style=None
    ) -> Curve:
        """A curve of the means of :class:`gcflows.stats.Interval` values (or their ``as_dict``)
        with the band ``[lo, hi]`` (``band="interval"``) or ``mean +- se`` (``band="se"``; an
        undefined se, e.g. of one seed, draws no band there)."""
        get = (lambda e, k: e[k]) if intervals and isinstance(intervals[0], Mapping) else getattr
        mean = np.asarray([get(e, "mean") for e in intervals], dtype=float)
        if band == "se":
            se = np.nan_to_num(np.asarray([get(e, "se") for e in intervals], dtype=float))
            lo, hi = mean - se, mean + se
        elif band == "interval":
            lo = np.asarray([get(e, "lo") for e in intervals], dtype=float)
            hi = np.asarray([get(e, "hi") for e in intervals], dtype=float)
        else:
            raise checks.bad("band", band, "use 'interval' or 'se'")
        return cls(x, mean, lo, hi, label=label, style=style)


def save(fig, path: PathLike) -> Path:
    """Write ``fig`` as a PNG (parent folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw(ax, curves: Sequence[Curve], hlines: Sequence[Mapping] = ()) -> None:
    for c in curves:
        style = {"marker": "o", "markersize": 3, **c.style}
        (line,) = ax.plot(c.x, c.y, label=c.label, **style)
        if c.lo is not None and c.hi is not None:
            ax.fill_between(c.x, c.lo, c.hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for h in hlines:
        y = float(h["y"])
        line = ax.axhline(
            y,
            color=h.get("color", "k"),
            linestyle=h.get("linestyle", "--"),
            linewidth=1,
            label=h.get("label"),
        )
        if h.get("lo") is not None and h.get("hi") is not None:
            ax.axhspan(float(h["lo"]), float(h["hi"]), color=line.get_color(), alpha=0.12)


def _axes_style(ax, xlabel, ylabel, title, logx, logy, legend=True) -> None:
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_curves(
    curves: Sequence[Curve],
    path: PathLike,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    hlines: Sequence[Mapping] = (),
    figsize: tuple[float, float] = (5.5, 4.0),
) -> Path:
    """One panel with ``curves``; ``hlines``: dicts ``{"y", "label", "lo", "hi", "color"}``."""
    fig, ax = plt.subplots(figsize=figsize)
    _draw(ax, curves, hlines)
    _axes_style(ax, xlabel, ylabel, title, logx, logy)
    return save(fig, path)


def panel_grid(n: int, ncols: int, panel_size: tuple[float, float], **kw):
    """A figure with ``n`` panels in rows of at most ``ncols``: ``(fig, axes (nrows, ncols))``.

    The one panel-grid set-up of every multi-panel figure; close it with :func:`finish_grid`.
    ``kw`` goes to ``plt.subplots`` (e.g. ``sharex``)."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    w, h = panel_size
    return plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)


def finish_grid(fig, axes, n: int, suptitle: str, path: PathLike, legend_below: bool = False):
    """Hide the unused panels, add the title (and, with ``legend_below``, one legend of the first
    panel's lines under the grid), lay out and save; returns the path."""
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    rect = (0, 0, 1, 1)
    if legend_below:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=max(1, len(labels)))
        rect = (0, 0.06 / axes.shape[0], 1, 1)
    fig.tight_layout(rect=rect)
    return save(fig, path)


def plot_panels(
    panels: Mapping[str, Sequence[Curve]],
    path: PathLike,
    *,
    xlabel: str = "",
    ylabel: str | Mapping[str, str] = "",
    logx: bool = False,
    logy: bool | Mapping[str, bool] = False,
    hlines: Mapping[str, Sequence[Mapping]] | None = None,
    ncols: int = 3,
    suptitle: str = "",
) -> Path:
    """One panel per key of ``panels`` (its title); ``ylabel`` / ``logy`` per panel or shared."""
    if not panels:
        raise checks.bad("panels", panels, "hold at least one panel")
    n = len(panels)
    fig, axes = panel_grid(n, ncols, (4.6, 3.6))
    for ax, (name, curves) in zip(axes.flat, panels.items(), strict=False):
        _draw(ax, curves, (hlines or {}).get(name, ()))
        yl = ylabel.get(name, "") if isinstance(ylabel, Mapping) else ylabel
        ly = logy.get(name, False) if isinstance(logy, Mapping) else logy
        _axes_style(ax, xlabel, yl, name, logx, ly)
    return finish_grid(fig, axes, n, suptitle, path)


def plot_scatter_grid(
    clouds: Mapping[str, np.ndarray],
    path: PathLike,
    *,
    reference: np.ndarray | None = None,
    reference_label: str = "target",
    ncols: int = 4,
    limits: tuple[float, float, float, float] | None = None,
    suptitle: str = "",
) -> Path:
    """2D point clouds ``(n, 2)``, one panel per key, each over the ``reference`` cloud (grey).

    ``limits = (xmin, xmax, ymin, ymax)`` fixes the axes (default: from the reference, padded).
    """
    if not clouds:
        raise checks.bad("clouds", clouds, "hold at least one cloud")
    n = len(clouds)
    fig, axes = panel_grid(n, ncols, (3.2, 3.2))
    if limits is None and reference is not None:
        ref = np.asarray(reference)
        lo, hi = ref.min(0), ref.max(0)
        pad = 0.5 * max(float((hi - lo).max()), 0.5)
        limits = (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)
    for ax, (name, pts) in zip(axes.flat, clouds.items(), strict=False):
        pts = np.asarray(pts)
        if reference is not None:
            ref = np.asarray(reference)
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.7", label=reference_label)
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.6, label="samples")
        if limits is not None:
            ax.set_xlim(limits[0], limits[1])
            ax.set_ylim(limits[2], limits[3])
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal", adjustable="box")
    return finish_grid(fig, axes, n, suptitle, path)


def plot_trajectories(
    paths: Mapping[str, np.ndarray],
    path: PathLike,
    *,
    endpoints: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    ncols: int = 4,
    limits: tuple[float, float, float, float] | None = None,
    suptitle: str = "",
) -> Path:
    """2D paths ``(n_paths, n_steps, 2)``, one panel per key; ``endpoints (n_paths, 2)`` starred.

    Each path is drawn from its first to its last point, the last point marked by a dot.
    """
    if not paths:
        raise checks.bad("paths", paths, "hold at least one panel")
    n = len(paths)
    fig, axes = panel_grid(n, ncols, (3.2, 3.2))
    for ax, (name, arr) in zip(axes.flat, paths.items(), strict=False):
        arr = np.asarray(arr)
        if arr.ndim != 3 or arr.shape[2] != 2:
            fix = "use shape (n_paths, n_steps, 2)"
            raise checks.bad(f"paths[{name!r}].shape", arr.shape, fix)
        if reference is not None:
            ref = np.asarray(reference)
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.8")
        for j in range(arr.shape[0]):
            (line,) = ax.plot(arr[j, :, 0], arr[j, :, 1], linewidth=1)
            ax.plot(arr[j, -1, 0], arr[j, -1, 1], "o", color=line.get_color(), markersize=3)
        if endpoints is not None:
            ep = np.asarray(endpoints)
            ax.plot(ep[:, 0], ep[:, 1], "k*", markersize=7, label="exact endpoint")
        if limits is not None:
            ax.set_xlim(limits[0], limits[1])
            ax.set_ylim(limits[2], limits[3])
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(name, fontsize=9)
    return finish_grid(fig, axes, n, suptitle, path)
