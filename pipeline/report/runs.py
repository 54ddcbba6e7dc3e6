"""Training runs, read from what the jobs write: the data behind ``report.md``.

Inputs are what the jobs write, read through :mod:`pipeline.storage` (local or
object store): every ``metrics.json`` with a ``config.json`` next to it under
the run folders is a training run (``jobs.train``); its config names the
dataset (``metadata.json``, ``ground_truth.parquet``) and the score job's
output (``scores/``, ``summary.json``, ``config.json`` naming the CLIP
checkpoint, whose zero-shot accuracy the pretraining job saves beside it).
Anything optional that is missing reads as "not recorded", never as an error.
A run folder its job has not committed (``_PENDING``: still running, or
stopped) is left out and named in the notes, as is a training run's
``config.json`` with no ``metrics.json`` beside it: ``jobs.train`` rewrites
the config when it starts and the metrics when it ends, so such a folder's
two files need not be of the same run.

Runs compare only within one experiment (:data:`EXPERIMENT_FIELDS`: the
dataset apart from its seed and noise, the task, epochs, model and training
settings, the score set's mode); the policy, its options (keep ratio,
noise fraction, ...), the score set itself and the seed vary within one.
Several experiments under the RUN_DIRs are told apart by a tag (``E1``,
``E2``, ...) in their groups' names, each measured against its own ``full``.

The report is four modules, each importing only the ones before it: this one
(loading and grouping runs), :mod:`pipeline.report.scores` (the score sets the
runs trained on), :mod:`pipeline.report.figures` (matplotlib figures) and
:mod:`pipeline.report.page` (the page: ``build_report``, Markdown and HTML).
No Ray here.
"""

from __future__ import annotations

import fnmatch
import json
import math
import dataclasses
import posixpath
from urllib.parse import urlparse
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage

# Table and legend order: the pruning benchmark's; any other policy name follows, sorted.
POLICY_ORDER = ("full", "random", "infobatch", "infobatch_exact", "trajectory", "clip_filter", "clip_cut", "mmdp",
                "oracle")
NOT_RECORDED = "not recorded"

# What makes runs one experiment, whose policies compare (besides the dataset and the score set's mode): the
# fields of a run's config.json that set what is trained and how fast, as the report's column names them. The
# rest varies within an experiment: the policy and its options (keep_ratio, noise_fraction, policy_params,
# signal, ...), the seed (averaged over), the score set (per seed, or the oracle's copy), where files are.
EXPERIMENT_FIELDS = {
    "task": "task", "epochs": "epochs", "model": "model", "width": "width", "batch_size": "batch size",
    "lr": "lr", "weight_decay": "weight decay", "warmup_steps": "warm-up steps", "augment": "augment",
    "step_schedule": "step schedule", "shuffle_buffer": "shuffle buffer", "preserve_order": "preserve order",
    "columns": "columns", "classes": "classes", "workers": "workers", "use_gpu": "use gpu",
    "cpus_per_worker": "cpus per worker", "threads": "threads", "eval_every": "eval every",
    "checkpoint_every": "checkpoint every",
}
# What of a dataset's metadata.json makes it the same dataset: not its seed (runs over seeds are averaged, and
# jobs.demo and the pruning benchmark draw a dataset per seed) nor its noise (the groups' noise label).
DATASET_FIELDS = ("name", "source", "splits", "limit", "reference_size", "split_seed")


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
    experiment: str = ""  # its experiment's tag (E1, E2, ...) where the runs are of several, else ""
    setup: dict = field(default_factory=dict)  # what defines its experiment: setting -> value, as shown
    dataset: str = ""  # the dataset's identity: its metadata apart from seed and noise, else its path
    meta: dict | None = None  # the dataset's metadata.json, where readable

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


