"""What the pruning actor remembers of the plans it made, for metrics and the run's records.

A :class:`PlanLog` keeps, per planned epoch, the kept set as a bitmap (n/8
bytes), the weights' mean, max and sum, and the pruned-by-reason counts;
:meth:`PlanLog.entries` turns them into JSON-safe rows.

No Ray here.
"""
from __future__ import annotations

import hashlib

import numpy as np


class PlanLog:
    """Per-epoch records of the plans over ``num_samples`` samples."""

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)
        self._records: dict[int, tuple[np.ndarray, dict, dict]] = {}

    def __contains__(self, epoch: int) -> bool:
        return int(epoch) in self._records

    def record(self, epoch: int, kept: np.ndarray, weights: np.ndarray, pruned_by_reason: dict) -> None:
        """Remembers ``epoch``'s plan (replacing an earlier record of it)."""
        mask = np.zeros(self.num_samples, dtype=bool)
        mask[kept] = True
        self._records[int(epoch)] = (np.packbits(mask), _weight_stats(weights), pruned_by_reason)

    def weight_stats(self, epoch: int) -> dict:
        """``weight_mean``, ``weight_max`` and ``weight_sum`` of a recorded epoch's weights."""
        return self._records[int(epoch)][1]

    def entries(self, pruner, include_indices: bool = False, epoch: int | None = None) -> list[dict]:
        """One JSON-safe entry per recorded epoch, in epoch order.

        Args:
            pruner: the :class:`~pipeline.prune.pruner.Pruner` that made the
                plans (for kept counts and losses received).
            include_indices: add each epoch's sorted ``kept`` indices.
            epoch: only this epoch's entry (none if it was not recorded).
        """
        entries = []
        planned = sorted(self._records) if epoch is None else [e for e in (int(epoch),) if e in self._records]
        for planned_epoch in planned:
            bits, stats, reasons = self._records[planned_epoch]
            entry = {"epoch": planned_epoch, "kept": pruner.kept_count(planned_epoch),
                     "losses_received": pruner.losses_received(planned_epoch),
                     "kept_sha256": hashlib.sha256(bits.tobytes()).hexdigest()[:16], **stats,
                     "pruned_by_reason": dict(reasons)}
            if include_indices:
                mask = np.unpackbits(bits, count=self.num_samples).astype(bool)
                entry["kept_indices"] = np.flatnonzero(mask).tolist()
            entries.append(entry)
        return entries


def _weight_stats(weights: np.ndarray) -> dict:
    if len(weights) == 0:
        return {"weight_mean": 0.0, "weight_max": 0.0, "weight_sum": 0.0}
    return {"weight_mean": float(weights.mean(dtype=np.float64)), "weight_max": float(weights.max()),
            "weight_sum": float(weights.sum(dtype=np.float64))}
