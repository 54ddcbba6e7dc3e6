"""The steps policies plan with: partition-side functions and their exact reductions.

Each lowercase function taking ``part`` first runs inside one partition (in
this process, or in a partition actor by :mod:`pipeline.prune.remote`) on
that partition's state and its plan ``scratch``; the others run on the
coordinator and combine per-partition results with ``cluster.map``. Scratch
keys a plan uses:

    seen    bool   a loss has arrived (set by begin_plan)
    lbin    uint16 the sample's bin of the loss histogram (mmdp)
    noisy   bool   dropped as likely noise (mmdp)
    key     uint32 selection key, smallest first
    group   uint8  0 = excluded, 1 = hard / candidate, 2 = well-learned
    chosen  bool   kept

Everything elementwise runs in chunks (:data:`pipeline.prune.selection.CHUNK`),
so a plan's temporaries are these few bytes a sample plus the output.

No Ray here.
"""
from __future__ import annotations

import numpy as np

from pipeline.prune.selection import chunks, exact_sums, exact_total, random_keys, sortable

BINS = 1 << 16  # loss histogram bins; bin numbers fit a uint16
CONSISTENCY_BINS = 32  # consistency bins of the expected loss rank of unseen samples
MIN_BIN_COUNT = 5  # seen samples a consistency bin needs to count


# ---- array helpers ----------------------------------------------------------

def asinh_range(values: np.ndarray, mask: np.ndarray) -> tuple[int, float, float]:
    """(count, arcsinh(min), arcsinh(max)) of ``values`` over ``mask`` (float32 arcsinh).

    arcsinh is monotonic, so only the two extremes are transformed.
    """
    count, lo, hi = 0, np.inf, -np.inf
    for sl in chunks(len(values)):
        v = values[sl][mask[sl]]
        if len(v):
            count += len(v)
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if not count:
        return 0, lo, hi
    return count, float(np.arcsinh(np.float32(lo))), float(np.arcsinh(np.float32(hi)))


