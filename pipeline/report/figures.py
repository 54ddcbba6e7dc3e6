"""The report's figures: matplotlib ``Figure`` objects, and :func:`save_png` to write one anywhere.

Figures are built without pyplot (no global state, no display needed) and
share one size and one colour per policy, so they line up on the page.
No Ray here.
"""

from __future__ import annotations

import io as _bytesio
import math
import textwrap
import warnings

import numpy as np

from pipeline import storage
from pipeline.report.runs import POLICY_ORDER, Run
from pipeline.report.scores import ScoreSet

# One look for every figure: readable at a page's width, and the same size, so they line up.
FIGSIZE, DPI = (7.0, 4.0), 120


def save_png(fig, url: str) -> None:
    """Write ``fig`` as a PNG to ``url`` (local path or object-store URL)."""
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(buf.getvalue(), url)


def stack_curves(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over runs, epoch by epoch, over the runs that reached each epoch."""
    length = max((len(c) for c in curves), default=0)
    grid = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        grid[i, :len(c)] = c
    with warnings.catch_warnings():  # an epoch no run reached is NaN by design, not a problem to warn about
        warnings.simplefilter("ignore", RuntimeWarning)
        counts = np.sum(~np.isnan(grid), axis=0)
        mean = np.nanmean(grid, axis=0) if length else np.zeros(0)
        std = np.where(counts > 1, np.nanstd(grid, axis=0, ddof=1) if len(curves) > 1 else 0.0, 0.0)
    return mean, std


def _figure(height: float = FIGSIZE[1]):
    # Figure() without pyplot renders through Agg and keeps no global state between reports.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _colour(policy: str) -> str:
    """The policy's colour: one of its own for each of mmdp's policies, the one left for any other."""
    return f"C{POLICY_ORDER.index(policy)}" if policy in POLICY_ORDER else f"C{len(POLICY_ORDER)}"


def curves_figure(groups: dict[str, list[Run]], series, title: str, ylabel: str, scale: float = 100.0, ylim=None):
    """One line per group (the mean over its runs, a band of ± one std when it has several).

    Policies often coincide (every pruning policy keeps the same fraction), so
    each line is thinner than the one drawn before it and has its own hollow
    marker: a line drawn over another leaves it visible.
    """
    labels = [name + (f" (mean of {len(rs)})" if len(rs) > 1 else "") for name, rs in groups.items()]
    # A few short names fit beside the axes; more, or longer, go below so the plot keeps its width.
    below = len(labels) > 6 or max(map(len, labels), default=0) > 24
    fig, ax = _figure(FIGSIZE[1] + (0.25 * math.ceil(len(labels) / 2) + 0.3 if below else 0))
    styles, markers = ["-", "--", ":", "-."], "osD^vPX<>h"
    # A line style per noise setting (and experiment, where the runs are of several); a colour per policy.
    settings = sorted({(r.experiment, r.noise) for rs in groups.values() for r in rs})
    for i, (label, rs) in enumerate(zip(labels, groups.values())):
        mean, std = stack_curves([series(r) for r in rs])
        epochs = np.arange(1, len(mean) + 1)
        # Epochs with no value (not evaluated: --eval-every) are left out, not drawn as gaps that break the line.
        shown = np.isfinite(mean)
        epochs, mean, std = epochs[shown], mean[shown], np.nan_to_num(std[shown])
        colour = _colour(rs[0].policy)
        style = styles[settings.index((rs[0].experiment, rs[0].noise)) % len(styles)]
        ax.plot(epochs, mean * scale, style, color=colour, marker=markers[i % len(markers)], markersize=5,
                markerfacecolor="none", linewidth=max(1.0, 2.8 - 0.35 * i), label=label)
        if len(rs) > 1:
            ax.fill_between(epochs, (mean - std) * scale, (mean + std) * scale, color=colour, alpha=0.15)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it hides lines that sit at 100% or at the top of the accuracy curves.
    if below:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def speedup_text(row: dict) -> str | None:
    """A summary row's speed-up over full: ``1.64x``, or ``1.64x (2 shared seeds)`` where it is measured on
    other seeds than the row's means (full and the policy ran different ones)."""
    if not row["speedup"]:
        return None
    n = row.get("shared_seeds")
    return f"{row['speedup']:.2f}x" + (f" ({n} shared seed{'s' if n != 1 else ''})" if n else "")


def wall_figure(rows: list[dict]):
    """Horizontal bars of mean wall-clock per group, ± std, each labelled with its speedup over full."""
    fig, ax = _figure(max(2.5, 0.5 * len(rows) + 1.3))
    names = [textwrap.fill(r["name"], 24) for r in rows][::-1]  # long group names would squeeze the bars
    means = [r["wall"][0] for r in rows][::-1]
    errs = [r["wall"][1] for r in rows][::-1]
    ax.barh(names, means, xerr=errs if any(errs) else None, color=[_colour(r["policy"]) for r in rows][::-1],
            alpha=0.85, capsize=3)
    for y, (mean, err, row) in enumerate(zip(means, errs, rows[::-1])):
        text = f"{mean:.0f} s" + (f"  ({speedup_text(row)} vs full)" if row["speedup"] else "")
        ax.text(mean + err, y, "  " + text, va="center", fontsize=8)  # past the error bar, not over it
    # A figure title: centred on the whole figure, it is not cut by wide tick labels.
    fig.suptitle("Training wall-clock per policy (whole fit, start-up included)")
    ax.set(xlabel="wall-clock (s)" + (", mean ± std over a policy's runs" if any(errs) else ""))
    ax.set_xlim(0, max([m + e for m, e in zip(means, errs)] + [1]) * 1.45)  # room for the labels
    ax.grid(axis="x", alpha=0.3)
    return fig


def score_histogram(s: ScoreSet, name: str):
    """Consistency histograms of the clean rows and of each injected-noise kind, on shared bins."""
    fig, ax = _figure()
    everything = np.concatenate(list(s.values.values()))
    bins = np.histogram_bin_edges(everything, bins=50) if len(everything) else 10
    for i, (kind, v) in enumerate(s.values.items()):
        colour = "C0" if kind in ("clean", "all rows") else f"C{(i % 8) + 1}"
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.4, color=colour, label=f"{kind} ({len(v):,} rows)")
        ax.hist(v, bins=bins, histtype="step", color=colour, linewidth=1.2)
    separation = f"noise-detection AUROC {s.auroc:.3f}" if s.auroc is not None else "AUROC n/a"
    ax.set(title=f"CLIP consistency, {name}: clean vs injected noise ({separation})",
           xlabel=f"{s.signal} (cosine-similarity units; higher = image and text agree)",
           ylabel="samples per bin")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
