"""Exact, layout-independent global selections over index-range partitions.

A plan must not depend on how the per-sample state is split across pruning
actors: one pruner and three pruners holding the same state must keep the
same samples with the same weights. The building blocks here make that true
by construction, because every global quantity is an *exact* function of
per-partition summaries that add up the same whatever the split:

- :func:`random_keys`: a sample's random draw is a hash of (salt, global
  index), not the next number of a generator that walks the array;
- :func:`select_smallest`: "the k members with the smallest keys, ties to
  the lower index" by a radix select over per-partition 16-bit histograms
  (integer counts add exactly), three rounds, no gather of the keys;
- :func:`exact_sums` / :func:`exact_total`: sums of float32 values split by
  binary exponent into integer mantissa sums, so the total (and a mean) is
  exact and does not depend on summation order.

A "cluster" is anything with ``map(fn, *args) -> [fn(part, *args) per
partition in index order]`` and ``map_each(fn, args_per_part)``; a partition
has ``start`` (its first global index), ``n``, and a ``scratch`` dict for one
plan's temporaries. :mod:`pipeline.prune.partitions` has the local cluster;
the Ray one in :mod:`pipeline.prune.remote` runs the same functions inside
partition actors.

No Ray here.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np

# Elementwise passes work on chunks of this many samples, so temporaries stay
# a few MB (not n-sized) and cache-resident.
CHUNK = 1 << 20
RADIX = 1 << 16
MASK64 = (1 << 64) - 1
# frexp exponents of finite float32 values (subnormals included) lie in
# [-148, 128]; offset so they index [2, 278].
_EXP_OFFSET, _EXP_SLOTS = 150, 280


def chunks(n: int):
    """Slices covering range(n) in CHUNK-sized pieces."""
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def mix64(*values: int) -> int:
    """A 64-bit salt from integers (splitmix64 steps), e.g. ``mix64(seed, epoch)``."""
    z = 0x243F6A8885A308D3
    for v in values:
        z = (z ^ (int(v) & MASK64)) & MASK64
        z = (z + 0x9E3779B97F4A7C15) & MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
    return z


def random_keys(salt: int, start: int, stop: int) -> np.ndarray:
    """uint32 uniform keys of the global indices [start, stop): splitmix64 of (salt, index).

    A pure function of the global index, so a partition computes its own
    keys and gets the same numbers as one pruner holding everything.
    """
    with np.errstate(over="ignore"):
        z = np.arange(start, stop, dtype=np.uint64)
        z *= np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64(salt & MASK64)
    return (splitmix64_finalize(z) >> np.uint64(32)).astype(np.uint32)


def splitmix64_finalize(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function over a uint64 array (wrapping), in place: every output bit
    depends on every input bit. :func:`random_keys` and the training stages' per-row draws use it."""
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def sortable(values: np.ndarray, descending: bool = False) -> np.ndarray:
    """float32 -> uint32 with the same order (or reversed), for radix selection."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    out = np.where(u >= np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))
    return ~out if descending else out


# ---- exact sums -------------------------------------------------------------

def exact_sums(values: np.ndarray, groups: np.ndarray | None = None, ngroups: int = 1) -> np.ndarray:
    """Per-group sums of float32 ``values``, exact, as integer-valued float64 [ngroups, 280].

    Each value is ``m * 2**(e-24)`` with an integer ``|m| < 2**24``; the
    mantissas are summed per (group, exponent) in float64, exact while a
    slot's total stays below 2**53 (up to ~5e8 samples a partition). Adding
    two such arrays is exact too, so partitions' results combine in any order.
    """
    out = np.zeros(ngroups * _EXP_SLOTS, dtype=np.float64)
    for sl in chunks(len(values)):
        mant, exp = np.frexp(np.asarray(values[sl], dtype=np.float32))
        slot = exp.astype(np.intp) + _EXP_OFFSET
        if groups is not None:
            slot += groups[sl].astype(np.intp) * _EXP_SLOTS
        out += np.bincount(slot, weights=mant.astype(np.float64) * float(1 << 24),
                           minlength=ngroups * _EXP_SLOTS)
    return out.reshape(ngroups, _EXP_SLOTS)


def exact_total(sums: np.ndarray) -> Fraction:
    """The exact value of one group's row of :func:`exact_sums`."""
    total = 0
    for slot in np.flatnonzero(sums):
        total += int(sums[slot]) << int(slot)  # m * 2**(slot - 150 - 24), scaled by 2**174
    return Fraction(total, 1 << (_EXP_OFFSET + 24))