def asinh_bins(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Each value's uint16 bin of ``arcsinh`` over [lo, hi] in :data:`BINS` bins (all 0 when hi <= lo)."""
    out = np.empty(len(values), dtype=np.uint16)
    scale = np.float32((BINS - 1) / (hi - lo)) if hi > lo else np.float32(0.0)
    for sl in chunks(len(values)):
        b = ((np.arcsinh(values[sl]) - np.float32(lo)) * scale).astype(np.intp)
        np.clip(b, 0, BINS - 1, out=b)  # float rounding at the top end
        out[sl] = b
    return out


def mid_ranks(counts: np.ndarray, total: int) -> np.ndarray:
    """float32 mid-rank in (0, 1) of each histogram bin."""
    return ((np.cumsum(counts) - counts / 2.0) / total).astype(np.float32)


def consistency_bins(c: np.ndarray | None) -> np.ndarray | None:
    """uint8 bin of each consistency rank (``CONSISTENCY_BINS`` equal-width bins of (0, 1))."""
    if c is None:
        return None
    out = np.empty(len(c), dtype=np.uint8)
    for sl in chunks(len(c)):
        out[sl] = np.minimum((c[sl] * CONSISTENCY_BINS).astype(np.intp), CONSISTENCY_BINS - 1)
    return out


# ---- partition steps --------------------------------------------------------

def loss_range(part):
    return asinh_range(part.loss, part.scratch["seen"])


def loss_hist(part, lo: float, hi: float) -> np.ndarray:
    seen = part.scratch["seen"]
    part.scratch["lbin"] = lbin = asinh_bins(part.loss, lo, hi)
    hist = np.zeros(BINS, dtype=np.int64)
    for sl in chunks(part.n):
        hist += np.bincount(lbin[sl][seen[sl]], minlength=BINS)
    return hist


def rank_sums(part, numerators: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per consistency bin: how many seen samples, and the sum of their loss-rank numerators.

    A bin's mid-rank is ``numerators[bin] / (2 * count)`` with an integer
    numerator (``2 * cumsum - counts``), so sums of numerators are exact
    integers: a chunk's float64 sum stays below 2**53 while
    ``CHUNK * 2 * count < 2**53`` (count < 2**32 samples).
    """
    seen, lbin = part.scratch["seen"], part.scratch["lbin"]
    counts = np.zeros(CONSISTENCY_BINS + 1, dtype=np.int64)
    sums = np.zeros(CONSISTENCY_BINS + 1, dtype=np.int64)
    for sl in chunks(part.n):
        cb = np.where(seen[sl], part.cbin[sl], np.uint8(CONSISTENCY_BINS))  # unseen: an ignored bin
        counts += np.bincount(cb, minlength=CONSISTENCY_BINS + 1)
        sums += np.bincount(cb, weights=numerators[lbin[sl]], minlength=CONSISTENCY_BINS + 1).astype(np.int64)
    return counts[:-1], sums[:-1]


def noise_candidates(part, lam: float, tables) -> None:
    """key = the noise score, highest first; every sample a candidate."""
    seen, c = part.scratch["seen"], part.consistency
    key = np.empty(part.n, dtype=np.uint32)
    lam32 = np.float32(lam)
    for sl in chunks(part.n):
        score = np.float32(1.0) - c[sl]
        if tables is not None:
            mid, per_bin = tables
            guess = per_bin[part.cbin[sl]]
            loss_rank = np.where(seen[sl], mid[part.scratch["lbin"][sl]], guess)
            score = (np.float32(1.0) - lam32) * score + lam32 * loss_rank
        key[sl] = sortable(score, descending=True)
    part.scratch.pop("lbin", None)
    part.scratch["key"], part.scratch["group"] = key, np.ones(part.n, dtype=np.uint8)


def chosen_is_noisy(part) -> None:
    part.scratch["noisy"] = part.scratch.pop("chosen")


def mark_eligible(part, exclude_noisy: bool) -> None:
    """group := 1 for eligible samples (all, or all but the noisy), 0 else."""
    if exclude_noisy:
        part.scratch["group"] = (~part.scratch["noisy"]).view(np.uint8)
    else:
        part.scratch["group"] = np.ones(part.n, dtype=np.uint8)


def loss_sums(part) -> tuple[int, np.ndarray]:
    """Count and exact loss sum of the seen eligible samples."""
    seen, group = part.scratch["seen"], part.scratch["group"]
    count, sums = 0, exact_sums(np.zeros(0, np.float32))
    for sl in chunks(part.n):
        among = seen[sl] & (group[sl] > 0)
        count += int(np.count_nonzero(among))
        sums += exact_sums(part.loss[sl][among])
    return count, sums


def mark_well(part, mean: float | None) -> None:
    """group 2 for seen eligible samples with loss below ``mean`` (float64 comparison)."""
    if mean is None:
        return
    seen, group = part.scratch["seen"], part.scratch["group"]
    m = np.float64(mean)
    for sl in chunks(part.n):
        well = seen[sl] & (group[sl] > 0) & (part.loss[sl] < m)
        group[sl][well] = 2


def strata(part, salt: int) -> list[int]:
    """Random keys for the eligible samples; [hard, well-learned, probe] counts."""
    part.scratch["key"] = _random_key_array(part, salt)
    group = part.scratch["group"]
    return [int(np.count_nonzero(group == g)) for g in (1, 2, 3)]


def mark_probes(part, epoch: int, every: int) -> None:
    """group 3 for the noisy samples probed this epoch: each one every ``every``
    epochs, a fixed rotation by global index (``index % every == epoch % every``)."""
    noisy, group = part.scratch["noisy"], part.scratch["group"]
    phase = (part.start + np.arange(part.n, dtype=np.int64)) % every == epoch % every
    group[noisy & phase] = 3


def random_candidates(part, salt: int) -> None:
    part.scratch["key"] = _random_key_array(part, salt)
    part.scratch["group"] = np.ones(part.n, dtype=np.uint8)


def consistency_candidates(part) -> None:
    key = np.empty(part.n, dtype=np.uint32)
    for sl in chunks(part.n):
        key[sl] = sortable(part.consistency[sl], descending=True)
    part.scratch["key"], part.scratch["group"] = key, np.ones(part.n, dtype=np.uint8)


def keep_all(part) -> None:
    part.scratch["group"] = np.ones(part.n, dtype=np.uint8)
    part.scratch["chosen"] = np.ones(part.n, dtype=bool)


def keep_eligible(part) -> None:
    noisy = part.scratch.pop("noisy")
    part.scratch["chosen"] = ~noisy
    part.scratch["group"] = part.scratch["chosen"].astype(np.uint8)  # a copy: emit_part flips chosen


def emit_part(part, weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(global kept indices, their weights: ``weights[group]``) of this partition."""
    chosen, group = part.scratch.pop("chosen"), part.scratch.pop("group")
    part.scratch.pop("key", None)
    kept = np.flatnonzero(chosen)
    if len(set(weights[1:])) == 1:  # one weight for every kept sample: no gather
        w = np.full(len(kept), weights[1], dtype=np.float32)
    else:
        w = np.asarray(weights, dtype=np.float32)[group[kept]]
    if part.start:
        kept += part.start
    return kept.astype(np.int64, copy=False), w


def _random_key_array(part, salt: int) -> np.ndarray:
    key = np.empty(part.n, dtype=np.uint32)
    for sl in chunks(part.n):
        key[sl] = random_keys(salt, part.start + sl.start, part.start + sl.stop)
    return key


# ---- coordinator side -------------------------------------------------------

def loss_rank_tables(cluster):
    """(mid rank per loss bin, expected loss rank per consistency bin), or None before any loss.

    Every partition keeps ``scratch["lbin"]`` for :func:`noise_candidates`.
    """
    ranges = [r for r in cluster.map(loss_range) if r[0] > 0]
    if not ranges:
        return None
    count = sum(r[0] for r in ranges)
    lo, hi = min(r[1] for r in ranges), max(r[2] for r in ranges)
    hist = np.sum(cluster.map(loss_hist, lo, hi), axis=0)
    mid = mid_ranks(hist, count)
    numerators = 2 * np.cumsum(hist) - hist
    parts = cluster.map(rank_sums, numerators)
    counts = np.sum([p[0] for p in parts], axis=0)
    sums = np.sum([p[1] for p in parts], axis=0)
    ok = counts >= MIN_BIN_COUNT
    if not ok.any():
        return mid, np.full(CONSISTENCY_BINS, np.float32(0.5))
    means = sums[ok] / (2.0 * count * counts[ok])  # float64 of exact integers: layout-free
    centers = np.arange(CONSISTENCY_BINS)
    per_bin = np.interp(centers, centers[ok], means).astype(np.float32)
    return mid, per_bin


def below_mean(cluster) -> None:
    """Marks well-learned (group 2): seen eligible samples below the eligible seen mean."""
    parts = cluster.map(loss_sums)
    count = sum(p[0] for p in parts)
    mean = float(exact_total(np.sum([p[1] for p in parts], axis=0)[0]) / count) if count else None
    cluster.map(mark_well, mean)


def emit(cluster, weights: list[float], pruned_by_reason: dict[str, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Gathers the kept indices and weights (``weights[group]``) from the partitions in index order.

    ``pruned_by_reason`` is passed through: the coordinator knows the counts
    already (group sizes minus what each keeps); the pruner checks they sum
    to n - kept.
    """
    parts = cluster.map(emit_part, weights)
    if len(parts) == 1:
        kept, w = parts[0]
    else:
        kept, w = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return kept, w, dict(pruned_by_reason)
