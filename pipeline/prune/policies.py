"""Pruning policies: which samples an epoch trains on, with what weight, and why the rest not.

A policy is a small frozen dataclass of knobs, registered by name in
:data:`POLICIES` and built by :func:`make_policy`. It plans an epoch over a
*cluster* of index-range partitions of the pruner's state (see
:mod:`pipeline.prune.selection`)::

    kept, weights, pruned_by_reason = policy.plan(cluster, ctx)

``kept`` is a sorted int64 array of global sample indices, ``weights`` a
float32 array that multiplies each kept sample's loss, ``pruned_by_reason``
a ``{reason: count}`` dict summing to ``n - len(kept)``. A plan is a pure
function of (state, epoch, seed), whatever the partitions. With
``k = round(keep_ratio * n)``:

- ``full``: every sample, weight 1.
- ``random``: a new uniform subset of k samples each epoch, weight 1.
- ``clip_filter``: the k most consistent samples, every epoch, weight 1.
- ``clip_cut``: every sample but the estimated noise (the least consistent
  ``noise_fraction``), every epoch, weight 1.
- ``infobatch``: InfoBatch as published: prunes a share of the well-learned
  (loss below the mean), survivors weighted up; the kept count follows the
  losses; the last epochs train on everything.
- ``infobatch_exact``: InfoBatch held to exactly k samples an epoch.
- ``trajectory``: loss-trajectory pruning after AlignPrune (Qin et al., CVPR
  2026) inside InfoBatch's rule: the samples whose recent losses move least
  like a small known-clean reference set's are pruned; needs that reference.
- ``mmdp``: excludes likely noise (low consistency; optionally also high
  loss, with probes so an excluded clean sample can return), then, if the
  rest still exceed k, soft-prunes well-learned ones down to k at most.

No Ray here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.prune import steps
from pipeline.prune.budget import LOW_CONSISTENCY, MISALIGNED, RANDOM, PlanContext, prune_well_learned, soft_prune
from pipeline.prune.selection import chunks, select_smallest


def is_annealing(epoch: int, epochs: int, delta: float) -> bool:
    """InfoBatch's rule as its code runs it: prune while ``epoch + 1 <= delta * epochs``, then train on all
    (its sampler's count runs one ahead of the epoch: with 20 epochs and delta 0.875, all from epoch 17)."""
    return epoch + 1 > delta * epochs


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
    """Base of the registered policies: ``plan``."""

    name: ClassVar[str] = ""
    needs_consistency: ClassVar[bool] = False
    # Whether its plans follow the keep ratio (``ctx.target``); the others ignore it.
    uses_keep_ratio: ClassVar[bool] = False
    # Epochs of per-sample loss history the policy reads (0: none); such a
    # policy also needs a known-clean reference set (``Pruner(reference=...)``).
    history_epochs: ClassVar[int] = 0
    # m of the per-sample loss it reads, ``m * previous + (1 - m) * latest`` (the Pruner's default):
    # 0.5 smooths one noisy epoch; 0 is each sample's latest loss.
    loss_momentum: ClassVar[float] = 0.5

    def plan(self, cluster, ctx: PlanContext) -> tuple[np.ndarray, np.ndarray, dict]:
        """(kept indices sorted int64, weights float32, pruned_by_reason) for ``ctx.epoch``.

        The partitions' scratch must have been reset (``begin_plan``) before.
        """
        raise NotImplementedError

    def params(self) -> dict:
        """The knobs as plain Python values (for configs and checkpoints)."""
        return dataclasses.asdict(self)


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available to :func:`make_policy` by name."""
    POLICIES[cls.name] = cls
    return cls


def reads(name: str, setting: str) -> bool:
    """Whether the plans of the policy registered as ``name`` depend on the train job's ``setting``:
    ``keep_ratio`` (a budget), ``signal`` (the consistency), ``noise_fraction`` (a noise cut) or
    ``policy_params`` (any knob of its own). The train job refuses the flags its policy does not read, and
    the report groups runs by the ones it does."""
    cls = POLICIES[name]
    knobs = {f.name for f in dataclasses.fields(cls)}
    return {"keep_ratio": cls.uses_keep_ratio, "signal": cls.needs_consistency,
            "noise_fraction": "noise_fraction" in knobs, "policy_params": bool(knobs)}[setting]


def check_settings(policy: str, params: dict, *, keep_ratio: float | None = None,
                   noise_fraction: float | None = None, signal: str = "auto", reference: bool = False,
                   flags: bool = False) -> None:
    """Refuse settings a run of ``policy`` cannot use, before any actor starts: an unknown policy, knobs it
    does not have or cannot take (it is built here, as the pruning actor builds it), a budget, a noise
    share or a consistency signal it would not read (the run would go on as if they were not given),
    values out of range, reference samples without the policy that needs them (``trajectory``) or
    the reverse. ``flags``: name them as the train job's flags (``--keep-ratio``), else as
    :meth:`pipeline.train.pruning.Pruning.from_scores`'s arguments (``keep_ratio``).

    Raises:
        ValueError: naming the setting and what the policy does instead.
    """
    name = (lambda s: "--" + s.replace("_", "-")) if flags else (lambda s: s)
    if policy not in POLICIES:
        raise ValueError(f"{name('policy')} {policy!r}: choose one of {', '.join(POLICIES)}")
    known = [f.name for f in dataclasses.fields(POLICIES[policy])]
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ValueError(f"{name('policy_params')}: policy {policy} has no parameter {', '.join(unknown)} "
                         f"(its parameters: {', '.join(known) or 'none'})")
    try:
        built = make_policy(policy, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name('policy_params')} for policy {policy}: {exc}") from None
    if keep_ratio is not None:
        if not reads(policy, "keep_ratio"):
            budgets = ", ".join(p for p in POLICIES if reads(p, "keep_ratio"))
            own = (f" (its pruning rate: {name('policy_params')} prune_prob=...)" if "prune_prob" in known else "")
            raise ValueError(f"{name('keep_ratio')}: policy {policy} decides what it keeps by its own rule{own}; "
                             f"the policies with a budget: {budgets}")
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"{name('keep_ratio')} must be in (0, 1], got {keep_ratio}")
    if noise_fraction is not None:
        if not reads(policy, "noise_fraction"):
            cutting = ", ".join(p for p in POLICIES if reads(p, "noise_fraction"))
            raise ValueError(f"{name('noise_fraction')}: policy {policy} excludes no noise (the policies that do: "
                             f"{cutting})")
        if "noise_fraction" in params:
            raise ValueError(f"{name('noise_fraction')} and {name('policy_params')} noise_fraction=...: give it once")
        if not 0 <= noise_fraction < 1:
            raise ValueError(f"{name('noise_fraction')} must be in [0, 1), got {noise_fraction}")
    if signal != "auto" and not reads(policy, "signal"):
        raise ValueError(f"{name('signal')} {signal}: policy {policy} reads no consistency scores")
    if bool(built.history_epochs) != reference:
        needing = ", ".join(p for p in POLICIES if make_policy(p).history_epochs)
        raise ValueError(f"{name('reference_keys')} goes with {name('policy')} {needing}, which needs it")


def make_policy(name: str, **params) -> Policy:
    """Builds the policy registered as ``name`` with its knobs overridden by ``params``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    counts = [f.name for f in dataclasses.fields(POLICIES[name]) if f.type in ("int", int)]
    for knob in counts:  # a window of 10.0 epochs would fail only inside the pruner
        if knob in params and (isinstance(params[knob], bool) or not isinstance(params[knob], (int, np.integer))):
            raise ValueError(f"{knob} takes a whole number, got {params[knob]!r}")
    return POLICIES[name](**params)


@register
@dataclass(frozen=True)
class Full(Policy):
    """Every sample, weight 1 (the baseline the others are measured against)."""

    name: ClassVar[str] = "full"

    def plan(self, cluster, ctx):
        return steps.plan_everything(cluster)


@register
@dataclass(frozen=True)
class Random(Policy):
    """A new uniform random subset of ``round(keep_ratio*n)`` samples each epoch, weight 1."""

    name: ClassVar[str] = "random"
    uses_keep_ratio: ClassVar[bool] = True

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
    uses_keep_ratio: ClassVar[bool] = True
    needs_consistency: ClassVar[bool] = True

    def plan(self, cluster, ctx):
        cluster.map(steps.consistency_candidates)
        select_smallest(cluster, [ctx.target])
        return steps.emit(cluster, [0.0, 1.0], {LOW_CONSISTENCY: ctx.num_samples - ctx.target})


@register
@dataclass(frozen=True)
class ClipCut(Policy):
    """Static: every sample but the estimated noise, by consistency, every epoch, weight 1.

    The consistency filter at the cut the data suggests rather than at a fixed
    fraction: the ``noise_fraction`` least consistent samples are dropped
    (the train job estimates it from the consistency histogram, as for mmdp).
    """

    name: ClassVar[str] = "clip_cut"
    needs_consistency: ClassVar[bool] = True
    noise_fraction: float = 0.2

    def __post_init__(self):
        _check_unit("noise_fraction", self.noise_fraction, closed=False)

    def plan(self, cluster, ctx):
        drop = noise_count(self.noise_fraction, ctx.num_samples)
        cluster.map(steps.consistency_candidates)
        select_smallest(cluster, [ctx.num_samples - drop])
        return steps.emit(cluster, [0.0, 1.0], {LOW_CONSISTENCY: drop})


@register
@dataclass(frozen=True)
class InfoBatch(Policy):
    """Loss-only soft pruning as InfoBatch defines it (Qin et al., ICLR 2024).

    Every sample in epoch 0; then a ``prune_prob`` share of the well-learned
    samples (seen, latest loss below the mean) is pruned at random and their
    survivors weigh ``1 / (1 - prune_prob)``, so the kept count follows the
    losses; epochs ``>= delta * epochs`` train on everything with weight 1.
    (InfoBatch draws each sample's fate alone; the share here is exact, with
    the same expectation.)

    Attributes:
        prune_prob: InfoBatch's r, the chance a well-learned sample is pruned.
        delta: fraction of the epochs that prune (InfoBatch's default 0.875).
    """

    name: ClassVar[str] = "infobatch"
    loss_momentum: ClassVar[float] = 0.0  # InfoBatch keeps each sample's latest loss
    prune_prob: float = 0.5
    delta: float = 0.875

    def __post_init__(self):
        _check_unit("prune_prob", self.prune_prob, closed=False)
        _check_unit("delta", self.delta, closed=True)

    def plan(self, cluster, ctx):
        if is_annealing(ctx.epoch, ctx.epochs, self.delta):
            return steps.plan_everything(cluster)
        cluster.map(steps.mark_eligible, False)
        steps.below_mean(cluster)
        return prune_well_learned(cluster, ctx, None, self.prune_prob)


@register
@dataclass(frozen=True)
class InfoBatchExact(Policy):
    """InfoBatch with an exact keep ratio: ``round(keep_ratio * n)`` samples every pruning epoch.

    The well-learned are pruned first (at most ``max_prune_prob`` of them),
    then hard samples at random; survivors weighted so the expected loss sum
    is unchanged (:func:`~pipeline.prune.budget.soft_prune`). Before any loss
    is seen this is a uniform sample weighted ``n / k``. Epochs ``>= delta *
    epochs`` train on everything with weight 1.
    """

    name: ClassVar[str] = "infobatch_exact"
    uses_keep_ratio: ClassVar[bool] = True
    loss_momentum: ClassVar[float] = 0.0  # as InfoBatch
    delta: float = 0.875
    max_prune_prob: float = 0.75

    def __post_init__(self):
        _check_unit("delta", self.delta, closed=True)
        _check_unit("max_prune_prob", self.max_prune_prob, closed=False)

    def plan(self, cluster, ctx):
        if is_annealing(ctx.epoch, ctx.epochs, self.delta):
            return steps.plan_everything(cluster)
        cluster.map(steps.mark_eligible, False)
        steps.below_mean(cluster)
        return soft_prune(cluster, ctx, self.max_prune_prob)


@register
@dataclass(frozen=True)
class Trajectory(Policy):
    """Loss-trajectory pruning (AlignPrune's alignment score, Qin et al., CVPR 2026) inside InfoBatch's rule.

    A sample's score is the Pearson correlation of its losses over the last
    ``window`` epochs with the mean losses of a small known-clean *reference*
    set over the same epochs (clean samples' losses fall together; a
    mislabelled sample's do not). Every sample in epoch 0; while too few
    epochs have passed for a trajectory (``min_points``), InfoBatch's loss
    rule; then, of the samples scoring below the mean score, a
    ``prune_prob`` share is pruned, lowest first, and the rest train with
    weight 1 (pruning here removes suspect samples, so survivors are not
    weighted up). The reference samples are never pruned (their losses are the
    reference); epochs ``>= delta * epochs`` train on everything. Uses clean
    data that the other policies do not.

    Attributes:
        prune_prob: share of the below-mean-score samples pruned (InfoBatch's r).
        delta: fraction of the epochs that prune (InfoBatch's 0.875).
        window: epochs of loss history per sample (2 B a sample each).
        min_points: epochs with a loss a trajectory needs to be scored.
    """

    name: ClassVar[str] = "trajectory"
    loss_momentum: ClassVar[float] = 0.0  # InfoBatch's rule, on each sample's latest loss, until trajectories exist
    prune_prob: float = 0.5
    delta: float = 0.875
    window: int = 10
    min_points: int = 3

    def __post_init__(self):
        _check_unit("prune_prob", self.prune_prob, closed=False)
        _check_unit("delta", self.delta, closed=True)
        if not 2 <= self.min_points <= self.window:
            raise ValueError(f"need 2 <= min_points <= window, got {self.min_points} and {self.window}")

    @property
    def history_epochs(self) -> int:
        return self.window

    def plan(self, cluster, ctx):
        if ctx.epoch == 0 or is_annealing(ctx.epoch, ctx.epochs, self.delta):
            return steps.plan_everything(cluster)
        count, mean = steps.alignment_mean(cluster, self.min_points)
        if not count:  # no trajectory long enough yet: InfoBatch's loss rule
            cluster.map(steps.mark_eligible, False)
            steps.below_mean(cluster)
            cluster.map(steps.protect_reference)
            return prune_well_learned(cluster, ctx, None, self.prune_prob)
        candidates = sum(cluster.map(steps.misaligned_candidates, mean))
        cut = int(math.floor(self.prune_prob * candidates + 0.5))
        select_smallest(cluster, [cut])
        cluster.map(steps.keep_unchosen)
        return steps.emit(cluster, [0.0, 1.0], {MISALIGNED: cut})


@register
@dataclass(frozen=True)
class Mmdp(Policy):
    """Ours: exclude likely noise by consistency, soft-prune the well-learned among the rest by loss.

    Each epoch:

    1. Noise score from ranks (so any CLIP score scale works):
       ``s = (1 - lam) * (1 - c) + lam * l``, ``c`` the consistency rank,
       ``l`` the loss rank among samples with a loss, ``lam = loss_weight *
       min(1, epoch / loss_ramp_epochs)``. By default ``loss_weight`` is 0:
       the noise decision rests on the consistency alone, from a model that
       never trained on these labels. Mixing the loss in (``loss_weight`` >
       0) ranks training losses, which memorisation drives down for noise
       that has structure (pair-flipped labels), against excluded samples'
       held-out ones: on the reference protocol it cost 0.8 points under
       pair-flip noise and gained nothing under symmetric noise
       (BENCHMARKS.md). A sample with no loss yet gets for ``l`` the
       mean loss rank of seen samples of similar consistency
       (:func:`~pipeline.prune.steps.loss_rank_tables`).
    2. The ``round(noise_fraction * n)`` samples with the highest ``s`` are
       excluded; the rest are *eligible*. Excluded samples cost nothing, except
       that with ``probe_every`` > 0 (it needs ``loss_weight`` > 0) each is
       *probed* every ``probe_every`` epochs (from epoch 1): forwarded with
       weight 0, on top of the budget, so that a clean sample excluded by
       mistake (its loss low) can return.
    3. The budget, ``k = round(keep_ratio * n)``, is a share of ``full``'s
       sample passes, and the excluded noise is its first saving. Of the
       eligible samples, those seen with a loss below the eligible mean are
       well-learned; at most ``max_prune_prob`` of them, and no more than
       brings the epoch down to k, are pruned at random, their survivors
       weighted up so the expected loss sum is the eligible samples'
       (:func:`~pipeline.prune.budget.prune_well_learned`). So the clean rows
       lose only what the noise did not already save: with 30% excluded and
       a budget of 0.6, a seventh of them an epoch; with as much noise as
       ``1 - keep_ratio`` or more, none. Hard samples are never pruned;
       epoch 0, with no loss seen, trains on every eligible sample.
    4. Epochs ``>= delta * epochs`` (none by default) keep every eligible sample, weight 1.

    Attributes:
        noise_fraction: share of the dataset excluded as noise.
        loss_weight: weight of the loss rank in the noise score, once ramped.
        loss_ramp_epochs: epochs over which that weight ramps up from 0.
        probe_every: an excluded sample's loss is seen every this many epochs (0: never).
        max_prune_prob: most of the well-learned samples one epoch prunes.
        delta: fraction of the epochs that prune; the rest keep every eligible sample.
    """

    name: ClassVar[str] = "mmdp"
    uses_keep_ratio: ClassVar[bool] = True
    needs_consistency: ClassVar[bool] = True
    noise_fraction: float = 0.2
    loss_weight: float = 0.0
    loss_ramp_epochs: int = 3
    probe_every: int = 0
    max_prune_prob: float = 0.5
    delta: float = 1.0

    def __post_init__(self):
        _check_unit("noise_fraction", self.noise_fraction, closed=False)
        _check_unit("loss_weight", self.loss_weight, closed=True)
        _check_unit("delta", self.delta, closed=True)
        _check_unit("max_prune_prob", self.max_prune_prob, closed=False)
        if self.loss_ramp_epochs < 0 or self.probe_every < 0:
            raise ValueError("loss_ramp_epochs and probe_every must be >= 0")
        if self.probe_every and not self.loss_weight:
            raise ValueError("probe_every needs loss_weight > 0: a probe shows an excluded sample's loss, which "
                             "only a noise score with the loss mixed in can act on")

    def mark_noise(self, cluster, ctx: PlanContext) -> int:
        """Sets each partition's ``scratch["noisy"]``; returns how many were excluded."""
        ramp = 1.0 if self.loss_ramp_epochs == 0 else min(1.0, ctx.epoch / self.loss_ramp_epochs)
        lam = float(np.float32(self.loss_weight * ramp))
        tables = steps.loss_rank_tables(cluster) if lam > 0 else None
        cluster.map(steps.noise_candidates, lam, tables)
        count = noise_count(self.noise_fraction, ctx.num_samples)
        select_smallest(cluster, [count])
        cluster.map(steps.chosen_is_noisy)
        return count

    def plan(self, cluster, ctx):
        noise = self.mark_noise(cluster, ctx)
        if is_annealing(ctx.epoch, ctx.epochs, self.delta):
            cluster.map(steps.keep_eligible)
            return steps.emit(cluster, [0.0, 1.0], {LOW_CONSISTENCY: noise})
        cluster.map(steps.mark_eligible, True)
        steps.below_mean(cluster)
        if self.probe_every and ctx.epoch >= 1:
            cluster.map(steps.mark_probes, ctx.epoch, self.probe_every)
        eligible = ctx.num_samples - noise
        pruned = max(0, eligible - ctx.target)
        return prune_well_learned(cluster, ctx, pruned, self.max_prune_prob, noise)


def noise_count(noise_fraction: float, num_samples: int) -> int:
    """``round(noise_fraction * n)``, leaving at least one sample."""
    return min(num_samples - 1, int(math.floor(noise_fraction * num_samples + 0.5)))


def _check_unit(name: str, value: float, closed: bool) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
