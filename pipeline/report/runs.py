"""Training runs, read from what the jobs write: the data behind ``report.md``.

Inputs are what the jobs write, read through :mod:`pipeline.storage` (local or
object store): every ``metrics.json`` with a ``config.json`` next to it under
the run folders is a training run (``jobs.train``); its config names the
dataset (``metadata.json``, ``ground_truth.parquet``) and the score job's
output (``scores/``, ``summary.json``, ``config.json`` naming the CLIP
checkpoint, whose zero-shot accuracy the pretraining job saves beside it).
Anything optional that is missing reads as "not recorded", never as an error.

The report is four modules, each importing only the ones before it: this one
(loading and grouping runs), :mod:`pipeline.report.scores` (the score sets the
runs trained on), :mod:`pipeline.report.figures` (matplotlib figures) and
:mod:`pipeline.report.page` (the page: ``build_report``, Markdown and HTML).
No Ray here.
"""

from __future__ import annotations

import fnmatch
import math
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage

# Table and legend order: the pruning benchmark's; any other policy name follows, sorted.
POLICY_ORDER = ("full", "random", "infobatch", "infobatch_exact", "clip_filter", "clip_cut", "mmdp", "oracle")
NOT_RECORDED = "not recorded"


@dataclass
class Run:
    """One training run folder and what the report needs from it."""

    url: str
    label: str  # how the page names it: its folder relative to the RUN_DIR (prefixed by the RUN_DIR when several)
    config: dict
    metrics: dict
    plans: list | None
    policy: str
    noise: str
    pool_rows: int  # the dataset's train split: the denominator of the kept fraction
    shifted: float | None = None
    group: str = ""

    @property
    def totals(self) -> dict:
        return self.metrics.get("totals", {})

    @property
    def history(self) -> list[dict]:
        return self.metrics.get("epochs", [])

    @property
    def complete(self) -> bool:
        return len(self.history) >= int(self.config.get("epochs") or len(self.history))


@dataclass
class Sources:
    """Cached reads of the JSON files many runs share (dataset metadata, score summaries)."""

    cache: dict = field(default_factory=dict)

    def rejected(self, scores_url: str | None) -> dict[str, int]:
        """Rows a score set kept out of training (its ``rejects/``), by reason; empty when unreadable."""
        key = ("rejected", scores_url)
        if not scores_url:
            return {}
        if key not in self.cache:
            self.cache[key] = {}
            try:
                self.cache[key] = rejected_by_reason(storage.read_table(storage.join(scores_url, "rejects")))
            except (storage.InputError, OSError, KeyError, pa.ArrowInvalid):
                pass
        return self.cache[key]

    def json(self, url: str | None):
        """The parsed file, or ``None`` when it is absent or unreadable."""
        if not url:
            return None
        if url not in self.cache:
            try:
                self.cache[url] = storage.read_json(url)
            except (storage.InputError, OSError, ValueError):
                self.cache[url] = None
        return self.cache[url]


# ---------------------------------------------------------------- discovery


