"""Evaluation helpers: how well a score separates noisy from clean rows."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` rows (higher = more positive).

    The Mann-Whitney U statistic from average ranks, so ties count one half.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative rows")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's cut of ``values`` and its separability (between-group / total variance, in [0, 1]).

    The cut splits the histogram into the two groups with the largest
    between-group variance. Separability is about 0.64 for one Gaussian
    and approaches 1 for two well-apart modes.
    """
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1]
    weight_high = len(values) - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2 / len(values) ** 2
    best = int(np.argmax(between))
    total = values.var()
    return float(edges[1:-1][best]), float(between[best] / total) if total > 0 else 0.0


# The most share of the scored rows a consistency signal may lack (NaN) and still be used. A missing value
# ranks as the least consistent (pipeline.prune.policies.rank_normalise), so beyond half every share the
# policies take on it (the noise estimate is capped at half) falls among rows it says nothing of, picked by
# their index (key order): a plan that looks made by the signal and is not. Below it the rows it has rank
# the rest, and the rows it lacks count as the least consistent, as the pruner documents (said in the log).
MAX_MISSING_SIGNAL = 0.5


def missing_share(values: np.ndarray) -> float:
    """The share of ``values`` that are NaN (0 for none)."""
    return float(np.isnan(values).mean()) if len(values) else 0.0


def auto_signal(margin: np.ndarray) -> str:
    """The consistency column ``--signal auto`` reads, given the scores' ``clip_margin``: the margin unless it is
    missing on more than :data:`MAX_MISSING_SIGNAL` of the rows (scores made in caption mode have none), else
    ``clip_score``. The train job and the report decide alike."""
    return "clip_margin" if len(margin) and missing_share(np.asarray(margin, float)) <= MAX_MISSING_SIGNAL \
        else "clip_score"


# Separability below which the consistency histogram is read as one mode (no
# distinct group of noisy pairs). Measured on Fashion-MNIST with the reference
# CLIP: clean rows alone 0.64-0.69, with 30% symmetric noise 0.72-0.87.
MIN_SEPARABILITY = 0.7


# A pair more than this many robust spreads below the consistent group's
# median is not read as one of that group (about 0.1% of a Gaussian group).
TAIL_SPREADS = 3.0


def estimate_noise_fraction(consistency: np.ndarray, cap: float = 0.5,
                            tail_spreads: float | None = TAIL_SPREADS) -> float:
    """Share of pairs in the low-consistency mode (mmdp's default ``noise_fraction``).

    Otsu's cut of the consistency histogram, if it has two distinct modes
    (separability >= MIN_SEPARABILITY); 0 if it has one. The cut moves up to
    :func:`lower_tail_bound` of the pairs above it when that bound is higher:
    Otsu's criterion assumes groups of like spread, and beside a narrow
    consistent group and a wide low one (a caption score's histogram) it cuts
    inside the low group, counting as consistent pairs that lie far below
    every consistent one. Where the groups are alike (a label margin's
    histogram) the bound lies below Otsu's cut and changes nothing
    (``tail_spreads`` None: Otsu's cut alone). Capped at ``cap``: a signal
    that calls most pairs noise is more likely miscalibrated.
    """
    values = np.asarray(consistency, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return 0.0
    cut, separability = otsu(values)
    if separability < MIN_SEPARABILITY:
        return 0.0
    if tail_spreads is not None:
        cut = max(cut, lower_tail_bound(values[values >= cut], tail_spreads))
    return float(min(cap, np.mean(values < cut)))


def lower_tail_bound(values: np.ndarray, spreads: float = TAIL_SPREADS) -> float:
    """The value ``spreads`` robust spreads below the median of ``values``: the low end of one group.

    The spread is that of the values below the median (1.4826 times their
    median distance to it, the standard deviation for a Gaussian), since a
    group of consistent pairs is skewed: its low side, toward the noise,
    is the wider, and the one the bound is about.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return -np.inf
    median = float(np.median(values))
    below = median - values[values < median]
    spread = 1.4826 * float(np.median(below)) if len(below) else 0.0
    return median - spreads * spread
