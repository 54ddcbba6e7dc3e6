"""jobs.report on real files in the jobs' formats: a tiny dataset, a score set, three short runs.

No Ray and no training: the runs' metrics and plans are written by hand in the
train job's format, with numbers chosen so the report's figures are known exactly.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from PIL import Image

from jobs import report
from pipeline.data import reference as datasets
from pipeline import storage
from pipeline.data.contract import KEY, REJECTS_SCHEMA, SCORES_SCHEMA

EPOCHS = 3


def write_scores(data: str, url: str, checkpoint: str) -> tuple[int, int]:
    """Scores where every clean row beats every noisy one but one; returns (clean, noisy) counts."""
    gt = storage.read_table(storage.join(data, "ground_truth.parquet"))
    keys = sorted(gt.column(KEY).to_pylist())
    noisy = dict(zip(gt.column(KEY).to_pylist(), (c != "none" for c in gt.column("corruption").to_pylist())))
    rng = np.random.default_rng(0)
    margin = np.array([rng.uniform(-0.6, -0.1) if noisy[k] else rng.uniform(0.1, 0.6) for k in keys], np.float32)
    first_noisy = next(i for i, k in enumerate(keys) if noisy[k])
    margin[first_noisy] = 0.9  # above every clean row: AUROC = (noisy - 1) / noisy
    n = len(keys)
    table = pa.table({KEY: keys, "index": np.arange(n), "clip_score": margin + 0.2, "clip_margin": margin,
                      "status": ["ok"] * n, "error": [None] * n}, schema=SCORES_SCHEMA)
    storage.write_shards(table, storage.join(url, "scores"))
    rejects = pa.table({KEY: ["dup-a", "dup-b"], "reason": ["duplicate key"] * 2}, schema=REJECTS_SCHEMA)
    storage.write_table(rejects, storage.join(url, "rejects", "part-00000.parquet"))
    storage.write_json({"rows_in": n + 2, "scored": n, "rejected": 2}, storage.join(url, "summary.json"))
    storage.write_json({"model": "mmdp-tiny", "pretrained": checkpoint, "mode": "label", "output": url},
                       storage.join(url, "config.json"))
    n_noisy = sum(noisy.values())
    return n - n_noisy, n_noisy


def write_run(url: str, data: str, scores: str, policy: str, seed: int, accuracy: list[float], wall: float,
              kept: list[int], num_samples: int, reasons: list[dict] | None = None, **config) -> None:
    """A run folder as ``jobs.train`` writes it: config.json, metrics.json, plans.json (``config``: more fields)."""
    storage.write_json({"data": data, "scores": scores, "out": url, "policy": policy, "seed": seed,
                    "epochs": len(accuracy), "keep_ratio": 0.5, **config}, storage.join(url, "config.json"))
    history = [{"epoch": e, "test_accuracy": a, "samples_forwarded": k, "epoch_seconds": 1.0, "train_seconds": 0.8}
               for e, (a, k) in enumerate(zip(accuracy, kept))]
    totals = {"epochs": len(accuracy), "wall_seconds": wall, "samples_forwarded": sum(kept),
              "final_test_accuracy": accuracy[-1], "num_samples": num_samples, "signal": "clip_margin"}
    storage.write_json({"epochs": history, "totals": totals}, storage.join(url, "metrics.json"))
    plans = [{"epoch": e, "kept": k} for e, k in enumerate(kept)]
    for plan, by_reason in zip(plans, reasons or []):
        plan["pruned_by_reason"] = by_reason
    storage.write_json(plans, storage.join(url, "plans.json"))


def make_bench(root: str) -> dict:
    """Two RUN_DIRs over one dataset and score set: full + mmdp (seed 0), and mmdp (seed 1)."""
    data, scores = storage.join(root, "data"), storage.join(root, "scores")
    datasets.write_dataset(datasets.make_synthetic(n=48, seed=0, noise="symmetric:0.25"), data)
    checkpoint = storage.join(root, "clip", "model.pt")
    # The reference pre-training's folder as jobs.pretrain_reference_clip writes it: metrics.json beside config.json.
    storage.write_json({"checkpoint": checkpoint, "zero_shot_accuracy": 0.777, "loss_per_epoch": [3.0]},
                       storage.join(root, "clip", "metrics.json"))
    storage.write_json({"data": data, "epochs": 1, "out": storage.join(root, "clip")},
                       storage.join(root, "clip", "config.json"))
    clean, noisy = write_scores(data, scores, checkpoint)
    n = clean + noisy
    a, b = storage.join(root, "seed0"), storage.join(root, "seed1")
    write_run(storage.join(a, "full"), data, scores, "full", 0, [0.5, 0.7, 0.80], 100.0, [n] * EPOCHS, n)
    half = n // 2
    reasons = [{"low consistency": 5, "well learned (low loss)": n - half - 5}] * EPOCHS
    write_run(storage.join(a, "mmdp"), data, scores, "mmdp", 0, [0.6, 0.8, 0.84], 50.0, [half] * EPOCHS, n, reasons)
    write_run(storage.join(b, "mmdp"), data, scores, "mmdp", 1, [0.6, 0.8, 0.86], 60.0, [half] * EPOCHS, n, reasons)
    return {"a": a, "b": b, "n": n, "half": half, "noisy": noisy, "out": storage.join(root, "report")}


def tables(text: str) -> list[list[dict]]:
    """The Markdown tables of a page, each as a list of {header: cell} rows."""
    out, header = [], None
    for line in text.splitlines() + [""]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
        elif header is None:
            header = cells
            out.append([])
        elif set(line) - set("|- "):
            out[-1].append(dict(zip(header, cells)))
    return out


def row(text: str, column: str, value: str) -> dict:
    """The first table row whose ``column`` reads ``value``."""
    return next(r for t in tables(text) for r in t if r.get(column) == value)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_report_compares_policies_across_run_dirs(where, tmp_path, request):
    bench = make_bench(str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket"))
    assert report.main([bench["a"], bench["b"], "--out", bench["out"]]) == 0
    text = storage.read_bytes(storage.join(bench["out"], "report.md")).decode()

    # Final figures: one row per policy; mmdp's two seeds as mean ± sample std. full ran seed 0 only, so mmdp
    # is measured against it on seed 0 alone (84 against 80 points, 100 s / 50 s), and says so.
    final = {r["policy"]: r for r in tables(text)[0]}
    assert list(final) == ["full", "mmdp"]
    assert final["full"]["runs"] == "1" and final["full"]["final test acc %"] == "80.00"
    assert final["full"]["speedup vs full"] == "1.00x"
    assert final["mmdp"]["runs"] == "2" and final["mmdp"]["final test acc %"] == "85.00 ± 1.41"
    assert final["mmdp"]["wall s"] == "55.0 ± 7.1" and final["mmdp"]["speedup vs full"] == "2.00x (1 shared seed)"
    # ... and in words: by how much, at what speed-up and compute (train time is not in these runs' totals).
    share = 100 * bench["half"] / bench["n"]
    assert (f"mmdp: +4.00 points against full (on the 1 seed(s) both ran) at a speed-up of 2.00x on the whole "
            f"fit (start-up included), forwarding {share:.0f}% of full's samples.") in text
    for label, acc in (("seed0/full", "80.00"), ("seed0/mmdp", "84.00"), ("seed1/mmdp", "86.00")):
        assert row(text, "run", label)["final test acc %"] == acc  # every run, labelled by its RUN_DIR

    # Pruned by reason: per run, summed over the epochs.
    reasons = next(t for t in tables(text) if t and "low consistency" in t[0])
    by_run = {r["run"]: r for r in reasons}
    assert by_run["seed0/mmdp"]["pruned by the plans"] == f"{(bench['n'] - bench['half']) * EPOCHS:,}"
    assert by_run["seed0/mmdp"]["low consistency"] == f"{5 * EPOCHS:,}"
    assert by_run["seed0/full"]["pruned by the plans"] == "0"
    # The score set's rejects table: rows kept out of every run before training, once per epoch.
    assert by_run["seed0/full"]["excluded before training: duplicate key"] == f"{2 * EPOCHS:,}"
    assert f"{bench['n']:,} rows scored, signal clip_margin; rejected before training: duplicate key: 2." in text

    # Consistency: the histogram's AUROC, from the one noisy row placed above every clean row.
    k = bench["noisy"]
    assert f"AUROC of low consistency for injected noise: {(k - 1) / k:.3f}" in text
    assert "77.70" in text  # the reference CLIP's zero-shot accuracy, read beside its checkpoint
    assert storage.is_complete(bench["out"])

    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert {"figures/accuracy.png", "figures/kept.png", "figures/wall.png"} <= set(figures) and len(figures) == 4
    for rel in figures:
        png = storage.read_bytes(storage.join(bench["out"], rel))
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] >= 700 and im.size[1] >= 300 and len(png) > 10_000
    page = storage.read_bytes(storage.join(bench["out"], "report.html")).decode()
    assert '<img src="figures/accuracy.png"' in page and "85.00 ± 1.41" in page
    # Rewritten without the page: the earlier one goes, and the folder's manifest does not name it; so does
    # a figure of the earlier report that this one does not draw (a score set it had and this one has not).
    storage.write_bytes(b"an earlier report's figure", storage.join(bench["out"], "figures", "scores-gone.png"))
    assert report.main([bench["a"], "--out", bench["out"], "--no-html"]) == 0
    assert not storage.exists(storage.join(bench["out"], "report.html"))
    fs, path = storage.filesystem_for(storage.join(bench["out"], "figures"))
    drawn = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))
    assert drawn == sorted(f.split("/")[1] for f in figures)
    assert "report.html" not in storage.read_json(storage.join(bench["out"], "_SUCCESS"))["files"]


def test_policies_are_measured_against_full_seed_against_seed(tmp_path):
    """A policy's run of a seed left out (pending, failed) compared one seed's mean with full's of six: the
    report said mmdp 1.4x faster where, on the seed they share, it was slower."""
    bench = make_bench(str(tmp_path))
    data, scores = str(tmp_path / "data"), str(tmp_path / "scores")
    # full on seed 1 too: every seed paired, no note.
    write_run(storage.join(bench["b"], "full"), data, scores, "full", 1, [0.5, 0.7, 0.82], 80.0,
              [bench["n"]] * EPOCHS, bench["n"])
    assert report.main([bench["a"], bench["b"], "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    assert final_figures(text)["mmdp"]["speedup vs full"] == "1.64x"  # 90 s / 55 s
    assert "mmdp: +4.00 points against full at a speed-up of 1.64x" in text  # 85 against 81 points
    # A third seed of mmdp alone, slow and poor: measured on the two seeds full ran.
    write_run(storage.join(str(tmp_path), "seed2", "mmdp"), data, scores, "mmdp", 2, [0.1, 0.1, 0.1], 500.0,
              [bench["half"]] * EPOCHS, bench["n"])
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    # The row's means are of its three runs; its speed-up, of the two seeds full ran, says so.
    assert final_figures(text)["mmdp"]["speedup vs full"] == "1.64x (2 shared seeds)"
    assert "mmdp: +4.00 points against full (on the 2 seed(s) both ran) at a speed-up of 1.64x" in text
    # No seed in common: no comparison.
    storage.remove(storage.join(bench["a"], "mmdp"))
    storage.remove(storage.join(bench["b"], "mmdp"))
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    assert final_figures(text)["mmdp"]["speedup vs full"] == "n/a"
    assert "mmdp: not compared (no seed in common with full)." in text and "mmdp: +" not in text


def test_runs_of_one_policy_with_other_settings_are_groups_of_their_own(tmp_path):
    """Two mmdp runs at keep ratios 0.5 and 0.3 were averaged into one group, whose figures neither run gave."""
    bench = make_bench(str(tmp_path))
    data, scores = str(tmp_path / "data"), str(tmp_path / "scores")
    write_run(storage.join(bench["a"], "mmdp-k03"), data, scores, "mmdp", 0, [0.5, 0.6, 0.70], 30.0,
              [bench["half"]] * EPOCHS, bench["n"], keep_ratio=0.3)
    # The benchmark's fixed-ratio baselines get mmdp's measured share of each seed: one group, even across a
    # rounding boundary; and full, which reads no keep ratio, is one group whatever its runs recorded.
    for seed, keep in ((0, 0.6049), (1, 0.6051)):
        write_run(storage.join(str(tmp_path), f"seed{seed}", "random"), data, scores, "random", seed,
                  [0.5, 0.6, 0.75], 55.0, [bench["half"]] * EPOCHS, bench["n"], keep_ratio=keep)
    write_run(storage.join(bench["b"], "full"), data, scores, "full", 1, [0.5, 0.7, 0.80], 100.0,
              [bench["n"]] * EPOCHS, bench["n"], keep_ratio=0.9)
    assert report.main([bench["a"], bench["b"], "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    final = {r["policy"]: r for r in tables(text)[0]}
    assert sorted(final) == ["full", "mmdp (keep 0.30)", "mmdp (keep 0.50)", "random"]
    assert final["full"]["runs"] == "2"
    assert final["mmdp (keep 0.30)"]["runs"] == "1" and final["mmdp (keep 0.30)"]["final test acc %"] == "70.00"
    assert final["mmdp (keep 0.50)"]["runs"] == "2" and final["random"]["runs"] == "2"
    assert "mmdp (keep 0.30): -10.00 points against full" in text


def test_a_recorded_relative_path_is_rebased_only_where_the_job_ran_on_this_disk():
    from pipeline.report.runs import recorded_path

    assert recorded_path("runs/demo/data", "/home/me/runs/demo/runs/mmdp", "runs/demo/runs/mmdp") == \
        "/home/me/runs/demo/data"
    assert recorded_path("runs/demo/data", "runs/demo/runs/mmdp", "runs/demo/runs/mmdp") == "runs/demo/data"
    assert recorded_path("runs/demo/data", "/elsewhere/mmdp", "runs/demo/runs/mmdp") == "runs/demo/data"  # moved
    # Copied to a bucket: the job's disk is not there (and "s3:/b/..." is no URL).
    assert recorded_path("runs/demo/data", "s3://b/x/runs/demo/runs/mmdp", "runs/demo/runs/mmdp") == "runs/demo/data"
    assert recorded_path("s3://b/data", "/x/runs/mmdp", "runs/mmdp") == "s3://b/data"
    assert recorded_path("/abs/data", "/x/runs/mmdp", "runs/mmdp") == "/abs/data"


def test_paths_a_job_recorded_relative_to_where_it_ran_are_read_from_there(tmp_path, monkeypatch):
    """jobs.demo --out runs/demo records runs/demo/data, runs/demo/scores and runs/demo/clip/model.pt: a report
    made from another folder lost the score set, the zero-shot accuracy and the noise, unsaid."""
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    bench = make_bench("bench")  # every path recorded relative to tmp_path/job
    assert storage.read_json("bench/seed0/mmdp/config.json")["scores"] == "bench/scores"
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "report")
    assert report.main([str(tmp_path / "job" / bench["a"]), "--out", out, "--no-html"]) == 0
    text = open(f"{out}/report.md").read()
    assert "AUROC of low consistency for injected noise" in text and "77.70" in text, text
    assert "scores not readable" not in text and "not recorded" not in text.split("## ")[0]


def test_report_splits_the_estimated_noise_cut_by_label(tmp_path):
    """Where the cut falls, by label: every noisy row but one scores below every clean one (write_scores), so
    the cut excludes exactly the noisy rows but that one, which stays in its label as the one noisy row kept."""
    bench = make_bench(str(tmp_path))
    assert report.main([bench["a"], "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    gt = storage.read_table(str(tmp_path / "data" / "ground_truth.parquet"))
    keys, labels = gt.column(KEY).to_pylist(), gt.column("label").to_pylist()
    noisy = [c != "none" for c in gt.column("corruption").to_pylist()]
    first_noisy = sorted(k for k, bad in zip(keys, noisy) if bad)[0]
    classes = storage.read_json(str(tmp_path / "data" / "metadata.json"))["classes"]
    n, n_noisy = len(keys), sum(noisy)
    assert f"takes {100 * (n_noisy - 1) / n:.1f}% of the scored rows" in text
    by_label = next(t for t in tables(text) if t and "excluded by the cut" in t[0])
    assert len(by_label) == len(set(labels))
    for label in sorted(set(labels)):
        mine = [(k, bad) for k, bad, lab in zip(keys, noisy, labels) if lab == label]
        bad = sum(b for _, b in mine)
        kept = int(any(k == first_noisy for k, _ in mine))
        r = row(text, "label", f"{label} {classes[label]}")
        assert r["rows"] == str(len(mine)) and r["noisy rows"] == str(bad)
        assert r["excluded by the cut"] == f"{bad - kept} ({100 * (bad - kept) / len(mine):.1f}%)"
        assert (r["noisy kept"], r["clean excluded"]) == (str(kept), "0")
        if 0 < bad < len(mine):  # one noisy row above every clean one: (bad - 1) / bad of the pairs ordered
            assert r["AUROC within the label"] == f"{(bad - kept) / bad:.3f}"
        else:
            assert r["AUROC within the label"] == "n/a"


def test_the_report_reads_the_signal_a_train_run_s_auto_reads(tmp_path):
    """Label-mode scores whose margin most rows lack (no label): training's --signal auto reads clip_score, and
    so does the report's cut, which read the margin wherever any row had one."""
    bench = make_bench(str(tmp_path))
    url = str(tmp_path / "scores" / "scores")
    table = storage.read_table(url)
    margin = table.column("clip_margin").to_numpy().copy()
    margin[: int(0.6 * len(margin))] = np.nan
    storage.write_shards(table.set_column(table.schema.get_field_index("clip_margin"), "clip_margin",
                                          pa.array(margin, pa.float32())), url)
    assert report.main([bench["a"], "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    assert "signal clip_score" in text and "The estimated-noise cut by label (clip_score)" in text
    assert "clip_margin" not in text


def test_a_folder_with_the_reference_pretraining_reports_its_runs_and_notes_only_what_is_not_a_run(tmp_path):
    bench = make_bench(str(tmp_path))
    # A folder that looks like a run (metrics.json beside config.json) but whose metrics are no train job's.
    storage.write_json({"loss": 1.0}, str(tmp_path / "odd" / "metrics.json"))
    storage.write_json({"policy": "full"}, str(tmp_path / "odd" / "config.json"))
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    assert [r["run"] for r in tables(text)[1]] == ["seed0/full", "seed0/mmdp", "seed1/mmdp"]
    # The clip/ folder is described through its zero-shot accuracy, not listed as a run left out.
    left_out = [line for line in text.splitlines() if line.startswith("Left out: ")]
    assert left_out == [f"Left out: {tmp_path / 'odd'}: metrics.json is not a train job's (no epochs/totals); skipped."]
    assert "77.70" in text


def test_missing_optional_pieces_read_as_not_recorded(tmp_path):
    # A run whose score set, dataset, plans and CLIP metrics are all gone still gets its row.
    run = str(tmp_path / "lonely" / "run")
    write_run(run, str(tmp_path / "gone-data"), str(tmp_path / "gone-scores"), "random", 0, [0.4, 0.5], 10.0,
              [5, 5], 10)
    (tmp_path / "lonely" / "run" / "plans.json").unlink()
    out = str(tmp_path / "lonely-report")
    assert report.main([str(tmp_path / "lonely"), "--out", out, "--no-html"]) == 0
    text = open(f"{out}/report.md").read()
    assert row(text, "policy", "random")["final test acc %"] == "50.00"
    assert "zero-shot test accuracy: not recorded" in text and row(text, "run", "run")["shifted %"] == "n/a"
    # No plan log: pruned is derived from the metrics' per-epoch counts, its reasons unknown.
    reasons = next(t for t in tables(text) if t and "pruned by the plans" in t[0])
    assert reasons[0]["reason not recorded"] == "10" and "Reasons were not recorded" in text
    assert not storage.exists(f"{out}/report.html")


def test_bad_run_dirs_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert f"no finished training run (metrics.json next to config.json) under {empty}" in capsys.readouterr().err
    assert not storage.exists(str(empty / "report"))
    # Refused before --out is touched: an earlier report there stays committed, and the message says what
    # the folders hold (it was marked pending, then "no training runs").
    earlier = str(tmp_path / "earlier-report")
    with storage.output(earlier):
        storage.write_json({"run_dirs": ["x"]}, storage.join(earlier, "config.json"))
    storage.begin_output(str(empty / "run"))
    storage.write_json({"policy": "mmdp"}, str(empty / "run" / "config.json"))
    assert report.main([str(empty), "--out", earlier]) == 2
    assert ": folders 1 not committed (still running, or stopped)" in capsys.readouterr().err
    assert storage.is_complete(earlier)
    for argv in ([str(tmp_path / "missing")], []):
        with pytest.raises(SystemExit) as exc:
            report.main(argv)
        assert exc.value.code == 2
    assert "no such folder" in capsys.readouterr().err
    assert not storage.exists(str(tmp_path / "missing"))


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_run_dir_that_is_a_file_exits_2(store, tmp_path, request, capsys):
    root = str(tmp_path) if store == "local" else request.getfixturevalue("s3_bucket")
    metrics = storage.join(root, "runs/mmdp/metrics.json")
    storage.write_json({"epochs": []}, metrics)
    with pytest.raises(SystemExit) as exc:
        report.main([metrics])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{metrics}: a file, not a folder" in err and "Traceback" not in err
    assert not storage.exists(storage.join(root, "runs/mmdp/metrics.json/report"))  # refused before any output


def final_figures(text: str) -> dict[str, dict]:
    """The Final figures table, by group name."""
    return {r["policy"]: r for r in next(t for t in tables(text) if t and "speedup vs full" in t[0])}


def left_out(text: str) -> list[str]:
    """The notes of the "Left out:" paragraph, one per folder."""
    lines = [line for line in text.splitlines() if line.startswith("Left out: ")]
    return lines[0][len("Left out: "):].rstrip(".").split("; ") if lines else []


def test_runs_of_other_experiments_are_tagged_and_measured_against_their_own_full(tmp_path):
    """The README's two flows under one RUN_DIR: runs of another dataset and epochs, and a run of another task,
    are no more runs of the same policies: each experiment's policies against its own full, never averaged."""
    bench = make_bench(str(tmp_path))  # E1: seed0/{full,mmdp}, seed1/mmdp: 3 epochs on 24 train rows
    small = str(tmp_path / "small")  # E2: another dataset (32 train rows), 2 epochs
    data = storage.join(small, "data")
    datasets.write_dataset(datasets.make_synthetic(n=64, seed=0, noise="symmetric:0.25"), data)
    clean, noisy = write_scores(data, storage.join(small, "scores"), str(tmp_path / "clip" / "model.pt"))
    n = clean + noisy
    write_run(storage.join(small, "full"), data, storage.join(small, "scores"), "full", 0, [0.3, 0.4], 40.0,
              [n, n], n)
    write_run(storage.join(small, "mmdp"), data, storage.join(small, "scores"), "mmdp", 0, [0.5, 0.6], 20.0,
              [n // 2] * 2, n)
    # E3: the first experiment's data, epochs and score set, but another task (and no full of its own).
    write_run(str(tmp_path / "task-clip" / "mmdp"), str(tmp_path / "data"), str(tmp_path / "scores"), "mmdp", 0,
              [0.2, 0.3, 0.4], 30.0, [bench["half"]] * EPOCHS, bench["n"], task="clip")
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()

    final = final_figures(text)
    assert list(final) == ["full [E1]", "mmdp [E1]", "full [E2]", "mmdp [E2]", "mmdp [E3]"]
    assert (final["full [E1]"]["runs"], final["full [E1]"]["final test acc %"]) == ("1", "80.00")
    assert (final["mmdp [E1]"]["runs"], final["mmdp [E1]"]["final test acc %"]) == ("2", "85.00 ± 1.41")
    assert final["mmdp [E1]"]["speedup vs full"] == "2.00x (1 shared seed)"  # 100 s / 50 s on seed 0: not E2's full
    assert (final["full [E2]"]["runs"], final["full [E2]"]["final test acc %"]) == ("1", "40.00")
    assert final["mmdp [E2]"]["speedup vs full"] == "2.00x"
    assert final["mmdp [E3]"]["speedup vs full"] == "n/a"  # no full of its own task: nothing to compare with
    share = 100 * bench["half"] / bench["n"]
    assert (f"mmdp [E1]: +4.00 points against full [E1] (on the 1 seed(s) both ran) at a speed-up of 2.00x on the "
            f"whole fit (start-up included), forwarding {share:.0f}% of full's samples.") in text
    assert "mmdp [E2]: +20.00 points against full [E2] at a speed-up of 2.00x" in text
    assert "mmdp [E3]:" not in text
    assert row(text, "run", "small/full")["policy"] == "full [E2]"
    assert row(text, "run", "seed1/mmdp")["policy"] == "mmdp [E1]"

    # What tells the experiments apart: the settings that differ, and where their runs are.
    experiments = next(t for t in tables(text) if t and "experiment" in t[0])
    assert list(experiments[0]) == ["experiment", "runs", "data", "task", "epochs", "run folders"]
    assert [list(r.values())[:5] for r in experiments] == [
        ["E1", "3", f"synthetic ({bench['n']} train rows)", "classify", "3"],
        ["E2", "2", f"synthetic ({n} train rows)", "classify", "2"],
        ["E3", "1", f"synthetic ({bench['n']} train rows)", "clip", "3"]]
    assert experiments[1]["run folders"] == "small/full, small/mmdp"


def test_seeds_drawn_as_datasets_of_their_own_stay_one_experiment(tmp_path):
    """jobs.demo --seed and the pruning benchmark draw a dataset per seed: the same dataset apart from its seed,
    so runs over those seeds still average, as they do over one dataset."""
    accuracy = {"full": [0.5, 0.6], "mmdp": [0.6, 0.7]}
    for seed in (0, 1):
        root = tmp_path / f"seed{seed}"
        data = str(root / "data")
        datasets.write_dataset(datasets.make_synthetic(n=48, seed=seed, noise="symmetric:0.25"), data)
        write_scores(data, str(root / "scores"), str(root / "clip" / "model.pt"))
        for policy, acc in accuracy.items():
            # Seed 1's runs record a flag that seed 0's (an older mmdp's) did not, at its default: the same setup.
            write_run(str(root / "runs" / policy), data, str(root / "scores"), policy, seed,
                      [acc[0], acc[1] + 0.02 * seed], 50.0 if policy == "full" else 25.0, [10, 10], 24,
                      **({"checkpoint_every": 1, "eval_every": 1} if seed else {}))
    out = str(tmp_path / "report")
    assert report.main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--out", out, "--no-html"]) == 0
    text = open(f"{out}/report.md").read()
    final = final_figures(text)
    assert list(final) == ["full", "mmdp"] and final["mmdp"]["runs"] == "2"
    assert final["mmdp"]["final test acc %"] == "71.00 ± 1.41" and final["mmdp"]["speedup vs full"] == "2.00x"
    assert "mmdp: +10.00 points against full" in text and "## Experiments" not in text


def test_the_default_excludes_leave_out_the_benchmarks_timing_runs_at_any_depth(tmp_path):
    """Reporting on the folder above a pruning benchmark: its warm-up and overhead fits are no extra full runs."""
    bench = make_bench(str(tmp_path / "bench"))
    data, scores = str(tmp_path / "bench" / "data"), str(tmp_path / "bench" / "scores")
    n = bench["n"]
    for folder in ("warmup", "overhead/full-0", "overhead/full-1"):
        write_run(str(tmp_path / "bench" / folder), data, scores, "full", 0, [0.1, 0.1, 0.1], 10.0, [n] * EPOCHS, n)
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    final = final_figures(text)
    assert final["full"]["runs"] == "1" and final["full"]["final test acc %"] == "80.00"
    assert final["mmdp"]["speedup vs full"] == "2.00x (1 shared seed)"  # the timing runs' full is not its baseline
    assert left_out(text) == [f"{tmp_path / 'bench' / folder}: excluded by --exclude"
                              for folder in ("overhead/full-0", "overhead/full-1", "warmup")]


def test_unfinished_run_folders_are_left_out_and_named(tmp_path):
    """A jobs.train rerun into a finished folder rewrites config.json at its start and metrics.json at its end:
    while it runs (or after it died) the folder pairs the new config with the old metrics. It is left out as
    pending, like a run's config.json with no metrics.json yet; other jobs' unfinished outputs are no runs."""
    bench = make_bench(str(tmp_path))
    data, scores, n = str(tmp_path / "data"), str(tmp_path / "scores"), bench["n"]
    storage.write_json({"files": ["config.json", "metrics.json", "plans.json"]},
                       str(tmp_path / "seed0" / "full" / "_SUCCESS"))  # committed: reported
    # seed0/mmdp rerun as policy random: the new config, the old run's metrics, the writer's pending mark.
    storage.begin_output(str(tmp_path / "seed0" / "mmdp"))
    storage.write_json({"data": data, "scores": scores, "policy": "random", "seed": 0, "epochs": EPOCHS,
                        "keep_ratio": 0.5}, str(tmp_path / "seed0" / "mmdp" / "config.json"))
    # A first run stopped before writing its metrics (pending), and one whose metrics are gone (not marked).
    for folder, pending in (("first", True), ("gone", False)):
        write_run(str(tmp_path / folder), data, scores, "infobatch", 0, [0.5] * EPOCHS, 9.0, [n] * EPOCHS, n)
        (tmp_path / folder / "metrics.json").unlink()
        if pending:
            storage.begin_output(str(tmp_path / folder))
    # Another job's output being written (a score set) is no training run: not named.
    storage.begin_output(str(tmp_path / "scores-next"))
    storage.write_json({"model": "mmdp-tiny", "mode": "label"}, str(tmp_path / "scores-next" / "config.json"))
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    final = final_figures(text)
    assert list(final) == ["full", "mmdp"] and final["mmdp"]["runs"] == "1"  # seed1/mmdp only
    assert final["mmdp"]["final test acc %"] == "86.00" and "random" not in final
    assert [r["run"] for r in tables(text)[1]] == ["seed0/full", "seed1/mmdp"]
    notes = left_out(text)
    assert len(notes) == 3
    pending = ("not finished: pending (not committed by its training job, still running or stopped: "
               "a metrics.json there may be an earlier run's)")
    assert notes[0] == f"{tmp_path / 'first'}: {pending}"
    assert notes[1] == (f"{tmp_path / 'gone'}: not finished: a training run's config.json with no metrics.json "
                        "(still running, or stopped)")
    assert notes[2] == f"{tmp_path / 'seed0' / 'mmdp'}: {pending}"


def test_run_dirs_that_overlap_count_each_run_once(tmp_path):
    """`jobs.report runs runs/demo` (README's own example) read the runs under both twice: "2 runs" of one full
    run, at a spread of 0.00."""
    bench = make_bench(str(tmp_path))
    for roots in ([str(tmp_path), bench["a"]], [bench["a"], bench["a"] + "/", bench["b"]]):
        assert report.main([*roots, "--out", bench["out"], "--no-html"]) == 0
        final = final_figures(open(f"{bench['out']}/report.md").read())
        assert final["full"]["runs"] == "1" and final["mmdp"]["runs"] == "2", roots


def test_an_output_folder_holding_another_jobs_output_is_refused_before_it_is_touched(tmp_path, capsys):
    """`jobs.report RUN_DIR --out RUN_DIR/runs/mmdp` marked the training run pending and replaced its
    config.json with the report's: the run then read as "unknown", and no reader took it."""
    bench = make_bench(str(tmp_path))
    run = storage.join(bench["a"], "mmdp")
    with storage.output(run):
        pass  # committed, as jobs.train leaves it
    config = storage.read_json(storage.join(run, "config.json"))
    assert report.main([str(tmp_path), "--out", run]) == 2
    err = capsys.readouterr().err
    assert f"{run}: holds another job's output (its config.json has " in err and "choose another" in err
    assert storage.is_complete(run) and storage.read_json(storage.join(run, "config.json")) == config
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0  # a report's own folder: rewritten
    assert report.main([str(tmp_path), "--out", bench["out"], "--no-html"]) == 0


def test_curves_of_runs_evaluated_every_few_epochs_are_drawn_through_the_evaluated_epochs():
    """With --eval-every 5 the epochs between are NaN: matplotlib broke the line at each, leaving lone markers
    and no band."""
    from types import SimpleNamespace

    from pipeline.report.figures import curves_figure

    nan = float("nan")
    runs = [SimpleNamespace(policy="mmdp", experiment="", noise="clean", curve=np.array(c)) for c in
            ([nan, nan, nan, nan, 0.6, nan, nan, nan, nan, 0.8], [nan, nan, nan, nan, 0.7, nan, nan, nan, nan, 0.9])]
    fig = curves_figure({"mmdp": runs}, lambda r: r.curve, "accuracy", "%")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [5, 10] and np.allclose(line.get_ydata(), [65.0, 85.0])
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    assert np.isfinite(band).all() and band[:, 1].max() > 85.0  # the std band over both evaluated epochs


def test_a_restarted_run_is_marked_where_its_wall_clock_enters_a_comparison(tmp_path):
    """A restart's lost attempt is in the run's wall-clock, not its training time: the two speed-ups disagreed,
    unexplained."""
    bench = make_bench(str(tmp_path))
    metrics_url = storage.join(bench["a"], "mmdp", "metrics.json")
    metrics = storage.read_json(metrics_url)
    metrics["totals"]["restarts"] = 1
    storage.write_json(metrics, metrics_url)
    assert report.main([bench["a"], "--out", bench["out"], "--no-html"]) == 0
    text = open(f"{bench['out']}/report.md").read()
    assert row(text, "run", "mmdp")["restarts"] == "1" and row(text, "run", "full")["restarts"] == "0"
    assert "(1 of the runs restarted after a failure: their wall-clock counts the lost work)" in text


def test_every_policy_has_a_colour_of_its_own_in_the_figures():
    from pipeline.prune.policies import POLICIES
    from pipeline.report.figures import _colour

    names = [*POLICIES, "oracle"]
    assert len({_colour(p) for p in names}) == len(names)  # trajectory shared random's
    assert _colour("my_rule") not in {_colour(p) for p in names}


def test_a_benchmark_runs_shifted_accuracy_is_read_beside_it_from_any_folder_above(tmp_path):
    """The shifted-test accuracy lives in the benchmark's results.json, read at a RUN_DIR's top level by the
    path the benchmark ran under: a report on the folder above the benchmark, or on a moved one, showed n/a."""
    bench = make_bench(str(tmp_path / "moved" / "bench"))
    for run, shifted in ((storage.join(bench["a"], "full"), 0.55), (storage.join(bench["a"], "mmdp"), 0.61)):
        storage.write_json({"policy": "x", "shifted_test_accuracy": shifted}, storage.join(run, "run.json"))
    assert report.main([str(tmp_path), "--out", str(tmp_path / "report"), "--no-html"]) == 0
    text = open(tmp_path / "report" / "report.md").read()
    final = final_figures(text)
    assert final["full"]["shifted test acc %"] == "55.00"
    assert final["mmdp"]["shifted test acc %"] == "61.00"  # seed 1 has no row: the mean of the one it has
