"""The pruning benchmark's results: per-policy summaries, the targets, the Markdown tables."""

from __future__ import annotations

import numpy as np

from benchmarks.plain_loop import MEASURES
from pipeline.report.page import markdown_table

ORACLE = "oracle"
RECALL = ("i2t_recall@1", "i2t_recall@5", "t2i_recall@1", "t2i_recall@5")
# The baselines that train at a keep ratio the benchmark gives them (mmdp's measured share, by default).
FIXED_RATIO = ("random", "clip_filter", "infobatch_exact")
MATCHED = ("mmdp's measured share of full's sample passes (infobatch_exact: the keep ratio of its pruning epochs "
           "at which its whole run, full-data epochs included, spends that share)")


def noise_tag(noise: str) -> str:
    return "clean" if noise in ("", "none", "clean") else noise.replace(":", "").replace("+", "_")


def summarise(runs: list[dict], noises: list[str], policies: list[str]) -> list[dict]:
    rows = []
    for noise in noises:
        cell = [r for r in runs if r["noise"] == noise]
        full_wall = [r["wall_seconds"] for r in cell if r["policy"] == "full"]
        full_train = [r["train_seconds"] for r in cell if r["policy"] == "full"]
        full_cpu = _mean([r for r in cell if r["policy"] == "full"], "host_cpu_seconds")
        for policy in policies:
            rs = [r for r in cell if r["policy"] == policy]
            if not rs:
                continue
            acc = np.array([r["final_test_accuracy"] for r in rs]) * 100
            shifted = _mean_pct(rs, "shifted_test_accuracy")
            wall = float(np.mean([r["wall_seconds"] for r in rs]))
            train = float(np.mean([r["train_seconds"] for r in rs]))
            cpu, steal = _mean(rs, "host_cpu_seconds"), _mean(rs, "host_steal_pct")
            residual = [r["noisy_in_final_plan"] for r in rs if r.get("noisy_in_final_plan") is not None]
            rows.append({"noise": noise, "policy": policy, "seeds": len(rs),
                         "accuracy_by_seed": {str(r["seed"]): round(100 * r["final_test_accuracy"], 3)
                                              for r in rs if "seed" in r},
                         "accuracy_mean": round(float(acc.mean()), 3),
                         "accuracy_std": round(float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, 3),
                         "shifted_accuracy_mean": shifted,
                         **{f"{k}_mean": _mean_pct(rs, k) for k in RECALL if k in rs[0]},
                         "wall_seconds_mean": round(wall, 2),
                         "train_seconds_mean": round(train, 2),
                         "host_cpu_seconds_mean": None if cpu is None else round(cpu, 1),
                         "host_steal_pct_mean": None if steal is None else round(steal, 1),
                         "noisy_in_final_plan_mean": round(100 * float(np.mean(residual)), 2) if residual else None,
                         "samples_forwarded_mean": int(round(np.mean([r["samples_forwarded"] for r in rs]))),
                         "num_samples": int(rs[0]["num_samples"]),
                         "speedup_vs_full": round(float(np.mean(full_wall)) / wall, 3) if full_wall else None,
                         "train_speedup_vs_full": round(float(np.mean(full_train)) / train, 3) if full_train else None,
                         "cpu_speedup_vs_full": round(full_cpu / cpu, 3) if full_cpu and cpu else None})
    return rows


