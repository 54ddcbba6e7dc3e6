"""Pruning policies: which samples an epoch trains on, with what weight, and why the rest not.

A policy is a small frozen dataclass of knobs, registered by name in
:data:`POLICIES` and built by :func:`make_policy`. It plans an epoch over a
*cluster* of index-range partitions of the pruner's state (see
:mod:`pipeline.prune.selection`)::

    kept, weights, pruned_by_reason = policy.plan(cluster, ctx)

``kept`` is a sorted int64 array of global sample indices, ``weights`` a
float32 array that multiplies each kept sample's loss, ``pruned_by_reason``
a ``{reason: count}`` dict summing to ``n - len(kept)``. A plan is a pure
function of (state, epoch, seed), whatever the partitions.
``policy.kept_count(...)`` says how many samples an epoch keeps before any
loss is seen, so a trainer can size its learning-rate schedule by real steps.
With ``k = round(keep_ratio * n)``:

- ``full``: every sample, weight 1.
- ``random``: a new uniform subset of k samples each epoch, weight 1.
- ``clip_filter``: the k most consistent samples, every epoch, weight 1.
- ``infobatch``: k samples, pruning the well-learned (loss below the mean)
  first, survivors weighted so the expected loss sum is unchanged
  (:mod:`pipeline.prune.budget`); the last epochs train on everything.
- ``mmdp``: drops a fixed share of likely noise (low consistency, then also
  high loss), and keeps k of the rest like ``infobatch``; the last epochs
  train on every sample not dropped.

No Ray here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.prune import steps
from pipeline.prune.budget import LOW_CONSISTENCY, RANDOM, PlanContext, soft_prune, target_count
from pipeline.prune.selection import chunks, select_smallest


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


class Policy:
    """Base of the registered policies: ``plan`` and ``kept_count``."""

    name: ClassVar[str] = ""
    needs_consistency: ClassVar[bool] = False

    def plan(self, cluster, ctx: PlanContext) -> tuple[np.ndarray, np.ndarray, dict]:
        """(kept indices sorted int64, weights float32, pruned_by_reason) for ``ctx.epoch``.

        The partitions' scratch must have been reset (``begin_plan``) before.
        """
        raise NotImplementedError

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
    kept count is exact and the weights unbiased (:mod:`pipeline.prune.budget`),
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
       similar consistency (:func:`~pipeline.prune.steps.loss_rank_tables`), so
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
        """Sets each partition's ``scratch["noisy"]``: the samples dropped as likely noise."""
        ramp = 1.0 if self.loss_ramp_epochs == 0 else min(1.0, ctx.epoch / self.loss_ramp_epochs)
        lam = float(np.float32(self.loss_weight * ramp))
        tables = steps.loss_rank_tables(cluster) if lam > 0 else None
        cluster.map(steps.noise_candidates, lam, tables)
        select_smallest(cluster, [self.noise_count(ctx.num_samples, ctx.keep_ratio)])
        cluster.map(steps.chosen_is_noisy)

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