# ---- radix selection ----------------------------------------------------------
# Partition scratch keys read by the steps: "key" (uint32 [n]) and "group" (uint8
# [n], 0 = not a candidate, g = a member of group g). Written: "chosen" (bool [n]).

def _hist_hi(part, ngroups: int) -> np.ndarray:
    key, group = part.scratch["key"], part.scratch["group"]
    hist = np.zeros((ngroups + 1) * RADIX, dtype=np.int64)
    for sl in chunks(part.n):
        slot = (key[sl] >> 16).astype(np.intp)
        slot += group[sl].astype(np.intp) << 16  # group 0 (not a candidate) fills a row ignored below
        hist += np.bincount(slot, minlength=(ngroups + 1) * RADIX)
    return hist.reshape(ngroups + 1, RADIX)[1:]


def _hist_lo(part, buckets: list[int]) -> np.ndarray:
    """Low-16-bit histograms of each group's members in its chosen high bucket."""
    key, group = part.scratch["key"], part.scratch["group"]
    hist = np.zeros((len(buckets), RADIX), dtype=np.int64)
    for sl in chunks(part.n):
        k, g = key[sl], group[sl]
        hi = k >> 16
        for i, bucket in enumerate(buckets):
            if 0 <= bucket < RADIX:
                hist[i] += np.bincount(k[(g == i + 1) & (hi == bucket)] & 0xFFFF, minlength=RADIX)
    return hist


def _choose(part, thresholds: list[int], quotas: list[int]) -> int:
    """chosen = members with key < threshold, plus the first ``quota`` equal to it (by index)."""
    key, group = part.scratch["key"], part.scratch["group"]
    chosen = np.zeros(part.n, dtype=bool)
    left = list(quotas)
    for sl in chunks(part.n):
        k, g = key[sl], group[sl]
        for i, t in enumerate(thresholds):
            member = g == i + 1
            if t >= 1 << 32:
                chosen[sl] |= member
                continue
            if t < 0:  # none of the group (a threshold of 0 still takes its quota of keys equal to 0)
                continue
            chosen[sl] |= member & (k < np.uint32(t))
            if left[i] > 0:
                ties = np.flatnonzero(member & (k == np.uint32(t)))[:left[i]]
                chosen[sl][ties] = True
                left[i] -= len(ties)
    part.scratch["chosen"] = chosen
    return int(np.count_nonzero(chosen))


def select_smallest(cluster, counts: list[int]) -> None:
    """In every partition, ``scratch["chosen"]`` := per group g, the ``counts[g-1]``
    members with the smallest keys over all partitions, ties to the lower global index.

    Partitions must already hold ``scratch["key"]`` and ``scratch["group"]``.
    Exact and independent of the partition layout: the threshold comes from
    integer histograms, and ties are handed out to partitions in index order.
    """
    g_count = len(counts)
    per_part_hi = cluster.map(_hist_hi, g_count)
    hi = np.sum(per_part_hi, axis=0)
    totals = hi.sum(axis=1)
    buckets, below = [], []
    for g, k in enumerate(counts):
        if k <= 0 or k >= totals[g]:
            buckets.append(-1), below.append(0)
            continue
        cum = np.cumsum(hi[g])
        b = int(np.searchsorted(cum, k))  # first bucket where the running count reaches k
        buckets.append(b)
        below.append(int(cum[b] - hi[g][b]))
    per_part_lo = cluster.map(_hist_lo, buckets) if any(b >= 0 for b in buckets) else None
    thresholds, part_quotas = [], [[0] * g_count for _ in range(len(per_part_hi))]
    for g, k in enumerate(counts):
        if buckets[g] < 0:
            thresholds.append(-1 if k <= 0 else 1 << 32)
            continue
        lo_per_part = np.stack([p[g] for p in per_part_lo])
        cum = np.cumsum(lo_per_part.sum(axis=0))
        need = k - below[g]
        low = int(np.searchsorted(cum, need))
        thresholds.append((buckets[g] << 16) | low)
        ties = need - int(cum[low] - lo_per_part[:, low].sum())
        for p, available in enumerate(lo_per_part[:, low].tolist()):
            take = min(ties, int(available))
            part_quotas[p][g] = take
            ties -= take
    cluster.map_each(_choose, [(thresholds, q) for q in part_quotas])