def find_run_folders(root: str, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str], dict[str, str]]:
    """Folders under ``root`` (relative paths, ``""`` for root itself) holding metrics.json and config.json.

    An ``exclude`` glob matches a folder's path relative to ``root`` or any trailing part of it: ``warmup``
    leaves out ``warmup`` and ``bench/warmup``, ``overhead/*`` leaves out ``bench/overhead/full-0``.

    Returns:
        (runs, excluded, unfinished): the committed (or unmarked) folders; those left out by an ``exclude``
        glob; and, by folder, why one holding a config.json is not finished: ``"pending"`` (its writer has
        not committed it: still running, or stopped) or ``"no metrics"`` (no metrics.json beside the
        config.json). Whether an unfinished folder is a training run at all is its config's to say.

    Raises:
        ValueError: ``root`` does not exist or is not a folder.
    """
    fs, base = storage.filesystem_for(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{root}: no such folder")
    files = {e.path[len(base):].lstrip("/") for e in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if e.type == pafs.FileType.File}
    configs = sorted(posixpath.dirname(p) for p in files if posixpath.basename(p) == "config.json")
    has = lambda folder, name: posixpath.join(folder, name) in files  # noqa: E731
    excluded = [r for r in configs if excluded_by(r, exclude)]
    runs, unfinished = [], {}
    for r in configs:
        if r in excluded:
            continue
        if has(r, storage.PENDING):
            unfinished[r] = "pending"
        elif not has(r, "metrics.json"):
            unfinished[r] = "no metrics"
        else:
            runs.append(r)
    return runs, [r for r in excluded if has(r, "metrics.json")], unfinished


def excluded_by(rel: str, exclude: tuple[str, ...]) -> bool:
    """Whether a glob matches ``rel`` (a folder relative to a RUN_DIR) or a trailing part of it, at any depth."""
    parts = rel.split("/") if rel else []
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(tail, pat) for tail in tails for pat in exclude)


def load_runs(roots: list[str], exclude: tuple[str, ...] = (),
              sources: Sources | None = None) -> tuple[list[Run], list[str]]:
    """Every training run under ``roots``; returns (runs, notes on what was left out)."""
    sources = sources or Sources()
    names = [posixpath.basename(r.rstrip("/")) or r for r in roots]
    prefix = len(roots) > 1
    runs, notes, seen = [], [], set()
    for root, name in zip(roots, names):
        folders, excluded, unfinished = find_run_folders(root, exclude)
        notes += [f"{storage.join(root, r)}: excluded by --exclude" for r in excluded]
        shifted = _shifted_from_results(root, sources)
        for rel in sorted(folders + list(unfinished)):
            url = storage.join(root, rel) if rel else root
            if _norm(url) in seen:  # under two RUN_DIRs (one inside the other, or named twice): read once
                continue
            seen.add(_norm(url))
            if rel in unfinished:
                note = _unfinished_note(url, unfinished[rel], sources)
                notes += [note] if note else []
                continue
            label = posixpath.join(name if names.count(name) == 1 else root, rel) if prefix else (rel or name)
            run = _load_run(url, label, sources)
            if run is None:
                if not is_reference_pretraining(sources.json(storage.join(url, "metrics.json"))):
                    notes.append(f"{url}: metrics.json is not a train job's (no epochs/totals); skipped")
                continue
            run.shifted = run.totals.get("shifted_test_accuracy", _benchmark_shifted(url, sources, shifted))
            runs.append(run)
    _assign_experiments(runs, sources)
    _assign_groups(runs)
    return runs, notes


def is_train_config(config) -> bool:
    """Whether a ``config.json`` is a training run's (``jobs.train`` saves its policy and epochs)."""
    return isinstance(config, dict) and {"policy", "epochs"} <= config.keys()


def _unfinished_note(url: str, why: str, sources: Sources) -> str | None:
    """The note on a training run's folder that is not finished; None for another job's output (a dataset,
    a score set, a report being written, the reference pre-training), which is no run to leave out."""
    metrics = sources.json(storage.join(url, "metrics.json"))
    train_metrics = isinstance(metrics, dict) and "epochs" in metrics and "totals" in metrics
    if not (is_train_config(sources.json(storage.join(url, "config.json"))) or train_metrics):
        return None
    if why == "pending":
        return (f"{url}: not finished: pending (not committed by its training job, still running or stopped: "
                "a metrics.json there may be an earlier run's)")
    return f"{url}: not finished: a training run's config.json with no metrics.json (still running, or stopped)"


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
    # Its inputs as the report reaches them from its own folder, not the job's (jobs.demo --out runs/demo
    # records runs/demo/data); the displayed config keeps them so.
    config = {**config, **{name: recorded_path(config[name], url, config.get("out"))
                           for name in ("data", "scores") if isinstance(config.get(name), str)}}
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
    run = Run(url, label, config, metrics, plans if isinstance(plans, list) else None, policy, noise, pool)
    run.meta = meta if isinstance(meta, dict) else None
    # A dataset's identity: its metadata apart from the seed and the noise (DATASET_FIELDS), else its folder.
    run.dataset = (_json({k: run.meta.get(k) for k in DATASET_FIELDS}) if run.meta
                   else _json({"path": _norm(config["data"]) if config.get("data") else None}))
    return run


