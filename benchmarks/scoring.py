"""Benchmarks of the scoring half: signal quality (AUROC) and pipeline efficiency.

Signal quality: how well the consistency scores of a score job separate the
rows the dataset job corrupted from the clean ones (ground truth)::

    python -m benchmarks.scoring auroc --data data/fmnist --scores runs/scores

The noise share mmdp estimates, against the truth, on pools built and scored
here (the benchmark pools of ``benchmarks.pruning``, scored in this process
by the score job's own stages, without Ray), in label mode (``clip_margin``)
and caption mode (``clip_score``), with Otsu's cut alone beside it::

    python -m benchmarks.scoring noise-share --clip-pretrained runs/ref-clip/model.pt --seeds 0,1,2

Pipeline efficiency: the Ray Data score job's pairs/s over a bare PyTorch
loop's, same model, batch size, cores and shards, decoding included in both,
measured side by side in one run. Three figures:

- end to end on ``--rows``, every fixed cost on both sides: each runs in a
  fresh process timed from its first import; the bare loop imports torch and
  open_clip, loads the model, reads, decodes and scores; the Ray side is
  what ``python -m jobs.score`` does on a machine with no Ray running
  (imports, Ray's start-up, the scoring actors' start and model load, the
  pipeline, the write and the commit);
- the same with the job submitted to a running Ray (Ray's start-up not
  timed, the rest as above);
- the steady-state rate, from a second, smaller run of ``--base-rows`` on
  the bare and running-cluster sides: ``(rows - base_rows) / (t(rows) -
  t(base_rows))``, which cancels every fixed cost (unreliable where the
  small run is mostly fixed cost).

Beside the end-to-end times, where the CPU went (``cpu_seconds_by_process``):
the bare loop's process, and for the job that starts its own Ray every
process of that Ray, sampled from /proc and grouped (the driver, the
scoring actors, Ray Data's helper actors, Ray's own processes, other
workers). And the host's speed before and after the runs
(``host_probe_seconds``, :func:`benchmarks.hostload.probe`; beside each
time, the host's CPU steal): a host that others slow without steal moves
the ratios, the bare loop's time most.

By default the job runs one scoring actor of one torch thread per core;
``--actors`` sets how many share the cores::

    python -m benchmarks.scoring efficiency --input data/fmnist/train --rows 4000 \\
        --model mmdp-ref --pretrained runs/ref-clip/model.pt
    python -m benchmarks.scoring efficiency --input data/fmnist/train --rows 256 --model ViT-B-32

On a cluster (``efficiency`` measures the node it runs on: it starts its own
Ray there with ``--cpus`` CPUs, so both sides get the same cores)::

    ray job submit --working-dir . -- python -m benchmarks.scoring auroc \\
        --data s3://bucket/fmnist --scores s3://bucket/scores
    ray job submit --working-dir . -- python -m benchmarks.scoring efficiency \\
        --input s3://bucket/fmnist/train --rows 4000

Prints the result as JSON, with the resolved config (also logged) under
``config``. Each command's options are listed below, and by
``python -m benchmarks.scoring COMMAND --help``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from benchmarks.hostload import cpu_ticks, probe, shares
from benchmarks.procmem import CpuSampler, cpu_seconds
from pipeline import storage
from pipeline.cli import HELP, config_parser, connect_ray, option, run_job
from pipeline.report.scores import noise_cut
from pipeline.score import REFERENCE_MODEL
from pipeline.score.quality import auroc


@dataclass(frozen=True)
class AurocConfig:
    """``auroc``: one field per flag."""

    data: str = field(metadata={HELP: "dataset root with ground_truth.parquet"})
    scores: str = field(metadata={HELP: "score job output folder"})


@dataclass(frozen=True)
class NoiseShareConfig:
    """``noise-share``: one field per flag."""

    clip_pretrained: str | None = option(None, "the scoring model's checkpoint (python -m jobs.pretrain_reference_clip's)")
    clip_model: str = option(REFERENCE_MODEL, "open_clip model that scores the pools")
    noise: tuple[str, ...] = option(("symmetric:0.3", "pairflip:0.3", "symmetric:0.5", "caption:0.15", "caption:0.3",
                                     "caption:0.5", "clean"), "comma-separated noise settings of the pools "
                                    "(benchmarks.pruning's; join the kinds of one with +)")
    seeds: tuple[int, ...] = option((0,), "comma-separated noise seeds")
    pool_size: int = option(20_000, "train rows in each pool")
    split_seed: int = option(0, "seed of the reference/pool split: the one the CLIP model's dataset used")
    synthetic: bool = option(False, "the tiny synthetic dataset instead of Fashion-MNIST (tests)")
    batch_size: int = option(1024, "rows per scoring batch")
    threads: int = option(2, "torch threads")


@dataclass(frozen=True)
class EfficiencyConfig:
    """``efficiency``: one field per flag."""

    input: str = field(metadata={HELP: "parquet shards in the data contract"})
    rows: int = option(2000, "rows to score")
    base_rows: int = option(0, "rows of the smaller run for the steady-state rate (0: rows / 4)")
    model: str = option(REFERENCE_MODEL, "open_clip model")
    pretrained: str | None = option(None, "weights; none: random init (fine for speed)")
    batch_size: int = option(256, "batch size of both")
    cpus: int = option(2, "cores for both: torch threads / Ray CPUs")
    actors: int = option(0, "scoring actors of the Ray job, sharing --cpus threads; 0: one per core")
    repeats: int = option(2, "alternating runs of each")
    in_flight_gib: float | None = option(None, "the Ray job's --in-flight-gib; none: the job's default")

    def __post_init__(self):
        if min(self.rows, self.batch_size, self.cpus, self.repeats) < 1:
            raise ValueError("--rows, --batch-size, --cpus and --repeats must be >= 1")
        if not 0 <= self.actors <= self.cpus:
            raise ValueError(f"--actors must be in [0, --cpus], got {self.actors}")
        if not 0 <= self.base_rows < self.rows:
            raise ValueError(f"--base-rows must be in [0, --rows), got {self.base_rows}")


# Subcommand -> (its config, its one-line help, what it runs).
COMMANDS = {
    "auroc": (AurocConfig, "AUROC of clip_score / clip_margin for noisy rows (ground truth), and the noise share mmdp would estimate",
              lambda cfg: signal_quality(cfg.data, cfg.scores)),
    "noise-share": (NoiseShareConfig, "mmdp's estimated noise share against the truth, label and caption mode",
                    lambda cfg: noise_shares(cfg)),
    "efficiency": (EfficiencyConfig, "Ray Data score job vs a bare PyTorch loop, pairs/s",
                   lambda cfg: efficiency(cfg)),
}
PROG = "python -m benchmarks.scoring"


def signal_quality(data: str, scores_url: str) -> dict:
    """AUROC of each score for flagging noisy rows, overall and per corruption kind."""
    import collections

    gt = storage.read_table(storage.join(data, "ground_truth.parquet"), columns=["key", "corruption"])
    scores = storage.read_table(storage.join(scores_url, "scores"))
    for name, table in ((scores_url, scores), (data, gt)):
        if len(set(table.column("key").to_pylist())) != table.num_rows:
            raise ValueError(f"{name}: repeated keys; the scores and the ground truth must match one to one")
    merged = scores.join(gt, keys="key", join_type="inner")
    rejects = storage.read_table(storage.join(scores_url, "rejects")).join(gt, keys="key", join_type="inner")
    corruption = merged.column("corruption").to_numpy(zero_copy_only=False).astype(str)
    noisy = corruption != "none"
    out = {"rows": int(merged.num_rows + rejects.num_rows), "scored": int(merged.num_rows),
           "rejected": int(rejects.num_rows), "noisy_scored": int(noisy.sum()),
           "noise_share_true": round(float(noisy.mean()), 4) if len(noisy) else 0.0}
    for column in ("clip_score", "clip_margin"):
        values = merged.column(column).to_numpy(zero_copy_only=False).astype(float)
        if np.isnan(values).all():
            continue
        # Low consistency flags noise, so the noise score is the negated column.
        out[f"auroc_{column}"] = round(auroc(-values, noisy), 4)
        for kind in sorted(set(corruption) - {"none"}):
            rows = np.isin(corruption, ["none", kind])
            out[f"auroc_{column}_{kind}"] = round(auroc(-values[rows], noisy[rows]), 4)
        # What mmdp's default noise decision makes of this column: its estimated share, and its cut's errors.
        share, excluded = noise_cut(values)
        out[f"noise_share_{column}"] = round(share, 4)
        out[f"noisy_excluded_{column}"] = int((excluded & noisy).sum())
        out[f"clean_excluded_{column}"] = int((excluded & ~noisy).sum())
    out["rejected_by_corruption"] = dict(collections.Counter(rejects.column("corruption").to_pylist()))
    return out


def noise_shares(cfg: NoiseShareConfig) -> dict:
    """Per pool and mode: the true noise share, mmdp's estimate, Otsu's cut alone, the cut's errors, AUROC."""
    from benchmarks.pruning import build_pool, noise_spec
    from pipeline.score.quality import estimate_noise_fraction
    from pipeline.score.scorer import ClipScorer, ImageDecoder

    modes = (("label", "clip_margin"), ("caption", "clip_score"))
    decoder = ImageDecoder(cfg.clip_model, cfg.clip_pretrained)
    scorers = {}  # (mode, (classes, templates)) -> ClipScorer, each model loaded once
    rows = []
    for spec in cfg.noise:
        for seed in cfg.seeds:
            pool = build_pool(cfg.pool_size, noise_spec(spec), seed, cfg.split_seed, cfg.synthetic)
            train = pool.splits["train"]
            corrupted = pool.ground_truth.column("corruption").to_numpy(zero_copy_only=False).astype(str) != "none"
            columns = {name: train.column(name).to_numpy(zero_copy_only=False) for name in train.column_names}
            # The label prompts the score job builds: the pool's metadata.json names its class names and templates.
            prompts = tuple(pool.metadata["classes"]), tuple(pool.metadata.get("templates") or ())
            for mode, _ in modes:
                if (mode, prompts) not in scorers:
                    scorers[mode, prompts] = ClipScorer(cfg.clip_model, cfg.clip_pretrained, mode=mode,
                                                        classes=list(prompts[0]), templates=list(prompts[1]) or None,
                                                        num_threads=cfg.threads)
            scored_batches = {signal: [] for _, signal in modes}
            for i in range(0, train.num_rows, cfg.batch_size):
                decoded = decoder({k: v[i:i + cfg.batch_size] for k, v in columns.items()})  # once, for both modes
                for mode, signal in modes:
                    scored_batches[signal].append(scorers[mode, prompts](decoded)[signal])
            for mode, signal in modes:
                values = np.concatenate(scored_batches[signal]).astype(np.float64)
                # Rows the scorer could not score (a corrupt image) are not the estimate's: counted apart.
                scored = np.isfinite(values)
                values, noisy = values[scored], corrupted[scored]
                share, excluded = noise_cut(values)
                rows.append({"noise": spec, "seed": seed, "mode": mode, "signal": signal, "rows": len(values),
                             "unscored": int((~scored).sum()),
                             "true_share": round(float(noisy.mean()), 4), "estimated_share": round(share, 4),
                             "otsu_share": round(estimate_noise_fraction(values, tail_spreads=None), 4),
                             "noisy_excluded": int((excluded & noisy).sum()),
                             "clean_excluded": int((excluded & ~noisy).sum()),
                             "auroc": round(auroc(-values, noisy), 4) if 0 < noisy.sum() < len(noisy) else None})
                print(f"{spec} seed {seed}, {mode} mode: true share {rows[-1]['true_share']:.3f}, estimated "
                      f"{share:.3f} (Otsu alone {rows[-1]['otsu_share']:.3f})", file=sys.stderr, flush=True)
    return {"pools": rows}


