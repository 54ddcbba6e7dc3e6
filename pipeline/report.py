"""A report of training runs: ``report.md`` (and ``report.html``) with PNG figures beside it.

Inputs are what the jobs write, read through :mod:`pipeline.io` (local or
object store): every ``metrics.json`` with a ``config.json`` next to it under
the run folders is a training run (``jobs.train``); its config names the
dataset (``metadata.json``, ``ground_truth.parquet``) and the score job's
output (``scores/``, ``summary.json``, ``config.json`` naming the CLIP
checkpoint, whose zero-shot accuracy the pretraining job saves beside it).
Anything optional that is missing reads as "not recorded", never as an error.

The page is built as a list of blocks (heading, paragraph, table, image) and
rendered to Markdown and to HTML from the same list, so both say the same.
No Ray here.
"""

from __future__ import annotations

import fnmatch
import html
import io as _bytesio
import math
import os
import posixpath
import textwrap
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import io as mio
from pipeline.metrics import auroc
from pipeline.schema import KEY

# Table and legend order: the benchmark's (DESIGN.md); any other policy name follows, sorted.
POLICY_ORDER = ("full", "random", "infobatch", "clip_filter", "mmdp", "oracle")
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
        """Rows a score set kept out of training (status not ``ok``), by reason; empty when unreadable."""
        key = ("rejected", scores_url)
        if not scores_url:
            return {}
        if key not in self.cache:
            self.cache[key] = {}
            try:
                table = mio.read_table(mio.join(scores_url, "scores"), columns=["status", "error"])
                self.cache[key] = _rejected_by_reason(table)
            except (mio.ShardError, OSError, KeyError, pa.ArrowInvalid):
                pass
        return self.cache[key]

    def json(self, url: str | None):
        """The parsed file, or ``None`` when it is absent or unreadable."""
        if not url:
            return None
        if url not in self.cache:
            try:
                self.cache[url] = mio.read_json(url)
            except (mio.ShardError, OSError, ValueError):
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
    fs, base = mio.filesystem_for(root)
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
        notes += [f"{mio.join(root, r)}: excluded by --exclude" for r in excluded]
        shifted = _shifted_from_results(root, sources)
        for rel in folders:
            url = mio.join(root, rel) if rel else root
            label = posixpath.join(name if names.count(name) == 1 else root, rel) if prefix else (rel or name)
            run = _load_run(url, label, sources)
            if run is None:
                notes.append(f"{url}: metrics.json is not a train job's (no epochs/totals); skipped")
                continue
            run.shifted = run.totals.get("shifted_test_accuracy", shifted.get(_norm(url)))
            runs.append(run)
    _assign_groups(runs)
    return runs, notes


def _load_run(url: str, label: str, sources: Sources) -> Run | None:
    metrics, config = sources.json(mio.join(url, "metrics.json")), sources.json(mio.join(url, "config.json"))
    if not isinstance(metrics, dict) or not isinstance(metrics.get("epochs"), list) or "totals" not in metrics:
        return None
    config = config if isinstance(config, dict) else {}
    plans = sources.json(mio.join(url, "plans.json"))
    summary = sources.json(mio.join(config["scores"], "summary.json")) if config.get("scores") else None
    meta = sources.json(mio.join(config["data"], "metadata.json")) if config.get("data") else None
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
    return mio.filesystem_for(url)[1]


