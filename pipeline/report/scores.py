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
from pipeline.prune.policies import noise_count
from pipeline.report.runs import Run, Sources, recorded_path
from pipeline.score.quality import auroc, auto_signal, estimate_noise_fraction



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
    cut_fraction: float | None = None  # the estimated-noise share, as mmdp estimates it by default
    by_label: list[LabelCut] = field(default_factory=list)


@dataclass
class LabelCut:
    """Where the estimated-noise cut falls within one label (the label as written in the data).

    ``noisy``, ``noisy_kept``, ``clean_excluded`` and ``auroc`` need the
    dataset's ground truth; None without it, and ``auroc`` also when the
    label's rows are not both clean and noisy.
    """

    label: int
    name: str
    rows: int
    excluded: int
    noisy: int | None = None
    noisy_kept: int | None = None
    clean_excluded: int | None = None
    auroc: float | None = None


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
    if isinstance(s.pretrained, str) and "/" in s.pretrained:  # a checkpoint path, not a hub tag
        s.pretrained = recorded_path(s.pretrained, url, cfg.get("output"))
    s.zero_shot = reference_zero_shot(s.pretrained, sources)
    try:
        table = storage.read_table(storage.join(url, "scores"))
    except (storage.InputError, OSError, ValueError) as exc:  # pyarrow's ArrowInvalid: a path it cannot take
        s.note = f"scores not readable ({exc})"
        return s
    s.rows = table.num_rows
    s.rejected = sources.rejected(url)
    s.signal = "clip_score"  # what a train run's --signal auto reads of these scores
    if "clip_margin" in table.column_names:
        s.signal = auto_signal(table.column("clip_margin").to_numpy(zero_copy_only=False))
    values = table.column(s.signal).to_numpy(zero_copy_only=False).astype(float)
    usable = np.isfinite(values)
    kinds = _corruptions(table.column(KEY), data, sources) if data else None
    labels = _labels(table.column(KEY), data, sources) if data else None
    if labels is not None:
        classes = (sources.json(storage.join(data, "metadata.json")) or {}).get("classes") or []
        noisy_rows = None if kinds is None else kinds[usable] != "none"
        s.cut_fraction, s.by_label = label_cuts(values[usable], labels[usable], noisy_rows, classes)
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


def noise_cut(values: np.ndarray) -> tuple[float, np.ndarray]:
    """(the estimated noise share, which rows mmdp and clip_cut exclude as noise) for consistency ``values``.

    The ``round(share * n)`` lowest values, the share estimated from their
    histogram (:func:`~pipeline.score.quality.estimate_noise_fraction`), ties
    in row order: what the pruner excludes with its defaults.
    """
    values = np.asarray(values, dtype=np.float64)
    fraction = estimate_noise_fraction(values)
    excluded = np.zeros(len(values), dtype=bool)
    excluded[np.argsort(values, kind="stable")[:noise_count(fraction, len(values)) if len(values) else 0]] = True
    return fraction, excluded


def label_cuts(values: np.ndarray, labels: np.ndarray, noisy: np.ndarray | None,
               classes: list[str]) -> tuple[float, list[LabelCut]]:
    """The estimated-noise cut of ``values``, as mmdp and clip_cut make it by default, split by label.

    The ``round(fraction * n)`` lowest values are excluded, the fraction
    estimated from their histogram (:func:`estimate_noise_fraction`). Where
    the reference model confuses classes, the excluded rows crowd into them.

    Args:
        values: the consistency signal of the scored rows.
        labels: each row's label (int; -1 where unknown, left out of the split).
        noisy: each row's ground truth (True = corrupted), or None.
        classes: class names, index = label (a label past them is named by its number).

    Returns:
        (the excluded share, one :class:`LabelCut` per label present, by label).
    """
    fraction, excluded = noise_cut(values)
    cuts = []
    for label in np.unique(labels[labels >= 0]):
        rows = labels == label
        cut = LabelCut(label=int(label), name=classes[label] if label < len(classes) else str(int(label)),
                       rows=int(rows.sum()), excluded=int((rows & excluded).sum()))
        if noisy is not None:
            cut.noisy = int((rows & noisy).sum())
            cut.noisy_kept = int((rows & noisy & ~excluded).sum())
            cut.clean_excluded = int((rows & ~noisy & excluded).sum())
            if 0 < cut.noisy < cut.rows:
                cut.auroc = noise_auroc(values[rows & ~noisy], values[rows & noisy])
        cuts.append(cut)
    return fraction, cuts


def _labels(keys: pa.ChunkedArray, data: str, sources: Sources) -> np.ndarray | None:
    """Each scored row's label as written: from the ground truth, else the train split's parquet shards.

    -1 where a key has none; None where neither source has labels (webdataset
    shards are not read here: that would read every image).
    """
    for url in (storage.join(data, "ground_truth.parquet"), storage.join(data, "train")):
        try:
            if not storage.list_files(url):  # a committed folder of tars (and no parquet)
                continue
            table = storage.read_table(url, columns=[KEY, "label"])
        except (storage.InputError, OSError, KeyError, pa.ArrowInvalid):
            continue
        idx = pc.index_in(keys, value_set=table.column(KEY).combine_chunks())
        found = pc.fill_null(pc.take(table.column("label"), idx), -1)
        return found.to_numpy(zero_copy_only=False).astype(np.int64)
    return None


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
