"""Score sets, read from what the score job writes: consistency by injected-noise kind, AUROC, rejects.

A score set is one score job's output (``scores/``, ``summary.json``,
``config.json`` naming the CLIP checkpoint, whose zero-shot accuracy the
pretraining job saves in ``metrics.json`` beside it), joined to its dataset's
ground truth. Anything optional that is missing reads as "not recorded".
No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data.contract import KEY
from pipeline.report.runs import Run, Sources
from pipeline.score.quality import auroc



@dataclass
class ScoreSet:
    """One score job's output, joined to its dataset's ground truth."""

    url: str
    data: str
    signal: str = ""
    values: dict[str, np.ndarray] = field(default_factory=dict)  # corruption kind -> consistency of scored rows
    rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    auroc: float | None = None
    model: str | None = None
    pretrained: str | None = None
    zero_shot: float | None = None
    note: str = ""


def score_sets(runs: list[Run], sources: Sources) -> list[ScoreSet]:
    """The distinct score sets the runs trained on (a derived copy, like the oracle's, counts as its source)."""
    seen: dict[str, ScoreSet] = {}
    for r in runs:
        url, data = r.config.get("scores"), r.config.get("data")
        if not url:
            continue
        derived = (sources.json(storage.join(url, "config.json")) or {}).get("derived_from")
        url = derived or url
        if url not in seen:
            seen[url] = load_score_set(url, data, sources)
    return list(seen.values())



def load_score_set(url: str, data: str | None, sources: Sources) -> ScoreSet:
    s = ScoreSet(url=url, data=data or "")
    cfg = sources.json(storage.join(url, "config.json")) or {}
    s.model, s.pretrained = cfg.get("model"), cfg.get("pretrained")
    s.zero_shot = reference_zero_shot(s.pretrained, sources)
    try:
        table = storage.read_table(storage.join(url, "scores"))
    except (storage.InputError, OSError) as exc:
        s.note = f"scores not readable ({exc})"
        return s
    s.rows = table.num_rows
    s.rejected = sources.rejected(url)
    s.signal = "clip_score"
    if "clip_margin" in table.column_names:
        margin = table.column("clip_margin").to_numpy(zero_copy_only=False).astype(float)
        if np.isfinite(margin).any():
            s.signal = "clip_margin"
    values = table.column(s.signal).to_numpy(zero_copy_only=False).astype(float)
    usable = np.isfinite(values)
    kinds = _corruptions(table.column(KEY), data, sources) if data else None
    if kinds is None:
        s.note = "no ground truth found: rows are not split into clean and noisy"
        s.values = {"all rows": values[usable]}
        return s
    for kind in sorted(set(kinds[usable]), key=lambda k: (k != "none", k)):
        s.values["clean" if kind == "none" else kind] = values[usable & (kinds == kind)]
    clean = s.values.get("clean", np.zeros(0))
    noisy = np.concatenate([v for k, v in s.values.items() if k != "clean"] or [np.zeros(0)])
    if len(clean) and len(noisy):
        s.auroc = noise_auroc(clean, noisy)
    return s


def noise_auroc(clean: np.ndarray, noisy: np.ndarray) -> float:
    """How well low consistency flags the noisy rows: 1 = every noisy row scores below every clean one."""
    # auroc ranks high scores as positives: score the rows by -consistency.
    return auroc(-np.r_[clean, noisy], np.r_[np.zeros(len(clean), bool), np.ones(len(noisy), bool)])


def _corruptions(keys: pa.ChunkedArray, data: str, sources: Sources) -> np.ndarray | None:
    try:
        gt = storage.read_table(storage.join(data, "ground_truth.parquet"), columns=[KEY, "corruption"])
    except (storage.InputError, OSError, KeyError, pa.ArrowInvalid):
        return None
    idx = pc.index_in(keys, value_set=gt.column(KEY).combine_chunks())
    kinds = pc.fill_null(pc.take(gt.column("corruption"), idx), "unknown")
    return kinds.to_numpy(zero_copy_only=False).astype(str)


def reference_zero_shot(pretrained: str | None, sources: Sources) -> float | None:
    """The zero-shot accuracy ``jobs.pretrain_reference_clip`` saved beside the checkpoint, if any.

    That job writes ``metrics.json`` (key ``zero_shot_accuracy``) into the
    folder holding the checkpoint; a hub tag has no such file.
    """
    if not pretrained or "/" not in pretrained:
        return None
    metrics = sources.json(storage.join(pretrained.rstrip("/").rsplit("/", 1)[0], "metrics.json"))
    value = (metrics or {}).get("zero_shot_accuracy")
    return float(value) if isinstance(value, (int, float)) else None
