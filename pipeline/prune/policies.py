"""Pruning policies: which samples an epoch trains on, with what weight, and why the rest not.

A policy is a small frozen dataclass holding its knobs. It plans an epoch
over a *cluster* of index-range shards of the pruner's state (see
:mod:`pipeline.prune.selection`)::

    kept, weights, pruned_by_reason = policy.plan(cluster, ctx)

``kept`` is a sorted int64 array of global sample indices, ``weights`` a
float32 array of the same length that multiplies each kept sample's loss,
``pruned_by_reason`` a ``{reason: count}`` dict whose counts sum to
``n - len(kept)`` (reasons: :data:`LOW_CONSISTENCY`, :data:`WELL_LEARNED`,
:data:`RANDOM`). Every global quantity (a mean, a histogram, a top-k
threshold) comes from per-shard summaries that combine exactly, and each
sample's random draw is a hash of (seed, epoch, global index), so a plan is
a pure function of (state, epoch, seed), whatever the number of shards.
``policy.select(state, epoch, rng)`` plans a plain :class:`PlanState` in one
shard (for tests and notebooks). ``policy.kept_count(...)`` says how many
samples an epoch keeps before any loss is seen, so a trainer can size its
learning-rate schedule by real steps.

Policies are registered by name in :data:`POLICIES` (``full``, ``random``,
``infobatch``, ``clip_filter``, ``mmdp``); :func:`make_policy` builds one.

**Exact keep ratio with unbiased weights.** InfoBatch prunes each
well-learned sample (loss below the mean) with a fixed probability ``p``, so
the kept count floats. Here the count is fixed at ``k = round(keep_ratio*n)``
and the pruning probability follows from it: the eligible samples are split
into a *hard* stratum (loss at or above the mean, or no loss seen yet) and a
*well-learned* stratum, each stratum keeps an exact number of samples chosen
uniformly without replacement (the smallest random keys), and a survivor of
a stratum of size ``N`` that keeps ``K`` gets weight ``N / K`` (``1/(1-p)``
with ``p = 1 - K/N``). Every sample of a stratum is kept with probability
``K/N``, so ``E[sum_kept w_i * loss_i] == sum_eligible loss_i`` exactly,
whatever the rounding. Hard samples are kept whole when the budget allows;
the well-learned stratum's pruning probability is capped at
``max_prune_prob`` (bounding weights at ``1/(1 - max_prune_prob)``), and
when even that does not fit, the hard stratum is subsampled too
(:func:`allocate`).

No Ray here: this is plain NumPy, testable on its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.prune import steps
from pipeline.prune.selection import chunks, select_smallest

LOW_CONSISTENCY = "low consistency"
WELL_LEARNED = "well learned (low loss)"
RANDOM = "random"


@dataclass(frozen=True)
class PlanState:
    """A plain, single-array view of pruning state (for :meth:`Policy.select`).

    Attributes:
        loss: float32 [n], moving average of each sample's training loss;
            meaningless where ``seen`` is False.
        seen: bool [n], True where at least one loss has been received.
        consistency: float32 [n] rank-normalised cross-modal consistency in
            (0, 1), 1 = most consistent; None when no scores were given.
        keep_ratio: fraction of the samples a pruning epoch keeps.
        epochs: total epochs of the run (annealing is relative to it).
    """

    loss: np.ndarray
    seen: np.ndarray
    consistency: np.ndarray | None
    keep_ratio: float
    epochs: int

    @property
    def num_samples(self) -> int:
        return len(self.loss)

    @property
    def target(self) -> int:
        """The number of samples a pruning epoch keeps."""
        return target_count(self.num_samples, self.keep_ratio)


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


def is_annealing(epoch: int, epochs: int, delta: float) -> bool:
    """InfoBatch's rule: prune while ``epoch < delta * epochs``, then train on all."""
    return epoch >= delta * epochs


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Exact ranks mapped to (0, 1): ``(rank + 0.5) / n`` as float32.

    Any score scale (cosine similarity, logit, margin) gives the same ranks.
    NaN scores (a sample the scorer could not score) rank lowest, i.e. least
    consistent. Ties are broken by index (stable sort), so it is deterministic.
    Beyond 2**24 samples neighbouring ranks can round to the same float32;
    selections then break the tie by index.
    """
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(scores, kind="stable")  # no float64 copy of float32 scores: same order
    del scores
    n = len(order)
    ranks = np.empty(n, dtype=np.float32)
    for sl in chunks(n):  # chunked: no n-sized float64 temporaries
        ranks[order[sl]] = (np.arange(sl.start, sl.stop, dtype=np.float64) + 0.5) / max(n, 1)
    return ranks


def approx_rank(values: np.ndarray, mask: np.ndarray, bins: int = steps.BINS) -> np.ndarray:
    """Rank of each masked value among the masked values, in (0, 1); 0 outside ``mask``.

    A full argsort of 10M floats takes about 1.5 s on one core, over the plan
    budget, so ranks come from a 65,536-bin histogram of ``arcsinh`` of the
    values (so a few huge losses do not squash the rest into one bin).
    Values sharing a bin share its mid-rank; for n up to ~10^5 that is nearly
    exact. :mod:`pipeline.prune.steps` computes the same over shards.
    """
    values = np.asarray(values, dtype=np.float32)
    count, lo, hi = steps.asinh_range(values, mask)
    if count == 0:
        return np.zeros(len(values), dtype=np.float32)
    b = steps.asinh_bins(values, lo, hi, bins)
    mid = steps.mid_ranks(np.bincount(b[mask], minlength=bins), count)
    return np.where(mask, mid[b], np.float32(0.0))


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
    n_hard, n_well = (int(c) for c in np.sum(cluster.map(steps.strata, ctx.salt), axis=0))
    keep_hard, keep_well = allocate(n_hard, n_well, ctx.target, max_prune_prob)
    select_smallest(cluster, [keep_hard, keep_well])
    weights = [0.0, n_hard / keep_hard if keep_hard else 0.0, n_well / keep_well if keep_well else 0.0]
    reasons = {RANDOM: n_hard - keep_hard, WELL_LEARNED: n_well - keep_well}
    if noise:
        reasons = {LOW_CONSISTENCY: noise, **reasons}
    return steps.emit(cluster, weights, reasons)


class Policy:
    """Base of the registered policies: ``plan``, ``select`` and ``kept_count``."""

    name: ClassVar[str] = ""
    needs_consistency: ClassVar[bool] = False

    def plan(self, cluster, ctx: PlanContext) -> tuple[np.ndarray, np.ndarray, dict]:
        """(kept indices sorted int64, weights float32, pruned_by_reason) for ``ctx.epoch``.

        The shards' scratch must have been reset (``begin_plan``) before.
        """
        raise NotImplementedError

    def select(self, state: PlanState, epoch: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Plans a :class:`PlanState` in one shard; (kept, weights). ``rng`` gives the salt."""
        cluster = steps.StateCluster(state)
        ctx = PlanContext(state.num_samples, state.keep_ratio, state.epochs, int(epoch),
                          int(rng.integers(0, 2**63)))
        kept, weights, _ = self.plan(cluster, ctx)
        return kept, weights

    def kept_count(self, num_samples: int, keep_ratio: float, epochs: int, epoch: int) -> int:
        """How many samples ``plan`` keeps at ``epoch``, known before training."""
        return target_count(num_samples, keep_ratio)

    def params(self) -> dict:
        """The knobs as plain Python values (for configs and checkpoints)."""
        return dataclasses.asdict(self)


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available to :func:`make_policy` by name."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **params) -> Policy:
    """Builds the policy registered as ``name`` with its knobs overridden by ``params``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](**params)


@register
@dataclass(frozen=True)
class Full(Policy):
    """Every sample, weight 1 (the baseline the others are measured against)."""

    name: ClassVar[str] = "full"

    def plan(self, cluster, ctx):
        cluster.map(steps.keep_all)
        return steps.emit(cluster, [0.0, 1.0], {})

    def kept_count(self, num_samples, keep_ratio, epochs, epoch):
        return num_samples


@register
@dataclass(frozen=True)
class Random(Policy):
    """A new uniform random subset of ``round(keep_ratio*n)`` samples each epoch, weight 1."""

    name: ClassVar[str] = "random"

    def plan(self, cluster, ctx):
        cluster.map(steps.random_candidates, ctx.salt)
        select_smallest(cluster, [ctx.target])
        return steps.emit(cluster, [0.0, 1.0], {RANDOM: ctx.num_samples - ctx.target})


@register
@dataclass(frozen=True)
class ClipFilter(Policy):
    """Static: the top ``keep_ratio`` fraction by consistency, every epoch, weight 1.

    The DataComp CLIP-score baseline. Equal ranks (beyond 2**24 samples)
    go to the lower index, so "top k" is exact.
    """

    name: ClassVar[str] = "clip_filter"
    needs_consistency: ClassVar[bool] = True

    def plan(self, cluster, ctx):
        cluster.map(steps.consistency_candidates)
        select_smallest(cluster, [ctx.target])
        return steps.emit(cluster, [0.0, 1.0], {LOW_CONSISTENCY: ctx.num_samples - ctx.target})


@register
@dataclass(frozen=True)
class InfoBatch(Policy):
    """Loss-only soft pruning (Qin et al., ICLR 2024) with an exact keep ratio.

    Well-learned = seen with loss below the mean loss of the seen samples;
    unseen samples count as hard (InfoBatch starts every score high). The
    kept count is exact and the weights unbiased (see the module docstring),
    so before any loss is seen this is a uniform sample weighted ``n / k``.
    Epochs ``>= delta * epochs`` train on everything with weight 1.

    Attributes:
        delta: fraction of the epochs that prune (InfoBatch's default 0.875).
        max_prune_prob: cap on a well-learned sample's pruning probability,
            so weights stay <= 1/(1 - cap); past it, hard samples are pruned too.
    """

    name: ClassVar[str] = "infobatch"
    delta: float = 0.875
    max_prune_prob: float = 0.75

    def __post_init__(self):
        _check_unit("delta", self.delta, closed=True)
        _check_unit("max_prune_prob", self.max_prune_prob, closed=False)

    def plan(self, cluster, ctx):
        if is_annealing(ctx.epoch, ctx.epochs, self.delta):
            cluster.map(steps.keep_all)
            return steps.emit(cluster, [0.0, 1.0], {})
        cluster.map(steps.mark_eligible, False)
        steps.below_mean(cluster)
        return soft_prune(cluster, ctx, self.max_prune_prob)

    def kept_count(self, num_samples, keep_ratio, epochs, epoch):
        if is_annealing(epoch, epochs, self.delta):
            return num_samples
        return target_count(num_samples, keep_ratio)


@register
@dataclass(frozen=True)
class Mmdp(Policy):
    """Ours: drop likely noise by consistency x loss, soft-prune the well-learned.

    Each epoch:

    1. Noise score from ranks (so any CLIP score scale works):
       ``s = (1 - lam) * (1 - c) + lam * l``, ``c`` the consistency rank,
       ``l`` the loss rank among samples with a loss, ``lam = loss_weight *
       min(1, epoch / loss_ramp_epochs)``: high loss *and* low consistency
       flags noise, and loss counts only once training has made it
       informative. Before any loss is seen (epoch 0) ``s = 1 - c``. A sample
       with no loss yet gets for ``l`` the mean loss rank of seen samples of
       similar consistency (:func:`~pipeline.prune.steps.expected_ranks`), so
       a clean sample wrongly dropped at epoch 0 can come back when
       consistency turns out to say little about loss.
    2. The ``noise_count`` samples with the highest ``s`` are dropped (ties
       to the lower index); the rest are *eligible*. ``noise_count =
       min(round(noise_fraction*n), n - k)`` is fixed, so kept counts are
       known in advance.
    3. Pruning epochs keep exactly ``k = round(keep_ratio*n)`` eligible
       samples by :func:`soft_prune`: eligible samples seen with loss below
       the eligible mean are well-learned, the others hard.
    4. Annealing epochs (``epoch >= delta * epochs``) keep every eligible
       sample with weight 1.

    Attributes:
        noise_fraction: share of the dataset treated as noise and dropped.
        loss_weight: weight of the loss rank in the noise score, once ramped.
        loss_ramp_epochs: epochs over which that weight ramps up from 0.
        delta: fraction of the epochs that prune; the rest anneal.
        max_prune_prob: cap on a well-learned sample's pruning probability.
    """

    name: ClassVar[str] = "mmdp"
    needs_consistency: ClassVar[bool] = True
    noise_fraction: float = 0.2
    loss_weight: float = 0.5
    loss_ramp_epochs: int = 3
    delta: float = 0.875
    max_prune_prob: float = 0.75

    def __post_init__(self):
        _check_unit("noise_fraction", self.noise_fraction, closed=False)
        _check_unit("loss_weight", self.loss_weight, closed=True)
        _check_unit("delta", self.delta, closed=True)
        _check_unit("max_prune_prob", self.max_prune_prob, closed=False)
        if self.loss_ramp_epochs < 0:
            raise ValueError(f"loss_ramp_epochs must be >= 0, got {self.loss_ramp_epochs}")

    def noise_count(self, num_samples: int, keep_ratio: float) -> int:
        """How many samples are dropped as noise (never so many that k cannot be met)."""
        wanted = int(math.floor(self.noise_fraction * num_samples + 0.5))
        return min(wanted, num_samples - target_count(num_samples, keep_ratio))

    def mark_noise(self, cluster, ctx: PlanContext) -> None:
        """Sets each shard's ``scratch["noisy"]``: the samples dropped as likely noise."""
        ramp = 1.0 if self.loss_ramp_epochs == 0 else min(1.0, ctx.epoch / self.loss_ramp_epochs)
        lam = float(np.float32(self.loss_weight * ramp))
        tables = steps.loss_rank_tables(cluster) if lam > 0 else None
        cluster.map(steps.noise_candidates, lam, tables)
        select_smallest(cluster, [self.noise_count(ctx.num_samples, ctx.keep_ratio)])
        cluster.map(steps.chosen_is_noisy)

    def noisy(self, state: PlanState, epoch: int) -> np.ndarray:
        """Boolean mask of the samples dropped as likely noise at ``epoch`` (one shard)."""
        cluster = steps.StateCluster(state)
        self.mark_noise(cluster, PlanContext(state.num_samples, state.keep_ratio, state.epochs, epoch, 0))
        return cluster.shard.scratch["noisy"]

    def plan(self, cluster, ctx):
        self.mark_noise(cluster, ctx)
        noise = self.noise_count(ctx.num_samples, ctx.keep_ratio)
        if is_annealing(ctx.epoch, ctx.epochs, self.delta):
            cluster.map(steps.keep_eligible)
            return steps.emit(cluster, [0.0, 1.0], {LOW_CONSISTENCY: noise})
        cluster.map(steps.mark_eligible, True)
        steps.below_mean(cluster)
        return soft_prune(cluster, ctx, self.max_prune_prob, noise)

    def kept_count(self, num_samples, keep_ratio, epochs, epoch):
        if is_annealing(epoch, epochs, self.delta):
            return num_samples - self.noise_count(num_samples, keep_ratio)
        return target_count(num_samples, keep_ratio)


def _check_unit(name: str, value: float, closed: bool) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