def _shifted_from_results(root: str, sources: Sources) -> dict[str, float]:
    """Shifted-test accuracies the benchmark keeps in ``results.json`` (not in the runs' metrics)."""
    results = sources.json(mio.join(root, "results.json"))
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


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def stack_curves(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over runs, epoch by epoch, over the runs that reached each epoch."""
    length = max((len(c) for c in curves), default=0)
    grid = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        grid[i, :len(c)] = c
    with warnings.catch_warnings():  # an epoch no run reached is NaN by design, not a problem to warn about
        warnings.simplefilter("ignore", RuntimeWarning)
        counts = np.sum(~np.isnan(grid), axis=0)
        mean = np.nanmean(grid, axis=0) if length else np.zeros(0)
        std = np.where(counts > 1, np.nanstd(grid, axis=0, ddof=1) if len(curves) > 1 else 0.0, 0.0)
    return mean, std


# ---------------------------------------------------------------- consistency scores


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
        derived = (sources.json(mio.join(url, "config.json")) or {}).get("derived_from")
        url = derived or url
        if url not in seen:
            seen[url] = load_score_set(url, data, sources)
    return list(seen.values())


def load_score_set(url: str, data: str | None, sources: Sources) -> ScoreSet:
    s = ScoreSet(url=url, data=data or "")
    cfg = sources.json(mio.join(url, "config.json")) or {}
    s.model, s.pretrained = cfg.get("model"), cfg.get("pretrained")
    s.zero_shot = reference_zero_shot(s.pretrained, sources)
    try:
        table = mio.read_table(mio.join(url, "scores"))
    except (mio.ShardError, OSError) as exc:
        s.note = f"scores not readable ({exc})"
        return s
    s.rows = table.num_rows
    s.rejected = _rejected_by_reason(table)
    status = table.column("status").to_numpy(zero_copy_only=False).astype(str)
    s.signal = "clip_score"
    if "clip_margin" in table.column_names:
        margin = table.column("clip_margin").to_numpy(zero_copy_only=False).astype(float)
        if np.isfinite(margin[status == "ok"]).any():
            s.signal = "clip_margin"
    values = table.column(s.signal).to_numpy(zero_copy_only=False).astype(float)
    usable = (status == "ok") & np.isfinite(values)
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
        # Low consistency should flag noise: score the rows by -consistency.
        s.auroc = auroc(-np.r_[clean, noisy], np.r_[np.zeros(len(clean), bool), np.ones(len(noisy), bool)])
    return s


def _rejected_by_reason(table: pa.Table) -> dict[str, int]:
    status = table.column("status").to_numpy(zero_copy_only=False).astype(str)
    errors = table.column("error").to_numpy(zero_copy_only=False) if "error" in table.column_names else None
    out: dict[str, int] = {}
    for i in np.flatnonzero(status != "ok"):
        reason = str(errors[i]) if errors is not None and errors[i] else status[i]
        out[reason] = out.get(reason, 0) + 1
    return out


def _corruptions(keys: pa.ChunkedArray, data: str, sources: Sources) -> np.ndarray | None:
    try:
        gt = mio.read_table(mio.join(data, "ground_truth.parquet"), columns=[KEY, "corruption"])
    except (mio.ShardError, OSError, KeyError, pa.ArrowInvalid):
        return None
    idx = pc.index_in(keys, value_set=gt.column(KEY).combine_chunks())
    kinds = pc.fill_null(pc.take(gt.column("corruption"), idx), "unknown")
    return kinds.to_numpy(zero_copy_only=False).astype(str)


def reference_zero_shot(pretrained: str | None, sources: Sources) -> float | None:
    """The zero-shot accuracy ``jobs.pretrain_reference_clip`` saved beside the checkpoint, if any.

    That job writes it to the checkpoint path with its extension replaced by
    ``.metrics.json`` (key ``zero_shot_accuracy``); a hub tag has no such file.
    """
    if not pretrained:
        return None
    metrics = sources.json(os.path.splitext(pretrained)[0] + ".metrics.json")
    value = (metrics or {}).get("zero_shot_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


# ---------------------------------------------------------------- blocks -> markdown / html


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "img":
            out += [f"![{rest[1]}]({rest[0]})", ""]
        elif kind == "table":
            header, rows = rest
            cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(map(cell, header)) + " |")
            out.append("|" + " --- |" * len(header))
            out += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
            out.append("")
    return "\n".join(out)


def to_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(rest[0])}</p>")
        elif kind == "img":
            body.append(f'<p><img src="{e(rest[0])}" alt="{e(rest[1])}"></p>')
        elif kind == "table":
            header, rows = rest
            lines = ["<table>", "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"]
            lines += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows]
            body.append("\n".join(lines + ["</table>"]))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em;"
             "text-align:left}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def save_png(fig, url: str) -> None:
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png")
    mio.write_bytes(buf.getvalue(), url)



# ---------------------------------------------------------------- figures

# One look for every figure: readable at a page's width, and the same size, so they line up.
FIGSIZE, DPI = (7.0, 4.0), 120


def _figure(height: float = FIGSIZE[1]):
    # Figure() without pyplot renders through Agg and keeps no global state between reports.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _colour(policy: str) -> str:
    rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER) + sum(map(ord, policy)) % 4
    return f"C{rank % 10}"


def curves_figure(groups: dict[str, list[Run]], series, title: str, ylabel: str, scale: float = 100.0, ylim=None):
    """One line per group (the mean over its runs, a band of ± one std when it has several).

    Policies often coincide (every pruning policy keeps the same fraction), so
    each line is thinner than the one drawn before it and has its own hollow
    marker: a line drawn over another leaves it visible.
    """
    labels = [name + (f" (mean of {len(rs)})" if len(rs) > 1 else "") for name, rs in groups.items()]
    # A few short names fit beside the axes; more, or longer, go below so the plot keeps its width.
    below = len(labels) > 6 or max(map(len, labels), default=0) > 24
    fig, ax = _figure(FIGSIZE[1] + (0.25 * math.ceil(len(labels) / 2) + 0.3 if below else 0))
    styles, markers = ["-", "--", ":", "-."], "osD^vPX<>h"
    noises = sorted({r.noise for rs in groups.values() for r in rs})
    for i, (label, rs) in enumerate(zip(labels, groups.values())):
        mean, std = stack_curves([series(r) for r in rs])
        epochs = np.arange(1, len(mean) + 1)
        colour, style = _colour(rs[0].policy), styles[noises.index(rs[0].noise) % len(styles)]
        ax.plot(epochs, mean * scale, style, color=colour, marker=markers[i % len(markers)], markersize=5,
                markerfacecolor="none", linewidth=max(1.0, 2.8 - 0.35 * i), label=label)
        if len(rs) > 1:
            ax.fill_between(epochs, (mean - std) * scale, (mean + std) * scale, color=colour, alpha=0.15)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it hides lines that sit at 100% or at the top of the accuracy curves.
    if below:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def wall_figure(rows: list[dict]):
    """Horizontal bars of mean wall-clock per group, ± std, each labelled with its speedup over full."""
    fig, ax = _figure(max(2.5, 0.5 * len(rows) + 1.3))
    names = [textwrap.fill(r["name"], 24) for r in rows][::-1]  # long group names would squeeze the bars
    means = [r["wall"][0] for r in rows][::-1]
    errs = [r["wall"][1] for r in rows][::-1]
    ax.barh(names, means, xerr=errs if any(errs) else None, color=[_colour(r["policy"]) for r in rows][::-1],
            alpha=0.85, capsize=3)
    for y, (mean, err, row) in enumerate(zip(means, errs, rows[::-1])):
        text = f"{mean:.0f} s" + (f"  ({row['speedup']:.2f}x vs full)" if row["speedup"] else "")
        ax.text(mean + err, y, "  " + text, va="center", fontsize=8)  # past the error bar, not over it
    # A figure title: centred on the whole figure, it is not cut by wide tick labels.
    fig.suptitle("Training wall-clock per policy (whole fit, start-up included)")
    ax.set(xlabel="wall-clock (s)" + (", mean ± std over a policy's runs" if any(errs) else ""))
    ax.set_xlim(0, max([m + e for m, e in zip(means, errs)] + [1]) * 1.45)  # room for the labels
    ax.grid(axis="x", alpha=0.3)
    return fig


def score_histogram(s: ScoreSet, name: str):
    """Consistency histograms of the clean rows and of each injected-noise kind, on shared bins."""
    fig, ax = _figure()
    everything = np.concatenate(list(s.values.values()))
    bins = np.histogram_bin_edges(everything, bins=50) if len(everything) else 10
    for i, (kind, v) in enumerate(s.values.items()):
        colour = "C0" if kind in ("clean", "all rows") else f"C{(i % 8) + 1}"
        ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.4, color=colour, label=f"{kind} ({len(v):,} rows)")
        ax.hist(v, bins=bins, histtype="step", color=colour, linewidth=1.2)
    separation = f"noise-detection AUROC {s.auroc:.3f}" if s.auroc is not None else "AUROC n/a"
    ax.set(title=f"CLIP consistency, {name}: clean vs injected noise ({separation})",
           xlabel=f"{s.signal} (cosine-similarity units; higher = image and text agree)",
           ylabel="samples per bin")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- the page


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _pct_ms(values) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return NOT_RECORDED
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if sum(v is not None for v in values) > 1 else "")


def summary_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """Per group: final accuracy, shifted accuracy, wall-clock and samples forwarded (mean, std), speedup vs full."""
    rows = []
    for name, rs in groups.items():
        rows.append({"name": name, "policy": rs[0].policy, "noise": rs[0].noise, "complete": rs[0].complete,
                     "runs": rs, "wall": mean_std([r.totals.get("wall_seconds") for r in rs]),
                     "forwarded": mean_std([r.totals.get("samples_forwarded") for r in rs])})
    for row in rows:
        full = [f for f in rows if f["policy"] == "full" and f["noise"] == row["noise"] and f["complete"]]
        ok = full and row["complete"] and full[0]["wall"][0] > 0 and row["wall"][0] > 0
        row["speedup"] = full[0]["wall"][0] / row["wall"][0] if ok else None
    return rows


def build_report(roots: list[str], out: str, exclude: tuple[str, ...] = (), write_html: bool = True) -> dict:
    """Write ``out/report.md`` (and ``report.html``) with figures in ``out/figures/``.

    Raises:
        ValueError: a root is not a folder, or no training run was found under the roots.
    """
    sources = Sources()
    runs, notes = load_runs(roots, exclude, sources)
    if not runs:
        raise ValueError(f"no training runs (metrics.json next to config.json) under {', '.join(roots)}")
    groups = group_runs(runs)
    rows = summary_rows(groups)
    sets = score_sets(runs, sources)
    figures: list[str] = []

    def figure(fig, name: str, alt: str) -> tuple:
        save_png(fig, mio.join(out, "figures", name))
        figures.append(mio.join(out, "figures", name))
        return ("img", f"figures/{name}", alt)

    zero_shot = "; ".join((f"{s.model}: " if s.model and len(sets) > 1 else "")
                          + (f"{100 * s.zero_shot:.2f}%" if s.zero_shot is not None else NOT_RECORDED)
                          for s in sets) or NOT_RECORDED
    models = sorted({s.model for s in sets if s.model})
    blocks: list[tuple] = [
        ("h1", "mmdp training report"),
        ("p", f"{len(runs)} training run(s) from {', '.join(roots)}, grouped by policy"
              + (" and noise setting" if len({r.noise for r in runs}) > 1 else "")
              + f". Reference CLIP model ({', '.join(models) or NOT_RECORDED}) zero-shot test accuracy: {zero_shot}. "
              "The consistency scores come from this model: read every result against it."),
    ]
    blocks += [("p", "Left out: " + "; ".join(notes) + ".")] if notes else []

    blocks += [("h2", "Final figures"),
               ("table", ["policy", "runs", "final test acc %", "shifted test acc %", "wall s", "samples forwarded",
                          "speedup vs full"],
                [[r["name"], len(r["runs"]), _pct_ms([x.totals.get("final_test_accuracy") for x in r["runs"]]),
                  _pct_ms([x.shifted for x in r["runs"]]) if any(x.shifted is not None for x in r["runs"])
                  else NOT_RECORDED,
                  _fmt_ms(r["wall"], ".1f"), _fmt_ms(r["forwarded"], ",.0f"),
                  f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"] for r in rows]),
               ("p", "Accuracy: the final epoch's, on the clean test split (mean ± std over a policy's runs); "
                     "shifted: the same checkpoint on the benchmark's shifted test copy, when recorded. Wall: the "
                     "whole fit, start-up included. Speedup: full's mean wall-clock / the policy's, on the same "
                     "noise setting."),
               ("h3", "Runs"),
               ("table", ["run", "policy", "seed", "epochs", "keep ratio", "final test acc %", "shifted %", "wall s",
                          "samples forwarded"],
                [[r.label, r.group, r.config.get("seed", "?"), f"{len(r.history)}/{r.config.get('epochs', '?')}",
                  r.config.get("keep_ratio", "?"), _pct(r.totals.get("final_test_accuracy")), _pct(r.shifted),
                  r.totals.get("wall_seconds", "?"), f"{r.totals.get('samples_forwarded', 0):,}"]
                 for rs in groups.values() for r in rs])]

    blocks += [("h2", "Test accuracy per epoch"),
               figure(curves_figure(groups, accuracy_per_epoch, "Test accuracy per epoch (clean test split)",
                                    "test accuracy (%)"), "accuracy.png", "test accuracy per epoch"),
               ("h2", "Kept fraction per epoch"),
               figure(curves_figure(groups, lambda r: kept_per_epoch(r) / max(r.pool_rows, 1),
                                    "Samples trained on per epoch", "kept (% of the train split)",
                                    ylim=(0, 105)),
                      "kept.png", "kept fraction per epoch"),
               ("p", "Kept: the epoch's plan (samples decoded and forwarded) over every row of the dataset's train "
                     "split; rows the score job rejected, or the oracle excluded, are never kept."),
               ("h2", "Wall-clock per policy"),
               figure(wall_figure(rows), "wall.png", "wall-clock per policy")]
    blocks += _reason_blocks(groups, sources)
    blocks += _score_blocks(sets, figure)

    text = to_markdown(blocks)
    mio.write_bytes(text.encode(), mio.join(out, "report.md"))
    written = [mio.join(out, "report.md")]
    if write_html:
        mio.write_bytes(to_html(blocks, "mmdp training report").encode(), mio.join(out, "report.html"))
        written.append(mio.join(out, "report.html"))
    return {"report": written, "figures": figures, "runs": len(runs), "groups": list(groups), "notes": notes}


def _fmt_ms(ms: tuple[float, float], spec: str) -> str:
    mean, std = ms
    if math.isnan(mean):
        return NOT_RECORDED
    return format(mean, spec) + (f" ± {format(std, spec)}" if std else "")


def _reason_blocks(groups: dict[str, list[Run]], sources: Sources) -> list[tuple]:
    per_run = [(r, *pruned_by_reason(r), sources.rejected(r.config.get("scores")))
               for rs in groups.values() for r in rs]
    reasons = sorted({k for _, counts, _, _ in per_run for k in counts}, key=lambda k: (k == NOT_RECORDED, k))
    before = sorted({k for *_, rejected in per_run for k in rejected})
    rows = []
    for r, counts, _, rejected in per_run:
        epochs = len(r.plans) if r.plans else len(r.history)
        rows.append([r.group, r.label, f"{int(np.nansum(kept_per_epoch(r))):,}", f"{sum(counts.values()):,}"]
                    + [f"{counts.get(k, 0):,}" for k in reasons]
                    + [f"{rejected.get(k, 0) * epochs:,}" for k in before])
    blocks = [("h2", "Pruned samples by reason"),
              ("table", ["policy", "run", "trained (sample-epochs)", "pruned by the plans"]
               + [f"reason {k}" if k == NOT_RECORDED else k for k in reasons]
               + [f"excluded before training: {k}" for k in before], rows),
              ("p", "Sums over the epochs of each run: a sample pruned in 3 epochs counts 3. Pruned by the plans = "
                    "scored samples - kept, per epoch, split by the reasons the plans recorded."
                    + (" Excluded before training = rows of the run's score set whose status is not ok (rejected "
                       "by the score job, or left out of the clean oracle's pool), once per epoch." if before else ""))]
    if any(not recorded and counts for _, counts, recorded, _ in per_run):
        blocks.append(("p", f"Reasons were not recorded in these plans (no pruned_by_reason entries): "
                            f"their pruned counts are derived and listed as '{NOT_RECORDED}'."))
    return blocks


def _score_blocks(sets: list[ScoreSet], figure) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Consistency scores and the reference CLIP model")]
    if not sets:
        return blocks + [("p", "The runs' configs name no score set.")]
    blocks.append(("table", ["score set", "CLIP model", "checkpoint", "zero-shot test acc %"],
                   [[s.url, s.model or NOT_RECORDED, s.pretrained or "none (random init or not recorded)",
                     _pct(s.zero_shot) if s.zero_shot is not None else NOT_RECORDED] for s in sets]))
    names = [posixpath.basename(s.url.rstrip("/")) or "scores" for s in sets]
    for i, (s, name) in enumerate(zip(sets, names)):
        tag = name if names.count(name) == 1 else f"{name}-{i}"
        blocks.append(("h3", f"Score set {tag}"))
        if not s.values:
            blocks.append(("p", f"{s.url}: {s.note or 'no scored rows'}."))
            continue
        rejected = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.rejected.items())) or "none"
        auc = (f"AUROC of low consistency for injected noise: {s.auroc:.3f} (1 = every noisy row scores below "
               "every clean one, 0.5 = chance)." if s.auroc is not None else
               "AUROC: undefined (the scored rows are not both clean and noisy).")
        blocks.append(("p", f"{s.url}: {s.rows:,} rows, signal {s.signal}; rejected before training: {rejected}. "
                            + auc + (f" {s.note}." if s.note else "")))
        clean = s.values.get("clean")
        table = []
        for kind, v in s.values.items():
            vs_clean = "n/a"
            if clean is not None and kind != "clean" and len(v) and len(clean):
                vs_clean = f"{auroc(-np.r_[clean, v], np.r_[np.zeros(len(clean), bool), np.ones(len(v), bool)]):.3f}"
            table.append([kind, f"{len(v):,}", f"{np.mean(v):.4f}" if len(v) else "n/a",
                          f"{np.median(v):.4f}" if len(v) else "n/a", vs_clean])
        blocks.append(("table", ["rows", "count", f"mean {s.signal}", f"median {s.signal}", "AUROC vs clean"], table))
        blocks.append(figure(score_histogram(s, tag), f"scores-{_safe(tag)}.png", f"consistency histogram {tag}"))
    return blocks


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
