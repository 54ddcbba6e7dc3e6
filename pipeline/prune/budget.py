"""The keep budget of a plan: how many samples each stratum keeps, with unbiased weights.

Two ways to prune with unbiased weights. :func:`prune_well_learned` (``mmdp``,
``infobatch``) only ever prunes well-learned samples, so the kept count follows
the losses. :func:`soft_prune` (``infobatch_exact``) keeps an exact count.
The eligible samples are split into a *hard* stratum (loss at or above the
mean, or no loss seen yet) and a *well-learned* stratum; each stratum keeps
an exact number of samples drawn uniformly without replacement (the smallest
random keys), and a survivor of a stratum of size ``N`` that keeps ``K`` gets
weight ``N / K``. Every sample of a stratum is kept with probability ``K/N``,
so ``E[sum_kept w_i * loss_i] == sum_eligible loss_i`` exactly, whatever the
rounding. :func:`allocate` splits ``k`` between the strata: every hard sample
when the budget allows, the well-learned stratum's pruning probability capped
at ``max_prune_prob`` (so weights stay at most ``1/(1 - max_prune_prob)``),
and the hard stratum subsampled too when even that does not fit.

No Ray here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.prune import steps
from pipeline.prune.selection import select_smallest

# The default budget: the share of ``full``'s sample passes that a pruning epoch's
# pruning stops at (mmdp: the excluded noise first, then well-learned samples);
# about 1.4x on training time where noise or well-learned samples allow it.
DEFAULT_KEEP_RATIO = 0.6

# Why a sample was pruned (the keys of a plan's ``pruned_by_reason``).
LOW_CONSISTENCY = "low consistency"
WELL_LEARNED = "well learned (low loss)"
RANDOM = "random"
MISALIGNED = "loss trajectory unlike the clean reference's"
# Left out so that the workers' equal shares take every kept sample (Ray Train drops the rest of an uneven split).
EVEN_SPLIT = "left out for an even split across workers"
# Excluded samples that a plan still forwards with weight 0, to see their loss (not pruned).
PROBED = "probed (weight 0)"


@dataclass(frozen=True)
class PlanContext:
    """What a plan depends on besides the state: sizes, the epoch and its random salt."""

    num_samples: int
    keep_ratio: float
    epochs: int
    epoch: int
    salt: int  # 64-bit; e.g. selection.mix64(seed, epoch)

    @property
    def target(self) -> int:
        return target_count(self.num_samples, self.keep_ratio)


def target_count(num_samples: int, keep_ratio: float) -> int:
    """``round(keep_ratio * num_samples)`` (half up), at least 1 and at most n."""
    return min(num_samples, max(1, int(math.floor(keep_ratio * num_samples + 0.5))))


def allocate(n_hard: int, n_well: int, k: int, max_prune_prob: float) -> tuple[int, int]:
    """How many hard and well-learned samples to keep so that exactly k survive.

    In order of preference: keep every hard sample and the rest of the budget
    from the well-learned ones; else keep the well-learned ones with the
    smallest survival rate allowed (``1 - max_prune_prob``) and subsample the
    hard ones (still at a higher rate); else sample both at the same rate.
    Both strata keep at least one sample when they are non-empty and k >= 2,
    since a stratum with no survivors would make the weighted sum biased.
    """
    if k > n_hard + n_well:
        raise ValueError(f"cannot keep {k} of {n_hard + n_well} eligible samples")
    if n_well == 0:
        return k, 0
    if n_hard == 0:
        return 0, k
    # The epsilon keeps (1 - 0.75) * 400 = 100.00000000000001 from becoming 101.
    well_min = min(n_well, math.ceil((1.0 - max_prune_prob) * n_well - 1e-9))
    if k - n_hard >= well_min:
        return n_hard, k - n_hard
    if (k - well_min) * n_well >= well_min * n_hard:
        return k - well_min, well_min
    keep_hard = int(math.floor(k * n_hard / (n_hard + n_well) + 0.5))
    if k >= 2:
        keep_hard = min(max(keep_hard, 1), k - 1)
    return keep_hard, k - keep_hard


def soft_prune(cluster, ctx: PlanContext, max_prune_prob: float, noise: int = 0) -> tuple:
    """Keep exactly ``ctx.target`` of the eligible samples (group > 0 after
    :func:`~pipeline.prune.steps.strata`), unbiased: see the module docstring.

    Returns (kept, weights, pruned_by_reason): ``noise`` samples excluded
    before (group 0) are :data:`LOW_CONSISTENCY`, pruned ones of the
    well-learned stratum :data:`WELL_LEARNED`, hard ones subsampled to fit
    the budget :data:`RANDOM`.
    """
    n_hard, n_well, _ = (int(c) for c in np.sum(cluster.map(steps.strata, ctx.salt), axis=0))
    keep_hard, keep_well = allocate(n_hard, n_well, ctx.target, max_prune_prob)
    select_smallest(cluster, [keep_hard, keep_well])
    weights = [0.0, n_hard / keep_hard if keep_hard else 0.0, n_well / keep_well if keep_well else 0.0]
    reasons = {RANDOM: n_hard - keep_hard, WELL_LEARNED: n_well - keep_well}
    if noise:
        reasons = {LOW_CONSISTENCY: noise, **reasons}
    return steps.emit(cluster, weights, reasons)


def prune_well_learned(cluster, ctx: PlanContext, pruned: int | None, prune_prob: float,
                       noise: int = 0) -> tuple:
    """Keep every hard sample and all but ``pruned`` of the well-learned ones, unbiased.

    Eligible samples are group 1 (hard), 2 (well-learned) and 3 (probes:
    excluded samples forwarded with weight 0 to see their loss) after
    :func:`~pipeline.prune.steps.strata`. The well-learned stratum loses
    ``min(pruned, round(prune_prob * n_well), n_well - 1)`` samples drawn uniformly
    (``pruned=None``: just the ``prune_prob`` share, InfoBatch's rule); its
    survivors weigh ``n_well / keep_well``, so ``E[sum_kept w * loss]`` is the
    eligible samples' loss sum. The kept count follows the losses: before any
    loss is seen nothing is well-learned and every eligible sample is kept.

    Returns (kept, weights, pruned_by_reason), ``noise`` excluded samples
    counted as :data:`LOW_CONSISTENCY` less those probed.
    """
    n_hard, n_well, n_probe = (int(c) for c in np.sum(cluster.map(steps.strata, ctx.salt), axis=0))
    # At least one survivor: a stratum with none would drop its loss from the
    # weighted sum (round(0.5 * 1) is 1), and the sum would no longer be unbiased.
    cut = min(int(math.floor(prune_prob * n_well + 0.5)), max(0, n_well - 1))
    if pruned is not None:
        cut = min(cut, max(0, pruned))
    keep_well = n_well - cut
    select_smallest(cluster, [n_hard, keep_well, n_probe])
    weights = [0.0, 1.0, n_well / keep_well if keep_well else 0.0, 0.0]
    reasons = {WELL_LEARNED: cut}
    if noise:
        reasons = {LOW_CONSISTENCY: noise - n_probe, **reasons}
    return steps.emit(cluster, weights, reasons)