def _mean(runs: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the runs, if every one has it (a figure older rows may lack); else None."""
    values = [r.get(key) for r in runs]
    return float(np.mean(values)) if values and None not in values else None


def _mean_pct(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(100 * float(np.mean(values)), 3) if values else None


def _targets_for(noise: str, task: str = "classify") -> dict | None:
    """The accuracy and speed targets of a noise setting (the project's targets), None where only reported."""
    if task == "clip":  # the caption-noise protocol: accuracy is zero-shot accuracy, recall image-to-text R@1
        return {"vs_full": 2.0, "recall_vs_full": 2.0, "vs_oracle": -1.0, "train_speedup": 1.4} if noise == "caption:0.3" else None
    if noise_tag(noise) == "clean":
        return {"vs_full": -0.3, "train_speedup": 1.25}
    if noise == "symmetric:0.3":
        return {"vs_full": 1.5, "vs_oracle": -0.5, "train_speedup": 1.4, "wall_speedup": 1.3}
    if noise == "pairflip:0.3":
        return {"vs_full": 1.0, "vs_oracle": -1.0, "train_speedup": 1.3}
    return None


def _per_seed(mine: dict, other: dict) -> str:
    """``; per seed +0.12 / -0.30 / ...``: the paired differences over the seeds both rows ran (one pool each)."""
    a, b = mine.get("accuracy_by_seed") or {}, other.get("accuracy_by_seed") or {}
    shared = sorted(set(a) & set(b), key=int)
    return "; per seed " + " / ".join(f"{a[s] - b[s]:+.2f}" for s in shared) if len(shared) > 1 else ""


def check_targets(summary: list[dict], overhead: dict | None, task: str = "classify") -> list[dict]:
    get = {(r["noise"], r["policy"]): r for r in summary}
    checks = []

    def add(what, value, target, ok):
        checks.append({"what": what, "value": round(value, 3), "target": target, "met": bool(ok)})

    for noise in sorted({r["noise"] for r in summary}):
        if (noise, "mmdp") not in get:
            continue
        mmdp, targets = get[(noise, "mmdp")], _targets_for(noise, task)
        acc = mmdp["accuracy_mean"]
        if targets and (noise, "full") in get:
            d = acc - get[(noise, "full")]["accuracy_mean"]
            add(f"{noise}: mmdp - full (points)", d, f">= {targets['vs_full']:+}", d >= targets["vs_full"])
            if "recall_vs_full" in targets:
                d = mmdp["i2t_recall@1_mean"] - get[(noise, "full")]["i2t_recall@1_mean"]
                add(f"{noise}: mmdp - full (image-to-text recall@1, points)", d, f">= {targets['recall_vs_full']:+}",
                    d >= targets["recall_vs_full"])
            s = mmdp["train_speedup_vs_full"]
            add(f"{noise}: mmdp speedup over full (training time)", s, f">= {targets['train_speedup']}",
                s >= targets["train_speedup"])
            if "wall_speedup" in targets:
                s = mmdp["speedup_vs_full"]
                add(f"{noise}: mmdp speedup over full (whole fit)", s, f">= {targets['wall_speedup']}",
                    s >= targets["wall_speedup"])
        if targets and "vs_oracle" in targets and (noise, ORACLE) in get:
            d = acc - get[(noise, ORACLE)]["accuracy_mean"]
            add(f"{noise}: mmdp - clean oracle (points)", d, f">= {targets['vs_oracle']}", d >= targets["vs_oracle"])
        if noise_tag(noise) == "clean":
            continue
        for base in ("infobatch", "infobatch_exact", "trajectory", "clip_filter", "clip_cut", "random"):
            if (noise, base) in get:
                other = get[(noise, base)]
                d = acc - other["accuracy_mean"]
                # Equal compute within the keep ratio's rounding for the fixed-ratio baselines (run at mmdp's
                # own share); the others spend what their rules spend.
                slack = 1.001 if base in FIXED_RATIO else 1.0
                cheaper = mmdp["samples_forwarded_mean"] <= slack * other["samples_forwarded_mean"]
                add(f"{noise}: mmdp - {base} (points{_per_seed(mmdp, other)}; samples forwarded "
                    f"{mmdp['samples_forwarded_mean']} vs {other['samples_forwarded_mean']}"
                    f"{'' if cheaper else ': mmdp forwards more'})", d, "> 0 at <= its compute", d > 0 and cheaper)
    if overhead:
        add("machinery overhead (full via pruner / plain loop, wall)", overhead["ratio"]["wall"], "<= 1.05",
            overhead["ratio"]["wall"] <= 1.05)
    return checks


def markdown(result: dict) -> str:
    s = result["setup"]
    if s.get("task") == "clip":
        return _clip_markdown(result)
    zero_shot = s.get("clip_zero_shot_accuracy")
    lines = [f"# Pruning benchmark ({'synthetic' if s['synthetic'] else 'Fashion-MNIST'})", "",
             f"Pool {s['pool_size']} rows, {s['epochs']} epochs, mmdp budget {s['keep_ratio']} of full's sample passes, "
             f"fixed-ratio baselines (random, clip_filter, infobatch_exact) at "
             f"{s['baseline_keep_ratio'] or MATCHED}, {s['workers']} workers, "
             f"step schedule {s['step_schedule']}, "
             f"model {s['model']} (width {s['width']}), seeds {s['seeds']}, scores: {s['clip_model']} "
             f"{s['clip_pretrained'] or '(random init)'} in {s['mode']} mode"
             + (f", CLIP zero-shot test accuracy {zero_shot:.4f}" if zero_shot else "")
             + f". Machine: {s['machine']}." + (f" Code: {s['code']}." if s.get("code") else ""), "",
             "Accuracy is the final epoch's, on the clean test split; shifted = the same checkpoint on a deterministic "
             "shifted copy (rotation, shift, blur, Gaussian noise). Wall = the whole fit (Ray Train start-up, the "
             f"test evaluation every {s.get('eval_every', 1)} epochs and checkpoints every {s.get('checkpoint_every', 1)} "
             "(and after the last) included); train = the epochs' training time alone (each epoch's planning "
             "included). Samples forwarded include mmdp's probes (weight 0), if it probes. Speedups = full's mean / the policy's. Noisy in plan = share of ground-truth noisy rows in "
             "the last epoch's plan, replayed from the final checkpoint's pruner state. trajectory uses clean data the "
             "others do not: a known-clean reference set of 1% of the pool, drawn from the ground truth's clean rows.",
             "", *_host_load(result)]
    lines += _policy_tables(result, "test acc % (mean ± std)", (("shifted acc %", "shifted_accuracy_mean"),))
    return "\n".join(lines + _overhead_and_targets(result))


SLOWED = 1.25  # a fit is flagged when its probe took this many times the table's median


def _host_load(result: dict) -> list[str]:
    """A paragraph on the host's CPU steal during the fits (benchmarks.hostload), if it was measured."""
    runs = [r for r in result["runs"] if "host_steal_pct" in r and not r.get("same_as")]
    if not runs:
        return []
    spread, highest = _spread(runs, "host_steal_pct")
    return [f"Host CPU steal (time the hypervisor gave other tenants) during the {len(runs)} fits measured here: "
            f"{spread} ({highest}). CPU s = the machine's busy CPU seconds during the whole fit, all "
            "cores summed (/proc/stat; stolen time is not in it, as it is in wall time), with the fits' mean steal.",
            *_plain_line(runs), *_probe_line(runs), ""]


def _plain_line(runs: list[dict]) -> list[str]:
    """The plain-priority CPU share during the fits (benchmarks.hostload.shares' plain_pct), if it was measured."""
    timed = [r for r in runs if "host_plain_pct" in r]
    if not timed:
        return []
    spread, highest = _spread(timed, "host_plain_pct")
    return [f"Plain-priority CPU during the fits (user time at nice <= 0: the driver's, Ray's daemons' and any "
            f"other process's; Ray runs its workers at nice 15, so a plain process beside a fit is served first): "
            f"{spread} of the machine's time ({highest})."]


def _spread(runs: list[dict], key: str) -> tuple[str, str]:
    """A percent per fit across ``runs``: ("mean M%, LO% to HI%", "highest: <the fit with HI>")."""
    values = [r[key] for r in runs]
    worst = max(runs, key=lambda r: r[key])
    return (f"mean {np.mean(values):.1f}%, {min(values):.1f}% to {max(values):.1f}%",
            f"highest: {worst['noise']} seed {worst['seed']} {worst['policy']}")


def _probe_line(runs: list[dict]) -> list[str]:
    """The host speed probe (benchmarks.hostload.probe) around the fits: its range, and the fits it found slowed."""
    timed = [r for r in runs if r.get("host_probe_seconds")]
    if not timed:
        return []
    slowest = {id(r): max(r["host_probe_seconds"]) for r in timed}
    median = float(np.median([t for r in timed for t in r["host_probe_seconds"]]))
    slowed = [f"{r['noise']} seed {r['seed']} {r['policy']} ({slowest[id(r)] / median:.2f}x)"
              for r in timed if slowest[id(r)] > SLOWED * median]
    return [f"A fixed torch workload (one thread) timed before and after each fit took {median:.2f} s at the median, "
            f"{min(min(r['host_probe_seconds']) for r in timed):.2f} to {max(slowest.values()):.2f} s; fits with a "
            f"time above {SLOWED}x the median: {', '.join(slowed) or 'none'}."]


def _policy_tables(result: dict, accuracy: str, columns: tuple[tuple[str, str], ...]) -> list[str]:
    """One table per noise setting, a row per policy: accuracy, the ``columns`` (header, summary key), costs."""
    lines = []
    for noise in result["noise_settings"]:
        rows = []
        for r in (r for r in result["summary"] if r["noise"] == noise):
            cpu = r.get("cpu_speedup_vs_full")
            speed = (f"{r['speedup_vs_full']:.2f}x / {r['train_speedup_vs_full']:.2f}x / "
                     f"{f'{cpu:.2f}x' if cpu else 'n/a'}" if r["speedup_vs_full"] else "n/a")
            noisy = "n/a" if r.get("noisy_in_final_plan_mean") is None else f"{r['noisy_in_final_plan_mean']:.1f}"
            host = r.get("host_cpu_seconds_mean")
            host = "n/a" if host is None else f"{host:.0f} ({r['host_steal_pct_mean']:.0f}%)"
            rows.append((r["policy"], f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
                         *(f"{r[key]:.2f}" for _, key in columns), f"{r['wall_seconds_mean']:.1f}",
                         f"{r['train_seconds_mean']:.1f}", host, speed, r["samples_forwarded_mean"],
                         r["num_samples"], noisy))
        lines += [f"## noise: {noise}", "",
                  markdown_table(("policy", accuracy, *(header for header, _ in columns), "wall s", "train s",
                                  "CPU s (steal)", "speedup vs full (wall / train / CPU)", "samples forwarded",
                                  "rows trained on", "noisy in plan %"), rows), ""]
    return lines


def _overhead_and_targets(result: dict) -> list[str]:
    lines = []
    o = result.get("overhead")
    if o:
        sec = o["seconds"]
        lines += ["## machinery overhead", "",
                  f"Policy full through the pruner vs a plain Ray Train loop (same model, data, batch, workers), "
                  f"{o['epochs']} epochs, alternated A B B A, "
                  f"{'each fit a Ray job of its own' if o.get('fresh_jobs') else 'all fits in one Ray job'}. "
                  f"Both evaluate every {result['setup'].get('eval_every', 1)} epochs and checkpoint every "
                  f"{result['setup'].get('checkpoint_every', 1)} (and after the last). "
                  "Wall = the whole fit, epoch = the loops' epochs (training + evaluation), train = training "
                  "alone, split on rank 0 into input (waiting for batches; first_input: in the first epoch) "
                  "and step (forward, backward, optimiser); cpu = the host's busy CPU seconds during the fit "
                  "(all cores; stolen time not in it)."
                  + (f" Host CPU steal per fit: pruner {o['host_steal_pct']['pruner']}%, plain "
                     f"{o['host_steal_pct']['plain']}%." if o.get("host_steal_pct") else ""), "",
                  markdown_table(("measure", "pruner s", "plain s", "ratio"),
                                 [(m, sec[m]["pruner"], sec[m]["plain"], o["ratio"][m])
                                  for m in MEASURES if m in sec]),
                  ""]
    if result["targets"]:
        lines += ["## targets", "",
                  markdown_table(("check", "value", "target", "met"),
                                 [(c["what"], c["value"], c["target"], "yes" if c["met"] else "NO")
                                  for c in result["targets"]]),
                  ""]
    return lines


def _clip_markdown(result: dict) -> str:
    """The caption-noise protocol's tables: zero-shot accuracy and recall instead of accuracy and shift."""
    s = result["setup"]
    zero_shot = s.get("clip_zero_shot_accuracy")
    lines = [f"# Pruning benchmark, contrastive task ({'synthetic' if s['synthetic'] else 'Fashion-MNIST'} "
             "image-caption pairs)", "",
             f"Pool {s['pool_size']} pairs, {s['epochs']} epochs of open_clip {s['model']} trained "
             f"from scratch (jobs.train --task clip), mmdp budget {s['keep_ratio']} of full's sample passes, "
             f"fixed-ratio baselines at {s['baseline_keep_ratio'] or MATCHED}, {s['workers']} workers, "
             f"batch {s['batch_size']} per worker, step schedule {s['step_schedule']}, seeds {s['seeds']}; "
             f"scores: {s['clip_model']} {s['clip_pretrained'] or '(random init)'} in {s['mode']} mode"
             + (f" (its zero-shot test accuracy {zero_shot:.4f})" if zero_shot else "")
             + f". Machine: {s['machine']}." + (f" Code: {s['code']}." if s.get("code") else ""), "",
             "Zero-shot = the final model's zero-shot accuracy on the clean test split (class prompt ensembles); "
             "R@1 = recall@1 on the test split, image-to-text and text-to-image, captions compared as text. "
             f"Wall = the whole fit (evaluation every {s.get('eval_every', 1)} epochs and after the last included); "
             "train = the epochs' training time. Samples forwarded include mmdp's probes, if any.",
             "", *_host_load(result)]
    lines += _policy_tables(result, "zero-shot % (mean ± std)",
                            (("i2t R@1 %", "i2t_recall@1_mean"), ("t2i R@1 %", "t2i_recall@1_mean")))
    return "\n".join(lines + _overhead_and_targets(result))