def _train_defaults() -> dict:
    """``jobs.train``'s flag defaults (the task's own for model, lr and weight decay are resolved per run)."""
    from pipeline.train.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def recorded_path(path: str, found: str, recorded_out: str | None) -> str:
    """A path a job recorded in its ``config.json``, as the report reaches it: a relative local one is relative
    to the folder the job ran in, which is where its output was ``found`` less the output as it recorded it
    (``recorded_out``): ``runs/demo/data`` of a run recorded as ``runs/demo/runs/mmdp`` and found at
    ``/home/me/runs/demo/runs/mmdp`` is ``/home/me/runs/demo/data``. Any other path as recorded."""
    if not storage.is_local(path) or path.startswith("file:") or posixpath.isabs(path):
        return path
    if not recorded_out or not storage.is_local(recorded_out) or posixpath.isabs(recorded_out):
        return path
    if not storage.is_local(found):  # a folder copied to an object store: the job's own disk is not there
        return path
    out = posixpath.normpath(recorded_out)
    here = posixpath.normpath(urlparse(found).path if found.startswith("file:") else found)
    if here == out:
        return path
    if not here.endswith("/" + out):
        return path  # the output was moved or renamed since: where the job ran is not known
    return posixpath.join(here[:-len(out)], path)


def _norm(url: str) -> str:
    return storage.filesystem_for(url)[1]


def _benchmark_shifted(url: str, sources: Sources, from_results: dict[str, float]) -> float | None:
    """A benchmark run's shifted-test accuracy: from its row beside its outputs (``run.json``, wherever the
    folder now lies and whichever folder above it is reported), else from its RUN_DIR's ``results.json``."""
    row = sources.json(storage.join(url, "run.json"))
    if isinstance(row, dict) and row.get("shifted_test_accuracy") is not None:
        return row["shifted_test_accuracy"]
    return from_results.get(_norm(url))


def _shifted_from_results(root: str, sources: Sources) -> dict[str, float]:
    """Shifted-test accuracies the benchmark keeps in ``results.json`` (not in the runs' metrics)."""
    results = sources.json(storage.join(root, "results.json"))
    if not isinstance(results, dict):
        return {}
    return {_norm(r["out"]): r["shifted_test_accuracy"] for r in results.get("runs", [])
            if isinstance(r, dict) and r.get("out") and r.get("shifted_test_accuracy") is not None}


def _assign_experiments(runs: list[Run], sources: Sources) -> None:
    """Each run's experiment: :data:`EXPERIMENT_FIELDS` of its config, its dataset, its score set's mode.

    Tags (``E1``, ``E2``, ...) follow the runs' labels, and are given only where there are several.
    """
    defaults = _train_defaults()  # a flag that an older mmdp did not record had its later default's effect
    for r in runs:
        r.setup = {"data": r.dataset}
        for key, name in EXPERIMENT_FIELDS.items():
            value = r.config[key] if key in r.config else defaults.get(key)
            r.setup[name] = NOT_RECORDED if value is None else value if isinstance(value, str) else _json(value)
        r.setup["score mode"] = _score_mode(r.config.get("scores"), sources) or NOT_RECORDED
    # The dataset as shown: its name and size, or (where two datasets read the same) the first run's data folder.
    shown: dict[str, str] = {}
    for r in sorted(runs, key=lambda r: r.label):
        shown.setdefault(r.dataset, _dataset_name(r))
    clash = {v for v in shown.values() if list(shown.values()).count(v) > 1}
    firsts = {}
    for r in sorted(runs, key=lambda r: r.label):
        firsts.setdefault(r.dataset, str(r.config.get("data") or NOT_RECORDED))
    for r in runs:
        r.setup["data"] = firsts[r.dataset] if shown[r.dataset] in clash else shown[r.dataset]
    keys = []
    for r in sorted(runs, key=lambda r: r.label):
        key = _json(r.setup)
        if key not in keys:
            keys.append(key)
    for r in runs:
        r.experiment = f"E{keys.index(_json(r.setup)) + 1}" if len(keys) > 1 else ""


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _dataset_name(run: Run) -> str:
    meta = run.meta or {}
    if not meta:
        return str(run.config.get("data") or NOT_RECORDED)
    train = (meta.get("splits") or {}).get("train")
    return str(meta.get("name") or run.config.get("data")) + (f" ({int(train):,} train rows)" if train else "")


