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
    das     float32 alignment of the loss trajectory with the reference's (trajectory)

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


def reference_sums(part) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per history slot: its epoch here, how many reference samples have a loss, and the exact sums of those losses."""
    h = part.history[part.reference].astype(np.float32)
    window = part.history.shape[1]
    valid = ~np.isnan(h)
    slots = np.broadcast_to(np.arange(window), h.shape)[valid]
    return part.slot_epoch.copy(), valid.sum(axis=0).astype(np.int64), exact_sums(h[valid], slots, window)


def alignment(part, ref_mean: np.ndarray, ref_epoch: np.ndarray, min_points: int) -> tuple[int, np.ndarray]:
    """scratch["das"]: each sample's Pearson correlation of its loss trajectory with ``ref_mean``.

    Over the epochs of the window where both have a loss (a slot counts where
    this partition's epoch in it is ``ref_epoch``'s: a partition that got no
    loss in an epoch still holds an older one there); NaN with fewer than
    ``min_points`` such epochs, or a flat trajectory. Returns the count and
    exact sum of the defined scores (for their mean).
    """
    ref = np.asarray(ref_mean, dtype=np.float32)
    ref_ok = ~np.isnan(ref) & (part.slot_epoch == ref_epoch)
    das = np.full(part.n, np.nan, dtype=np.float32)
    count, sums = 0, exact_sums(np.zeros(0, np.float32))
    for sl in chunks(part.n):
        h = part.history[sl].astype(np.float32)
        valid = ~np.isnan(h) & ref_ok
        m = valid.sum(axis=1)
        h = np.where(valid, h, np.float32(0.0))
        r = np.where(valid, ref, np.float32(0.0))
        safe = np.maximum(m, 1).astype(np.float32)
        dh = np.where(valid, h - (_row_sums(h) / safe)[:, None], np.float32(0.0))
        dr = np.where(valid, r - (_row_sums(r) / safe)[:, None], np.float32(0.0))
        denom = np.sqrt(_row_sums(dh * dh) * _row_sums(dr * dr))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = _row_sums(dh * dr) / denom
        corr[(m < min_points) | ~(denom > 0)] = np.nan
        das[sl] = corr
        ok = ~np.isnan(corr)
        count += int(np.count_nonzero(ok))
        sums += exact_sums(corr[ok])
    part.scratch["das"] = das
    return count, sums


def _row_sums(x: np.ndarray) -> np.ndarray:
    """Row sums added column by column: each row's float32 result depends on that row alone (not the chunk shape)."""
    out = np.zeros(len(x), dtype=np.float32)
    for j in range(x.shape[1]):
        out += x[:, j]
    return out


def misaligned_candidates(part, mean: float) -> int:
    """key = alignment, lowest first; group 1 = below ``mean`` and not a reference sample. Returns the count."""
    das = part.scratch.pop("das")
    below = das < np.float32(mean)  # NaN compares False: no trajectory yet, not a candidate
    below[part.reference] = False
    part.scratch["key"] = sortable(np.where(np.isnan(das), np.float32(np.inf), das))
    part.scratch["group"] = below.view(np.uint8)
    return int(np.count_nonzero(below))


def keep_unchosen(part) -> None:
    """Flips a selection of samples to prune into the plan: chosen := not chosen, all in group 1."""
    part.scratch["chosen"] = ~part.scratch.pop("chosen")
    part.scratch["group"] = np.ones(part.n, dtype=np.uint8)


def protect_reference(part) -> None:
    """Reference samples are never pruned (group 1, hard): their losses are every epoch's reference."""
    part.scratch["group"][part.reference] = 1


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


def reference_trajectory(cluster) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [W] the reference samples' mean loss in each history slot, NaN where none; int64 [W] the
    slot's epoch, the latest any partition holds there, -1 for none)."""
    parts = cluster.map(reference_sums)
    epochs = np.max([p[0] for p in parts], axis=0)
    counts = np.zeros(len(epochs), dtype=np.int64)
    sums = np.zeros_like(parts[0][2])
    for slot_epoch, c, s in parts:  # a partition's slot counts only where it holds the latest epoch
        ok = slot_epoch == epochs
        counts += np.where(ok, c, 0)
        sums[ok] += s[ok]
    mean = np.array([float(exact_total(sums[j]) / int(c)) if c and epochs[j] >= 0 else np.nan
                     for j, c in enumerate(counts.tolist())], dtype=np.float32)
    return mean, epochs


def alignment_mean(cluster, min_points: int) -> tuple[int, float | None]:
    """Sets every partition's ``scratch["das"]``; (how many samples have one, their exact mean)."""
    ref_mean, ref_epoch = reference_trajectory(cluster)
    parts = cluster.map(alignment, ref_mean, ref_epoch, min_points)
    count = sum(p[0] for p in parts)
    return count, (float(exact_total(np.sum([p[1] for p in parts], axis=0)[0]) / count) if count else None)


def plan_everything(cluster) -> tuple[np.ndarray, np.ndarray, dict]:
    """The plan that keeps every sample with weight 1 (nothing pruned)."""
    cluster.map(keep_all)
    return emit(cluster, [0.0, 1.0], {})


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