def _subset(input_url: str, rows: int, rows_per_shard: int, folder: str) -> str:
    table = storage.read_table(input_url)
    if table.num_rows < rows:
        raise ValueError(f"{input_url} has {table.num_rows} rows, fewer than the {rows} asked")
    storage.write_shards(table.slice(0, rows), folder, rows_per_shard=rows_per_shard)
    return folder


def bare_loop(input_url: str, model: str, pretrained: str | None, batch_size: int,
              threads: int) -> tuple[int, float, dict]:
    """(pairs, seconds, CPU seconds) of a plain single-process PyTorch loop: import, load the model, read, decode, score.

    Run in a fresh process (``_in_fresh_process``), so it pays for importing
    torch and open_clip as a standalone script does, and as the Ray job's
    scoring actor does in its own new process.
    """
    start = time.perf_counter()
    import torch

    from pipeline.score.scorer import ClipScorer, ImageDecoder
    from pipeline.data.validate import RowValidator

    torch.set_num_threads(threads)
    decoder = ImageDecoder(model, pretrained, pixel_dtype="uint8")
    scorer = ClipScorer(model, pretrained, num_threads=threads)
    validator = RowValidator("caption")
    n = 0
    for file_url in storage.list_files(input_url):
        table = storage.read_table(file_url)
        for start_row in range(0, table.num_rows, batch_size):
            chunk = table.slice(start_row, batch_size)
            batch = {c: np.asarray(chunk.column(c).to_pylist(), dtype=object) for c in chunk.column_names}
            out = scorer(decoder(validator(batch)))
            n += len(out["clip_score"])
    return n, time.perf_counter() - start, {"bare loop": round(cpu_seconds(os.getpid()), 2)}


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a new spawned Python process (nothing imported there yet but this module)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _score_config(input_url: str, output: str, model: str, pretrained: str | None, batch_size: int,
                  cpus: int, actors: int, in_flight_gib: float | None = None):
    """The score job's config: ``actors`` scoring actors share the ``cpus`` cores, ``cpus // actors`` torch threads each.

    Their CPU reservations leave the read tasks one logical CPU (half of
    one on a single core), so the pool does not starve its own input (a
    pool that takes every CPU waits forever); the job's write tasks ask
    none (``WRITE_TASK_CPUS``).
    """
    from pipeline.score.job import ScoreConfig

    return ScoreConfig(input=input_url, output=output, model=model, pretrained=pretrained, batch_size=batch_size,
                       min_actors=actors, max_actors=actors, actor_cpus=(cpus - min(1, cpus / 2)) / actors,
                       torch_threads=max(1, cpus // actors), in_flight_gib=in_flight_gib)


def ray_job(*args) -> tuple[int, float]:
    """(pairs, seconds) of the score job on a running local cluster, from its call to its committed output.

    Scoring actors' start-up and model load included; Ray's own start-up is
    not (a job submitted to a running cluster). ``args``: :func:`_score_config`'s.
    """
    from pipeline.cli import execute
    from pipeline.score.job import score

    start = time.perf_counter()
    summary = execute(_score_config(*args), score)
    return summary["rows_in"], time.perf_counter() - start


def ray_job_cold(input_url: str, output: str, model: str, pretrained: str | None, batch_size: int,
                 cpus: int, actors: int, in_flight_gib: float | None = None) -> tuple[int, float, dict]:
    """(pairs, seconds, CPU seconds by process group) of the score job as a fresh process runs it.

    Imports, Ray's start-up, the job, its commit: run in a fresh process,
    timed from its first import like :func:`bare_loop`, what ``python -m
    jobs.score`` costs on a machine with no Ray running. The CPU time of
    every process of the local Ray it starts is sampled meanwhile
    (:class:`~benchmarks.procmem.CpuSampler`: the driver, the scoring actors,
    Ray Data's helper actors, Ray's own processes, other workers).
    """
    start = time.perf_counter()
    import ray

    from pipeline.cli import connect_ray
    from pipeline.score.job import ScoreConfig

    with CpuSampler() as cpu:
        # As the job starts Ray (ScoreConfig.RAY_DASHBOARD), its workers' logs included.
        connect_ray(address="local", num_cpus=cpus, dashboard=ScoreConfig.RAY_DASHBOARD)
        n, _ = ray_job(input_url, output, model, pretrained, batch_size, cpus, actors, in_flight_gib)
        took = time.perf_counter() - start
    ray.shutdown()
    return n, took, cpu.by_group()


def efficiency(args: EfficiencyConfig) -> dict:
    """Both sides on ``base_rows`` and on ``rows``, alternated; end-to-end and steady-state ratios."""
    import ray

    from pipeline.score.job import ScoreConfig

    base_rows = args.base_rows or max(1, args.rows // 4)
    actors = args.actors or args.cpus
    # Shards of one size for both subsets, so the bigger one only adds shards like them.
    per_shard = max(1, base_rows // 4)
    job = (args.model, args.pretrained, args.batch_size, args.cpus, actors, args.in_flight_gib)
    sides = {"bare": lambda shards, out: _in_fresh_process(bare_loop, shards, args.model, args.pretrained,
                                                           args.batch_size, args.cpus),
             "ray": lambda shards, out: ray_job(shards, out, *job),
             "ray_cold": lambda shards, out: _in_fresh_process(ray_job_cold, shards, out, *job)}
    sizes = {"base": base_rows, "rows": args.rows}
    seconds = {side: {size: [] for size in sizes} for side in sides}
    steal = {side: {size: [] for size in sizes} for side in sides}  # the host's, during each measurement
    cpu = {side: [] for side in ("bare", "ray_cold")}  # CPU seconds by process, each run on --rows
    # The host's speed before and after (a fresh process, as the sides): steal misses a tenant that shares
    # the cores or memory bandwidth, and a slowed host moves the ratios (the bare loop most).
    probes = [_in_fresh_process(probe)]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {size: _subset(args.input, n, per_shard, os.path.join(tmp, f"in-{size}")) for size, n in sizes.items()}
        for i in range(args.repeats):  # alternate, so drift on a shared machine hits both
            for size, asked in sizes.items():
                for side, run in sides.items():
                    if side == "ray_cold" and size == "base":
                        continue  # its fixed cost is the point: end to end only
                    # A Ray of its own on this node, also under `ray job submit`: every side gets the
                    # same --cpus cores; the running cluster is up only while the warm side runs.
                    if side == "ray":
                        connect_ray(address="local", num_cpus=args.cpus, dashboard=ScoreConfig.RAY_DASHBOARD,
                                    log_to_driver=False)
                    ticks = cpu_ticks()
                    n, took, *by_process = run(inputs[size], os.path.join(tmp, f"out-{side}-{size}-{i}"))
                    if by_process and size == "rows":
                        cpu[side].append(by_process[0])
                    steal[side][size].append(shares(ticks, cpu_ticks()).get("steal_pct"))
                    ray.shutdown()
                    if n != asked:
                        raise RuntimeError(f"{side} scored {n} of {asked} rows")
                    seconds[side][size].append(took)
    probes.append(_in_fresh_process(probe))
    median = {side: {size: float(np.median(t)) for size, t in by_size.items() if t} for side, by_size in seconds.items()}
    end_to_end = {side: args.rows / m["rows"] for side, m in median.items()}
    steady = {side: (args.rows - base_rows) / max(m["rows"] - m["base"], 1e-9) for side, m in median.items()
              if "base" in m}
    return {"model": args.model, "rows": args.rows, "base_rows": base_rows, "batch_size": args.batch_size,
            "cpus": args.cpus, "actors": actors, "threads_per_actor": max(1, args.cpus // actors),
            "seconds": {side: {size: [round(x, 4) for x in t] for size, t in by_size.items()}
                        for side, by_size in seconds.items()},
            "host_steal_pct": {side: {size: t for size, t in by_size.items() if t} for side, by_size in steal.items()},
            "cpu_seconds_by_process": cpu, "host_probe_seconds": probes,
            "bare_pairs_per_s": round(end_to_end["bare"], 1), "ray_cold_pairs_per_s": round(end_to_end["ray_cold"], 1),
            "ray_pairs_per_s": round(end_to_end["ray"], 1),
            "ratio_end_to_end": round(end_to_end["ray_cold"] / end_to_end["bare"], 3),
            "ratio_running_cluster": round(end_to_end["ray"] / end_to_end["bare"], 3),
            "bare_steady_pairs_per_s": round(steady["bare"], 1), "ray_steady_pairs_per_s": round(steady["ray"], 1),
            "ratio_steady": round(steady["ray"] / steady["bare"], 3)}


def main(argv=None) -> int:
    """``COMMAND [options]``: the command's config through the job skeleton (:func:`pipeline.cli.run_job`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        commands_parser().parse_args(argv[:1])  # --help, or a usage error (exit code 2)
    name = argv[0]
    config_cls, text, work = COMMANDS[name]
    return run_job(config_cls, argv[1:], lambda cfg: {**work(cfg), "config": {"command": name, **asdict(cfg)}},
                   doc=text, prog=f"{PROG} {name}")


def commands_parser() -> argparse.ArgumentParser:
    """The top level: a command's name; ``--help`` lists every command's options, with their defaults."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=tuple(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    helps = []
    for name, (config_cls, text, _) in COMMANDS.items():
        sub = config_parser(config_cls, text)
        sub.prog = f"{PROG} {name}"
        helps.append(sub.format_help())
    parser.epilog = "\n".join(helps)
    return parser


if __name__ == "__main__":
    sys.exit(main())
