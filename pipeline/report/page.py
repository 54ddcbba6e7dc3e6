"""The report's page: :func:`build_report` writes ``report.md`` (and ``report.html``) with PNG figures beside it.

The page is built as a list of blocks (heading, paragraph, table, image) and
rendered to Markdown and to HTML from the same list, so both say the same.
The data comes from :mod:`pipeline.report.runs`, the figures from
:mod:`pipeline.report.figures`. No Ray here.
"""

from __future__ import annotations

import html
import math
import posixpath

import numpy as np

from pipeline import storage
from pipeline.report.runs import (NOT_RECORDED, Run, Sources, accuracy_per_epoch, experiments, group_runs,
                                  kept_per_epoch, load_runs, pruned_by_reason, reads_setting)
from pipeline.report.scores import ScoreSet, noise_auroc, score_sets
from pipeline.report.figures import curves_figure, save_png, score_histogram, speedup_text, wall_figure

# ---------------------------------------------------------------- numbers


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std of the recorded values (``None`` and NaN skipped); NaNs when there are none."""
    v = np.asarray([x for x in values if not _missing(x)], float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _pct(value) -> str:
    return "n/a" if _missing(value) else f"{100 * value:.2f}"


def _fmt_ms(ms: tuple[float, float], spec: str, scale: float = 1.0, with_std: bool | None = None) -> str:
    """``mean ± std`` of a :func:`mean_std` pair; the std shows when non-zero, unless ``with_std`` says."""
    mean, std = ms
    if math.isnan(mean):
        return NOT_RECORDED
    with_std = bool(std) if with_std is None else with_std
    return format(scale * mean, spec) + (f" ± {format(scale * std, spec)}" if with_std else "")


def _pct_ms(values) -> str:
    # Unlike wall-clock and counts, accuracies of several runs show their std even when it is 0 ("± 0.00").
    return _fmt_ms(mean_std(values), ".2f", 100, sum(v is not None for v in values) > 1)


# ---------------------------------------------------------------- the page


def summary_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """Per group: final accuracy, shifted accuracy, wall-clock and samples forwarded (mean, std), speedup vs full.

    A group is measured against the first complete ``full`` group of its experiment and noise setting, seed
    against seed: where the two ran different seeds (a run left out, or more seeds on one side), on the seeds
    both ran (``paired`` says so), and not at all where they share none.
    """
    rows = [{"name": name, "policy": rs[0].policy, "noise": rs[0].noise, "complete": rs[0].complete,
             "experiment": rs[0].experiment, "runs": rs, "paired": None, **_stats(rs)} for name, rs in groups.items()]
    for row in rows:
        full = [f for f in rows if f["policy"] == "full" and f["noise"] == row["noise"] and f["complete"]
                and f["experiment"] == row["experiment"]]
        full = full[0] if full and row["complete"] else None
        row["baseline"] = full["name"] if full else None
        mine, theirs = row, full
        if full is not None and full is not row:
            seeds, full_seeds = ({r.config.get("seed") for r in g["runs"]} for g in (row, full))
            common = seeds & full_seeds
            if common != seeds or common != full_seeds:
                row["paired"] = f"on the {len(common)} seed(s) both ran" if common else "no seed in common with full"
                row["shared_seeds"] = len(common)
                mine, theirs = (_stats([r for r in g["runs"] if r.config.get("seed") in common]) for g in (row, full))
                theirs = theirs if common else None
        _compare(row, mine, theirs)
    return rows


def _stats(rs: list[Run]) -> dict:
    """Mean and std of a group's wall-clock and training seconds, final accuracy and samples forwarded."""
    return {"wall": mean_std([r.totals.get("wall_seconds") for r in rs]),
            "train": mean_std([r.totals.get("train_seconds") for r in rs]),
            "accuracy": mean_std([r.totals.get("final_test_accuracy") for r in rs]),
            "forwarded": mean_std([r.totals.get("samples_forwarded") for r in rs])}


