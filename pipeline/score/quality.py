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


# Separability below which the consistency histogram is read as one mode (no
# distinct group of noisy pairs). Measured on Fashion-MNIST with the reference
# CLIP: clean rows alone 0.64-0.69, with 30% symmetric noise 0.72-0.87.
MIN_SEPARABILITY = 0.7


# The posterior probability of being noise above which a pair is excluded.
# Excluding a clean pair and keeping a noisy one do not cost the same: on the
# reference protocol (30% symmetric noise, seed 0) training without the 342
# noisy pairs the global cut kept gained 0.55 points, training with the 480
# clean pairs it excluded gained 0.20, so a kept noisy pair costs about four
# times an excluded clean one, and the cost-minimising rule excludes a pair
# when P(noise) > 1 / (1 + 4) (BENCHMARKS.md, "Where the noise decision's
# errors cost").
NOISE_POSTERIOR = 0.2


def two_gaussians(values: np.ndarray, cut: float, bins: int = 1024, iters: int = 200,
                  tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-component Gaussian mixture of ``values`` by EM: (weights, means, sds), low component first.

    Fitted on a ``bins``-bin histogram (the cost does not grow with the row
    count), started from the two groups either side of ``cut``.
    """
    counts, edges = np.histogram(values, bins=bins)
    x = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float64)
    width = edges[1] - edges[0]
    sides = [values < cut, values >= cut]
    w = np.array([np.mean(s) for s in sides])
    mu = np.array([values[s].mean() for s in sides])
    sd = np.array([max(values[s].std(), width) for s in sides])
    previous = -np.inf
    for _ in range(iters):
        dens = w * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) / sd
        total = np.maximum(dens.sum(axis=1, keepdims=True), 1e-300)
        resp = counts[:, None] * dens / total
        mass = np.maximum(resp.sum(axis=0), 1e-12)
        w, mu = mass / counts.sum(), (resp * x[:, None]).sum(axis=0) / mass
        sd = np.maximum(np.sqrt((resp * (x[:, None] - mu) ** 2).sum(axis=0) / mass), width)
        likelihood = float((counts * np.log(total[:, 0])).sum())
        if likelihood - previous < tol * abs(likelihood):
            break
        previous = likelihood
    order = np.argsort(mu)
    return w[order], mu[order], sd[order]


def estimate_noise_fraction(consistency: np.ndarray, cap: float = 0.5,
                            posterior: float = NOISE_POSTERIOR) -> float:
    """Share of pairs to exclude as noise (mmdp's default ``noise_fraction``).

    If the consistency histogram has two distinct modes (Otsu's
    separability >= MIN_SEPARABILITY; else 0), a two-Gaussian mixture is
    fitted to it and the pairs below the first value where the low
    component's posterior falls to ``posterior`` are the estimate (from the
    low end up, so a wide low component's far right tail does not count).
    Capped at ``cap``: a signal that calls most pairs noise is more likely
    miscalibrated.
    """
    values = np.asarray(consistency, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return 0.0
    cut, separability = otsu(values)
    if separability < MIN_SEPARABILITY:
        return 0.0
    w, mu, sd = two_gaussians(values, cut)
    grid = np.linspace(values.min(), values.max(), 4097)
    dens = w * np.exp(-0.5 * ((grid[:, None] - mu) / sd) ** 2) / sd
    noise = dens[:, 0] / np.maximum(dens.sum(axis=1), 1e-300)
    above = np.flatnonzero(noise <= posterior)
    cut = grid[above[0]] if len(above) else grid[-1]
    return float(min(cap, np.mean(values < cut)))
