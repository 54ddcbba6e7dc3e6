"""Pruning policies: which samples an epoch trains on, and with what weight.

A policy is a small frozen dataclass holding its knobs, with one method that
matters::

    kept, weights = policy.select(state, epoch, rng)

``state`` is a read-only :class:`PlanState` view of the pruner's per-sample
arrays, ``rng`` is ``np.random.default_rng([seed, epoch])`` (made by the
pruner), so a plan is a pure function of (state, epoch, seed). ``kept`` is a
sorted int64 array of sample indices, ``weights`` a float32 array of the same
length that multiplies each kept sample's loss. ``policy.kept_count(...)``
says how many samples an epoch keeps before any loss is seen, so a trainer
can size its learning-rate schedule by real steps.

Policies are registered by name in :data:`POLICIES` (``full``, ``random``,
``infobatch``, ``clip_filter``, ``mmdp``); :func:`make_policy` builds one.

**Exact keep ratio with unbiased weights.** InfoBatch prunes each
well-learned sample (loss below the mean) with a fixed probability ``p``, so
the kept count floats. Here the count is fixed at ``k = round(keep_ratio*n)``
and the pruning probability follows from it: the eligible samples are split
into a *hard* stratum (loss at or above the mean, or no loss seen yet) and a
*well-learned* stratum, each stratum keeps an exact number of samples chosen
uniformly without replacement (:func:`soft_prune`), and a survivor of a
stratum of size ``N`` that keeps ``K`` gets weight ``N / K`` (``1/(1-p)`` with
``p = 1 - K/N``). Every sample of a stratum is kept with probability ``K/N``,
so ``E[sum_kept w_i * loss_i] == sum_eligible loss_i`` exactly, whatever the
rounding. Hard samples are kept whole when the budget allows; the
well-learned stratum's pruning probability is capped at ``max_prune_prob``
(bounding weights at ``1/(1 - max_prune_prob)``), and when even that does not
fit, the hard stratum is subsampled too (:func:`allocate`).

No Ray here: this is plain NumPy, testable on its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class PlanState:
    """What a policy may read: the pruner's per-sample state (do not modify).

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
    """
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.float32)
    ranks[order] = (np.arange(len(scores), dtype=np.float64) + 0.5) / max(len(scores), 1)
    return ranks


def approx_rank(values: np.ndarray, mask: np.ndarray, bins: int = 1 << 16) -> np.ndarray:
    """Rank of each masked value among the masked values, in (0, 1).

    Entries outside ``mask`` get 0. A full argsort of 10M floats takes about
    1.5 s on one core, over the plan budget, so ranks come from a 65,536-bin
    histogram (of ``arcsinh`` of the values, so a few huge losses do not
    squash the rest into one bin). Values sharing a bin share its mid-rank;
    for n up to ~10^5 that is nearly exact.
    """
    count = int(np.count_nonzero(mask))
    if count == 0:
        return np.zeros(len(values), dtype=np.float32)
    t = np.arcsinh(np.asarray(values, dtype=np.float32))
    lo = float(np.where(mask, t, np.inf).min())
    hi = float(np.where(mask, t, -np.inf).max())
    if not hi > lo:
        return np.where(mask, np.float32(0.5), np.float32(0.0))
    b = ((t - np.float32(lo)) * np.float32((bins - 1) / (hi - lo))).astype(np.intp)
    np.clip(b, 0, bins - 1, out=b)  # float rounding at the top end
    np.putmask(b, ~mask, bins)  # an extra bin for unmasked entries, ranked 0
    counts = np.bincount(b, minlength=bins + 1)[:bins]
    mid = np.zeros(bins + 1, dtype=np.float32)
    mid[:bins] = (np.cumsum(counts) - counts / 2.0) / count
    return mid[b]


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


def soft_prune(hard: np.ndarray, well: np.ndarray, k: int, max_prune_prob: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Keep exactly k samples of the disjoint masks ``hard`` and ``well``.

    Each stratum keeps a uniform random subset of the size :func:`allocate`
    gives; survivors weigh ``stratum size / kept from it``, so the weighted
    loss sum is an unbiased estimate of the sum over both strata.
    """
    n_hard, n_well = int(np.count_nonzero(hard)), int(np.count_nonzero(well))
    keep_hard, keep_well = allocate(n_hard, n_well, k, max_prune_prob)
    keys = rng.random(len(hard))  # one draw per sample: same (seed, epoch), same plan
    parts = []
    for mask, size, keep in ((hard, n_hard, keep_hard), (well, n_well, keep_well)):
        if keep > 0:
            parts.append((_sample(mask, keep, keys), size / keep))
    return _assemble(parts)