def _compare(row: dict, mine: dict, full: dict | None) -> None:
    """Sets ``row``'s speed-ups, points and share of passes: ``mine`` (its stats) against ``full``'s (None: none)."""
    for key, name in (("wall", "speedup"), ("train", "train_speedup")):
        ok = full and _positive(full[key][0]) and _positive(mine[key][0])
        row[name] = full[key][0] / mine[key][0] if ok else None
    both = full and _finite(full["accuracy"][0]) and _finite(mine["accuracy"][0])
    row["vs_full"] = 100 * (mine["accuracy"][0] - full["accuracy"][0]) if both else None
    row["forwarded_share"] = (mine["forwarded"][0] / full["forwarded"][0]
                              if full and _positive(full["forwarded"][0]) and _finite(mine["forwarded"][0]) else None)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _positive(value) -> bool:
    return _finite(value) and value > 0


def versus_full(rows: list[dict]) -> list[str]:
    """One sentence per policy measured against ``full`` of its experiment and noise setting: points, speed-up,
    compute (``full`` named by its group where the runs are of several experiments)."""
    lines = []
    full_runs = {r["name"]: r["runs"] for r in rows if r["policy"] == "full"}
    for r in rows:
        if r["policy"] != "full" and r["vs_full"] is None and r["paired"]:
            lines.append(f"{r['name']}: not compared ({r['paired']}).")
        if r["policy"] == "full" or r["vs_full"] is None:
            continue
        speeds = [f"{r['train_speedup']:.2f}x on training time"] if r["train_speedup"] else []
        speeds += [f"{r['speedup']:.2f}x on the whole fit (start-up included)"] if r["speedup"] else []
        share = f", forwarding {100 * r['forwarded_share']:.0f}% of full's samples" if r["forwarded_share"] else ""
        speed = f" at a speed-up of {' and '.join(speeds)}" if speeds else ""
        against = r["baseline"] if r["experiment"] else "full"
        paired = f" ({r['paired']})" if r["paired"] else ""
        restarted = sum(1 for g in (r["runs"], full_runs.get(r["baseline"], [])) for run in g
                        if run.totals.get("restarts"))
        if restarted:  # a restart's lost attempt is in the wall-clock, not in the training time
            paired += f" ({restarted} of the runs restarted after a failure: their wall-clock counts the lost work)"
        lines.append(f"{r['name']}: {r['vs_full']:+.2f} points against {against}{paired}{speed}{share}.")
    return lines


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
    differ, exps = experiments(runs)
    by = ([f"experiment ({len(exps)}, tagged E1-E{len(exps)})"] if exps else []) + ["policy"] + (
        ["noise setting"] if len({r.noise for r in runs}) > 1 else [])
    sets = score_sets(runs, sources)
    # An earlier report's figures go (a score set or task it had and this one has not would leave its figure).
    storage.remove(storage.join(out, "figures"))
    figures: list[str] = []

    def figure(fig, name: str, alt: str) -> tuple:
        figures.append(storage.join(out, "figures", name))
        save_png(fig, figures[-1])
        return ("img", f"figures/{name}", alt)

    zero_shot = "; ".join((f"{s.model}: " if s.model and len(sets) > 1 else "")
                          + (f"{100 * s.zero_shot:.2f}%" if s.zero_shot is not None else NOT_RECORDED)
                          for s in sets) or NOT_RECORDED
    models = sorted({s.model for s in sets if s.model})
    blocks: list[tuple] = [
        ("h1", "mmdp training report"),
        ("p", f"{len(runs)} training run(s) from {', '.join(roots)}, grouped by " + _and(by)
              + f". Reference CLIP model ({', '.join(models) or NOT_RECORDED}) zero-shot test accuracy: {zero_shot}. "
              "The consistency scores come from this model: read every result against it."),
    ]
    blocks += [("p", "Left out: " + "; ".join(notes) + ".")] if notes else []
    blocks += _experiment_blocks(differ, exps)

    blocks += [("h2", "Final figures"),
               ("table", ["policy", "runs", "final test acc %", "shifted test acc %", "wall s", "samples forwarded",
                          "speedup vs full"],
                [[r["name"], len(r["runs"]), _pct_ms([x.totals.get("final_test_accuracy") for x in r["runs"]]),
                  _pct_ms([x.shifted for x in r["runs"]]), _fmt_ms(r["wall"], ".1f"), _fmt_ms(r["forwarded"], ",.0f"),
                  speedup_text(r) or "n/a"] for r in rows]),
               *([("p", " ".join(versus_full(rows)))] if versus_full(rows) else []),
               ("p", "Accuracy: the final epoch's, on the clean test split (mean ± std over a policy's runs; "
                     "zero-shot accuracy for a contrastive run, --task clip); "
                     "shifted: the same checkpoint on the benchmark's shifted test copy, when recorded. Wall: the "
                     "whole fit, start-up included. Speedup: full's mean wall-clock / the policy's, on the same "
                     + ("experiment and " if exps else "") + "noise setting, over the seeds both ran (comparisons "
                     "say where a policy and full ran different seeds). A policy's runs of other settings (keep "
                     "ratio, noise fraction, signal, parameters) are groups of their own, named by them."),
               ("h3", "Runs"),
               ("table", ["run", "policy", "seed", "epochs", "keep ratio", "final test acc %", "shifted %", "wall s",
                          "samples forwarded", "restarts"],
                [[r.label, r.group, r.config.get("seed", "?"), f"{len(r.history)}/{r.config.get('epochs', '?')}",
                  r.config.get("keep_ratio", "?") if reads_setting(r.config.get("policy", ""), "keep_ratio") else "-",
                  _pct(r.totals.get("final_test_accuracy")), _pct(r.shifted),
                  r.totals.get("wall_seconds", "?"), f"{r.totals.get('samples_forwarded', 0):,}",
                  r.totals.get("restarts", 0)]
                 for rs in groups.values() for r in rs])]

    blocks += _recall_blocks(groups, figure)
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
    storage.write_bytes(text.encode(), storage.join(out, "report.md"))
    written = [storage.join(out, "report.md")]
    if write_html:
        storage.write_bytes(to_html(blocks, "mmdp training report").encode(), storage.join(out, "report.html"))
        written.append(storage.join(out, "report.html"))
    elif storage.exists(storage.join(out, "report.html")):
        storage.remove(storage.join(out, "report.html"))  # an earlier report's page: not this report's
    return {"report": written, "figures": figures, "runs": len(runs), "groups": list(groups), "notes": notes}