def find_run_folders(root: str, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Folders under ``root`` (relative paths, ``""`` for root itself) holding metrics.json and config.json.

    Returns:
        (runs, excluded): the matching folders, and those left out by an ``exclude`` glob.

    Raises:
        ValueError: ``root`` does not exist or is not a folder.
    """
    fs, base = storage.filesystem_for(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{root}: no such folder")
    files = {e.path[len(base):].lstrip("/") for e in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if e.type == pafs.FileType.File}
    found = sorted(posixpath.dirname(p) for p in files if posixpath.basename(p) == "metrics.json"
                   and posixpath.join(posixpath.dirname(p), "config.json") in files)
    excluded = [r for r in found if any(fnmatch.fnmatch(r, pat) for pat in exclude)]
    return [r for r in found if r not in excluded], excluded


def load_runs(roots: list[str], exclude: tuple[str, ...] = (),
              sources: Sources | None = None) -> tuple[list[Run], list[str]]:
    """Every training run under ``roots``; returns (runs, notes on what was left out)."""
    sources = sources or Sources()
    names = [posixpath.basename(r.rstrip("/")) or r for r in roots]
    prefix = len(roots) > 1
    runs, notes = [], []
    for root, name in zip(roots, names):
        folders, excluded = find_run_folders(root, exclude)
        notes += [f"{storage.join(root, r)}: excluded by --exclude" for r in excluded]
        shifted = _shifted_from_results(root, sources)
        for rel in folders:
            url = storage.join(root, rel) if rel else root
            label = posixpath.join(name if names.count(name) == 1 else root, rel) if prefix else (rel or name)
            run = _load_run(url, label, sources)
            if run is None:
                if not is_reference_pretraining(sources.json(storage.join(url, "metrics.json"))):
                    notes.append(f"{url}: metrics.json is not a train job's (no epochs/totals); skipped")
                continue
            run.shifted = run.totals.get("shifted_test_accuracy", shifted.get(_norm(url)))
            runs.append(run)
    _assign_groups(runs)
    return runs, notes


def is_reference_pretraining(metrics) -> bool:
    """``metrics.json`` of ``jobs.pretrain_reference_clip``: the reference model, which the report
    describes through the score sets that name its checkpoint, not as a training run."""
    if not isinstance(metrics, dict):
        return False
    return {"zero_shot_accuracy", "checkpoint"} <= metrics.keys() and "epochs" not in metrics


def _load_run(url: str, label: str, sources: Sources) -> Run | None:
    metrics, config = sources.json(storage.join(url, "metrics.json")), sources.json(storage.join(url, "config.json"))
    if not isinstance(metrics, dict) or not isinstance(metrics.get("epochs"), list) or "totals" not in metrics:
        return None
    config = config if isinstance(config, dict) else {}
    plans = sources.json(storage.join(url, "plans.json"))
    summary = sources.json(storage.join(config["scores"], "summary.json")) if config.get("scores") else None
    meta = sources.json(storage.join(config["data"], "metadata.json")) if config.get("data") else None
    policy = str(config.get("policy", "unknown"))
    # The benchmark's clean oracle is policy "full" on a score set whose noisy rows were rejected.
    if summary and summary.get("oracle_excluded"):
        policy = "oracle"
    noise = "unknown"
    if meta:
        noise = meta.get("noise_spec") or ("clean" if not meta.get("noise") else str(meta["noise"]))
    pool = int((meta or {}).get("splits", {}).get("train") or metrics["totals"].get("num_samples") or 0)
    return Run(url, label, config, metrics, plans if isinstance(plans, list) else None, policy, noise, pool)


def _norm(url: str) -> str:
    return storage.filesystem_for(url)[1]


def _shifted_from_results(root: str, sources: Sources) -> dict[str, float]:
    """Shifted-test accuracies the benchmark keeps in ``results.json`` (not in the runs' metrics)."""
    results = sources.json(storage.join(root, "results.json"))
    if not isinstance(results, dict):
        return {}
    return {_norm(r["out"]): r["shifted_test_accuracy"] for r in results.get("runs", [])
            if isinstance(r, dict) and r.get("out") and r.get("shifted_test_accuracy") is not None}


def _assign_groups(runs: list[Run]) -> None:
    """Group by policy; noise setting and early stops split groups, since they do not compare."""
    several_noises = len({r.noise for r in runs}) > 1
    for r in runs:
        name = r.policy + (f" [{r.noise}]" if several_noises else "")
        if not r.complete:
            name += f" (stopped at {len(r.history)}/{r.config.get('epochs')} epochs)"
        r.group = name


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by group name, in the benchmark's policy order."""
    rank = {p: i for i, p in enumerate(POLICY_ORDER)}
    ordered = sorted(runs, key=lambda r: (r.noise, not r.complete, rank.get(r.policy, len(rank)), r.policy, r.label))
    groups: dict[str, list[Run]] = {}
    for r in ordered:
        groups.setdefault(r.group, []).append(r)
    return groups


# ---------------------------------------------------------------- per-run series


def kept_per_epoch(run: Run) -> np.ndarray:
    """Samples trained on in each epoch: the plan log's ``kept``, else the metrics' own count."""
    if run.plans:
        return np.array([p.get("kept", np.nan) for p in run.plans], dtype=float)
    return np.array([h.get("plan_kept", h.get("samples_forwarded", np.nan)) for h in run.history], dtype=float)


def accuracy_per_epoch(run: Run) -> np.ndarray:
    """Clean test accuracy after each epoch (NaN where not recorded)."""
    return np.array([h.get("test_accuracy", np.nan) for h in run.history], dtype=float)


def pruned_by_reason(run: Run) -> tuple[dict[str, int], bool]:
    """Sample-epochs each reason pruned over the run; whether the plans recorded reasons at all.

    Without a ``pruned_by_reason`` entry, an epoch's pruned count is derived
    (scored samples - kept) and filed under :data:`NOT_RECORDED`.
    """
    n = int(run.totals.get("num_samples") or 0)
    out: dict[str, int] = {}
    recorded = False
    # Without a plan log, the metrics' own per-epoch kept counts still give the totals.
    entries = run.plans if run.plans else [{"kept": k} for k in kept_per_epoch(run) if not math.isnan(k)]
    for entry in entries:
        pruned = max(0, n - int(entry.get("kept", n)))
        reasons = entry.get("pruned_by_reason")
        if isinstance(reasons, dict):
            recorded = True
            for reason, count in reasons.items():
                out[reason] = out.get(reason, 0) + int(count)
            rest = pruned - sum(int(c) for c in reasons.values())
            if rest > 0:
                out["unattributed"] = out.get("unattributed", 0) + rest
        elif pruned:
            out[NOT_RECORDED] = out.get(NOT_RECORDED, 0) + pruned
    return out, recorded


def rejected_by_reason(rejects: pa.Table) -> dict[str, int]:
    """Row counts of a ``rejects/`` table by reason."""
    out: dict[str, int] = {}
    for reason in rejects.column("reason").to_pylist():
        out[reason or "rejected"] = out.get(reason or "rejected", 0) + 1
    return out