def _score_mode(scores: str | None, sources: Sources) -> str | None:
    """The score set's ``--mode`` (label or caption), through the set a derived copy (the oracle's) is of."""
    if not scores:
        return None
    config = sources.json(storage.join(scores, "config.json")) or {}
    if config.get("derived_from") and "mode" not in config:
        config = sources.json(storage.join(config["derived_from"], "config.json")) or {}
    return config.get("mode")


def experiments(runs: list[Run]) -> tuple[list[str], list[tuple[str, list[Run], dict]]]:
    """The settings that differ between the runs' experiments, and each experiment: (tag, runs, its setup).

    One experiment (or none): no settings and no experiments listed.
    """
    tags = sorted({r.experiment for r in runs if r.experiment}, key=lambda t: int(t[1:]))
    if not tags:
        return [], []
    out = [(t, [r for r in runs if r.experiment == t]) for t in tags]
    setups = [rs[0].setup for _, rs in out]
    differ = [k for k in setups[0] if len({_json(s.get(k)) for s in setups}) > 1]
    return differ, [(t, rs, rs[0].setup) for t, rs in out]


# A policy's own settings, as its group name shows them: runs of one policy that differ in one it reads
# (reads_setting) are different groups. Keep ratios within KEEP_TOLERANCE of each other are one: the
# pruning benchmark gives its fixed-ratio baselines mmdp's measured share of each seed (0.608-0.609).
POLICY_SETTINGS = {"keep_ratio": "keep", "noise_fraction": "noise fraction", "signal": "signal",
                   "policy_params": "params"}
KEEP_TOLERANCE = 0.005


def reads_setting(policy: str, name: str) -> bool:
    """Whether runs of ``policy`` depend on the setting ``name``, as the policy declares it
    (:mod:`pipeline.prune.policies`; the oracle is ``full``); a policy this mmdp does not know, on all."""
    from pipeline.prune.policies import POLICIES, reads

    policy = "full" if policy == "oracle" else policy
    return policy not in POLICIES or reads(policy, name)


def _policy_setting(run: Run, name: str) -> str:
    value = run.config.get(name)
    return "default" if value in (None, [], ()) else ",".join(value) if isinstance(value, list) else str(value)


def _setting_labels(runs: list[Run], name: str) -> dict[int, str]:
    """Each run's label for setting ``name``: its value, keep ratios closer than :data:`KEEP_TOLERANCE` to the
    next alike (one label, the lowest's, to two digits)."""
    if name != "keep_ratio" or not all(isinstance(r.config.get(name), (int, float)) for r in runs):
        return {id(r): _policy_setting(r, name) for r in runs}
    labels, start, last = {}, None, None
    for r in sorted(runs, key=lambda r: r.config[name]):
        value = r.config[name]
        if last is None or value - last > KEEP_TOLERANCE:
            start = value
        labels[id(r)], last = f"{start:.2f}", value
    return labels


def _assign_groups(runs: list[Run]) -> None:
    """Group by policy; experiments, noise settings, the policy's own settings (keep ratio, noise fraction,
    signal, parameters: only those that differ between its runs are named) and early stops split groups, since
    they do not compare."""
    several_noises = len({r.noise for r in runs}) > 1
    names = {}
    for r in runs:
        tags = [t for t in (r.experiment, r.noise if several_noises else "") if t]
        names[id(r)] = r.policy + (f" [{', '.join(tags)}]" if tags else "")
    for name in set(names.values()):
        alike = [r for r in runs if names[id(r)] == name]
        labels = {k: _setting_labels(alike, k) for k in POLICY_SETTINGS if reads_setting(alike[0].policy, k)}
        differ = [k for k, by_run in labels.items() if len(set(by_run.values())) > 1]
        for r in alike if differ else ():
            names[id(r)] += " (" + ", ".join(f"{POLICY_SETTINGS[k]} {labels[k][id(r)]}" for k in differ) + ")"
    for r in runs:
        r.group = names[id(r)]
        if not r.complete:
            r.group += f" (stopped at {len(r.history)}/{r.config.get('epochs')} epochs)"


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by group name: by experiment, then in the benchmark's policy order."""
    rank = {p: i for i, p in enumerate(POLICY_ORDER)}
    ordered = sorted(runs, key=lambda r: (int(r.experiment[1:] or 0), r.noise, not r.complete,
                                          rank.get(r.policy, len(rank)), r.policy, r.label))
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