def _and(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def _experiment_blocks(differ: list[str], exps: list[tuple[str, list[Run], dict]]) -> list[tuple]:
    """Where the runs are of several experiments: what tells them apart, and that they do not compare."""
    if not exps:
        return []
    return [("h2", "Experiments"),
            ("p", f"The runs are of {len(exps)} experiments, which do not compare: each policy is measured against "
                  "the full run(s) of its own experiment (tag in brackets). An experiment is one dataset (apart from "
                  "its seed and noise), one task, number of epochs, model and training settings (workers included), "
                  "and one score mode; policy options and seeds vary within it. These differ:"),
            ("table", ["experiment", "runs", *differ, "run folders"],
             [[tag, len(rs), *(setup[k] for k in differ), _some([r.label for r in rs])] for tag, rs, setup in exps])]


def _some(labels: list[str], most: int = 3) -> str:
    labels = sorted(labels)
    return ", ".join(labels[:most]) + (f", ... ({len(labels)} in all)" if len(labels) > most else "")


def _recall_blocks(groups: dict, figure) -> list[tuple]:
    """Contrastive runs (``--task clip``): their final recall and zero-shot accuracy, and recall per epoch."""
    clip = {name: [r for r in rs if r.history and "i2t_recall@1" in r.history[-1]] for name, rs in groups.items()}
    clip = {name: rs for name, rs in clip.items() if rs}
    if not clip:
        return []
    keys = ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")
    return [("h2", "Retrieval (contrastive runs)"),
            ("table", ["run", "policy", "zero-shot %", *(k.replace("_recall", " R") + " %" for k in keys)],
             [[r.label, r.group, _pct(r.history[-1].get("zero_shot_accuracy")),
               *(_pct(r.history[-1].get(k)) for k in keys)] for rs in clip.values() for r in rs]),
            ("p", "The final epoch's recall on the clean test split, captions compared as text: i2t = an image's "
                  "own caption among its k nearest distinct captions; t2i = a distinct caption's k nearest images "
                  "include one that carries it. Where captions come from a few templates per class, recall@1 "
                  "cannot tell the templates apart (one in as many as there are); recall@5 then reflects the class."),
            figure(curves_figure(clip, lambda r: np.array([h.get("i2t_recall@1", np.nan) for h in r.history], float),
                                 "Image-to-text recall@1 per epoch (clean test split)", "recall@1 (%)"),
                   "recall.png", "image-to-text recall@1 per epoch")]


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
              ("table", ["policy", "run", "kept by the plans (sample-epochs)", "pruned by the plans"]
               + [f"reason {k}" if k == NOT_RECORDED else k for k in reasons]
               + [f"excluded before training: {k}" for k in before], rows),
              ("p", "Sums over the epochs of each run: a sample pruned in 3 epochs counts 3. Pruned by the plans = "
                    "scored samples - kept, per epoch, split by the reasons the plans recorded (a plan keeps a multiple "
                    "of the workers, since Ray Train splits an epoch's rows evenly: the few that would not divide "
                    "are left out at random, under their own reason). The samples a run forwarded are in the runs "
                    "table."
                    + (" Excluded before training = rows in the rejects table of the run's score set (rejected "
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
        blocks.append(("p", f"{s.url}: {s.rows:,} rows scored, signal {s.signal}; rejected before training: {rejected}. "
                            + auc + (f" {s.note}." if s.note else "")))
        clean = s.values.get("clean")
        table = []
        for kind, v in s.values.items():
            vs_clean = "n/a"
            if clean is not None and kind != "clean" and len(v) and len(clean):
                vs_clean = f"{noise_auroc(clean, v):.3f}"
            table.append([kind, f"{len(v):,}", f"{np.mean(v):.4f}" if len(v) else "n/a",
                          f"{np.median(v):.4f}" if len(v) else "n/a", vs_clean])
        blocks.append(("table", ["rows", "count", f"mean {s.signal}", f"median {s.signal}", "AUROC vs clean"], table))
        blocks += _label_cut_blocks(s)
        blocks.append(figure(score_histogram(s, tag), f"scores-{_safe(tag)}.png", f"consistency histogram {tag}"))
    return blocks


def _label_cut_blocks(s) -> list[tuple]:
    """The estimated-noise cut by label: where the reference model's doubts crowd."""
    if not s.by_label:
        return []
    truth = s.by_label[0].noisy is not None
    header = ["label", "rows", "excluded by the cut"] + (
        ["noisy rows", "noisy kept", "clean excluded", "AUROC within the label"] if truth else [])
    rows = []
    for c in s.by_label:
        row = [f"{c.label} {c.name}" if c.name != str(c.label) else c.name, f"{c.rows:,}",
               f"{c.excluded:,} ({100 * c.excluded / c.rows:.1f}%)"]
        if truth:
            row += [f"{c.noisy:,}", f"{c.noisy_kept:,}", f"{c.clean_excluded:,}",
                    f"{c.auroc:.3f}" if c.auroc is not None else "n/a"]
        rows.append(row)
    share = s.cut_fraction
    above = sorted((c for c in s.by_label if c.rows and c.excluded / c.rows > 1.25 * share > 0),
                   key=lambda c: -c.excluded / c.rows)
    text = (f"The estimated-noise cut (the low mode of the {s.signal} histogram, Otsu's cut: what `mmdp` and "
            f"`clip_cut` exclude with --signal auto and no --noise-fraction) takes {100 * share:.1f}% of the "
            "scored rows. ")
    if share == 0:
        text += "The histogram has one mode: no noise is estimated, and nothing is excluded."
    elif above:
        text += ("It takes more than a quarter above that share from "
                 + ", ".join(f"{c.name} ({100 * c.excluded / c.rows:.0f}%)" for c in above[:4])
                 + ": rows the reference model finds closer to another class. Where those are clean, a reference "
                   "model that tells these classes apart better is the lever.")
    else:
        text += "No label loses more than a quarter above that share."
    return [("h3", f"The estimated-noise cut by label ({s.signal})"), ("table", header, rows), ("p", text)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------- blocks -> markdown / html


def to_markdown(blocks: list[tuple]) -> str:
    """The page as Markdown (tables as pipe tables, images linked by their relative path)."""
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "img":
            out += [f"![{rest[1]}]({rest[0]})", ""]
        elif kind == "table":
            out += [markdown_table(*rest), ""]
    return "\n".join(out)


def markdown_table(header, rows) -> str:
    """A Markdown pipe table: one line for ``header``, the rule, one line per row (``|`` in a cell escaped)."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def to_html(blocks: list[tuple], title: str) -> str:
    """The same page as one standalone HTML document (inline style, every text escaped)."""
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