def _sample(mask: np.ndarray, count: int, keys: np.ndarray) -> np.ndarray:
    """Mask of the ``count`` members of ``mask`` with the smallest ``keys``.

    With uniform keys that is a uniform random subset. Rather than partially
    sorting the whole stratum, members whose key is clearly below the
    ``count/size`` quantile are taken outright and only a narrow band around
    it (+-6 sigma of the binomial count) is partitioned: a few elementwise
    passes instead of an O(n) argpartition with random memory access.
    """
    size = int(np.count_nonzero(mask))
    if count >= size:
        return mask.copy()
    chosen = np.zeros(len(mask), dtype=bool)
    if count <= 0:
        return chosen
    p = count / size
    margin = (6.0 * math.sqrt(size * p * (1.0 - p)) + 1.0) / size
    lo, hi = p - margin, p + margin
    np.logical_and(mask, keys < lo, out=chosen)
    band = np.flatnonzero(mask & (keys >= lo) & (keys < hi))
    need = count - int(np.count_nonzero(chosen))
    if not 0 <= need <= len(band):  # a 6-sigma miss: do it the slow, exact way
        band, need = np.flatnonzero(mask), count
        chosen[:] = False
    if need > 0:
        chosen[band[np.argpartition(keys[band], need - 1)[:need]]] = True
    return chosen


def _assemble(parts: list[tuple[np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (mask, weight) parts -> sorted kept indices and their weights.

    Building a dense weight array and reading back its non-zeros sorts the
    indices in O(n), cheaper than sorting them.
    """
    dense = np.zeros(len(parts[0][0]), dtype=np.float32)
    for mask, weight in parts:
        np.putmask(dense, mask, np.float32(weight))
    kept = np.flatnonzero(dense).astype(np.int64, copy=False)
    return kept, dense[kept]


def _everything(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.int64), np.ones(n, dtype=np.float32)


class Policy:
    """Base of the registered policies: ``select`` and ``kept_count``."""

    name: ClassVar[str] = ""
    needs_consistency: ClassVar[bool] = False

    def select(self, state: PlanState, epoch: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Returns (kept indices sorted int64, weights float32) for ``epoch``."""
        raise NotImplementedError

    def kept_count(self, num_samples: int, keep_ratio: float, epochs: int, epoch: int) -> int:
        """How many samples ``select`` keeps at ``epoch``, known before training."""
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

    def select(self, state, epoch, rng):
        return _everything(state.num_samples)

    def kept_count(self, num_samples, keep_ratio, epochs, epoch):
        return num_samples


@register
@dataclass(frozen=True)
class Random(Policy):
    """A new uniform random subset of ``round(keep_ratio*n)`` samples each epoch, weight 1."""

    name: ClassVar[str] = "random"

    def select(self, state, epoch, rng):
        n = state.num_samples
        keys = rng.random(n)
        return _assemble([(_sample(np.ones(n, dtype=bool), state.target, keys), 1.0)])


@register
@dataclass(frozen=True)
class ClipFilter(Policy):
    """Static: the top ``keep_ratio`` fraction by consistency, every epoch, weight 1.

    The DataComp CLIP-score baseline. Ranks are distinct, so "top k" is exact.
    """

    name: ClassVar[str] = "clip_filter"
    needs_consistency: ClassVar[bool] = True

    def select(self, state, epoch, rng):
        n, k = state.num_samples, state.target
        top = np.zeros(n, dtype=bool)
        top[np.argpartition(state.consistency, n - k)[n - k:]] = True
        return _assemble([(top, 1.0)])


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

    def select(self, state, epoch, rng):
        if is_annealing(epoch, state.epochs, self.delta):
            return _everything(state.num_samples)
        well = _below_mean(state.loss, state.seen)
        return soft_prune(~well, well, state.target, self.max_prune_prob, rng)

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
       similar consistency (:func:`_expected_rank`), so a clean sample
       wrongly dropped at epoch 0 can come back when consistency turns out
       to say little about loss.
    2. The ``noise_count`` samples with the highest ``s`` are dropped; the
       rest are *eligible*. ``noise_count = min(round(noise_fraction*n),
       n - k)`` is fixed, so kept counts are known in advance.
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

    def noisy(self, state: PlanState, epoch: int) -> np.ndarray:
        """Boolean mask of the samples dropped as likely noise at ``epoch``."""
        n = state.num_samples
        score = np.float32(1.0) - state.consistency
        ramp = 1.0 if self.loss_ramp_epochs == 0 else min(1.0, epoch / self.loss_ramp_epochs)
        lam = np.float32(self.loss_weight * ramp)
        if lam > 0 and state.seen.any():
            loss_rank = approx_rank(state.loss, state.seen)
            guess = _expected_rank(state.consistency, state.seen, loss_rank)
            loss_rank = np.where(state.seen, loss_rank, guess)
            score = (np.float32(1.0) - lam) * score + lam * loss_rank
        drop = self.noise_count(n, state.keep_ratio)
        mask = np.zeros(n, dtype=bool)
        if drop > 0:
            mask[np.argpartition(score, n - drop)[n - drop:]] = True
        return mask

    def select(self, state, epoch, rng):
        if state.consistency is None:
            raise ValueError("policy 'mmdp' needs consistency scores")
        eligible = ~self.noisy(state, epoch)
        if is_annealing(epoch, state.epochs, self.delta):
            return _assemble([(eligible, 1.0)])
        well = _below_mean(state.loss, state.seen & eligible)
        return soft_prune(eligible & ~well, well, state.target, self.max_prune_prob, rng)

    def kept_count(self, num_samples, keep_ratio, epochs, epoch):
        if is_annealing(epoch, epochs, self.delta):
            return num_samples - self.noise_count(num_samples, keep_ratio)
        return target_count(num_samples, keep_ratio)


def _expected_rank(consistency: np.ndarray, seen: np.ndarray, loss_rank: np.ndarray,
                   bins: int = 32, min_count: int = 5) -> np.ndarray:
    """For each sample, the mean loss rank of seen samples of similar consistency.

    Stands in for the loss of samples never trained on (most of them were
    dropped as noise at epoch 0). Where consistency says little about loss
    this is about 0.5, so such samples drift back into training and get
    measured; where it says a lot they stay out. Consistency bins without
    seen samples take the nearest populated bin's value.
    """
    b = np.minimum((consistency * bins).astype(np.intp), bins - 1)
    b_seen = np.where(seen, b, bins)  # unseen samples go to an ignored extra bin
    counts = np.bincount(b_seen, minlength=bins + 1)[:bins]
    sums = np.bincount(b_seen, weights=loss_rank, minlength=bins + 1)[:bins]
    ok = counts >= min_count
    if not ok.any():
        return np.full(len(consistency), np.float32(0.5))
    centers = np.arange(bins)
    per_bin = np.interp(centers, centers[ok], sums[ok] / counts[ok]).astype(np.float32)
    return per_bin[b]


def _below_mean(loss: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Mask of the ``among`` samples whose loss is below their mean loss."""
    count = int(np.count_nonzero(among))
    if count == 0:
        return np.zeros(len(loss), dtype=bool)
    mean = loss.sum(where=among, dtype=np.float64) / count
    return among & (loss < mean)


def _check_unit(name: str, value: float, closed: bool) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
