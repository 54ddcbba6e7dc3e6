"""Benchmark of the pruning half in the reference protocol (its targets: BENCHMARKS.md), in one invocation.

For each noise setting and seed: build the pool (Fashion-MNIST, 20k train
rows), score it once with the reference CLIP model, then train every policy
(``full``, ``mmdp``, ``infobatch``, ``infobatch_exact``, ``trajectory``,
``clip_cut``, ``clip_filter``, ``random``) and the clean oracle (``full`` on
the pool's truly clean rows only) with the same model, epochs, workers and
schedule. ``trajectory`` gets a known-clean reference set of 1% of the pool
from the ground truth (clean data that the other policies do not get).
A seed picks the same rows to corrupt whatever the noise kind, so the
oracle, which trains on the untouched rest with their true labels, gives
the same figures in the symmetric and pair-flip tables of one seed.
The fixed-ratio baselines (``random``, ``clip_filter``, ``infobatch_exact``)
train at mmdp's measured compute in the same cell, so every comparison is at
equal samples forwarded (``infobatch_exact`` keeps less in its pruning epochs
to pay for its full-data last epochs); the others spend what their rules spend. Each run's final checkpoint is also evaluated
on a deterministic shifted copy of the test split (noise, blur, rotation,
shift). Last, the machinery overhead: policy ``full`` through the pruner
against a plain Ray Train loop without it, alternated side by side.

Local (Ray starts here with 2 CPUs; about 7 hours on 2 idle cores for the 108 runs of the defaults:
3-4 min a run; `--reuse` resumes a stopped invocation from its committed runs)::

    python -m benchmarks.pruning --out runs/bench --clip-pretrained runs/ref-clip/model.pt

A quick end-to-end check (about 5 minutes)::

    python -m benchmarks.pruning --out /tmp/bench-small --pool-size 2000 --epochs 2 --seeds 0 \\
        --noise symmetric:0.3 --policies full,mmdp,oracle --clip-pretrained runs/ref-clip/model.pt

On a cluster::

    ray job submit --working-dir . -- python -m benchmarks.pruning --out s3://bucket/bench \\
        --clip-pretrained s3://bucket/ref-clip/model.pt --workers 4

Writes ``OUT/config.json`` (the resolved config, also logged),
``OUT/results.json`` (every run, the summaries, the overhead, the setup with
the options) and ``OUT/results.md`` (the tables), then commits ``OUT``;
``--reuse`` resumes a stopped benchmark from the committed runs, datasets
and scores already in ``OUT``: those of the same code (its commit), flags and
reference checkpoint; any other run is trained again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa

from benchmarks.hostload import cpu_ticks, probe, shares
from benchmarks.plain_loop import measure_overhead
from benchmarks.pruning_eval import (SHIFT, SHIFT_SEED, evaluate_checkpoint, final_plan_noise, write_oracle_scores,
                                     write_reference_keys)
from benchmarks.pruning_tables import FIXED_RATIO, ORACLE, check_targets, markdown, noise_tag, summarise
from pipeline import storage
from pipeline.cli import HELP, connect_ray, execute, option, run_job
from pipeline.data import reference
from pipeline.data.noise import parse_noise_spec, stream_rng
from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.prune.policies import is_annealing, make_policy, reads
from pipeline.score import REFERENCE_MODEL

# Run order in a cell: mmdp before the fixed-ratio baselines, which run at its measured compute.
POLICIES = ("full", "mmdp", "infobatch", "infobatch_exact", "trajectory", "clip_cut", "clip_filter", "random")
# A run's table row, written beside its outputs once evaluated; with --reuse it stands for the whole run,
# so a stopped table resumes from these small files alone (checkpoints and plans need not be kept).
RUN_SUMMARY = "run.json"


@dataclass(frozen=True)
class BenchPruningConfig:
    """The benchmark's knobs; one field per command-line flag."""

    OUTPUT: ClassVar[str] = "out"

    out: str = field(metadata={HELP: "benchmark folder: data/, scores/, runs/, results.json, results.md"})
    pool_size: int = option(20_000, "train rows in each pool")
    epochs: int = option(20, "training epochs")
    seeds: tuple[int, ...] = option((0, 1, 2), "comma-separated seeds (noise draw, model, plans)")
    noise: tuple[str, ...] = option(("symmetric:0.3", "pairflip:0.3", "clean", "symmetric:0.5"),
                                    "comma-separated noise settings; join the kinds of one setting with +, "
                                    "e.g. symmetric:0.2+caption:0.05")
    policies: tuple[str, ...] = option((*POLICIES, ORACLE), "policies to train, and oracle")
    keep_ratio: float = option(DEFAULT_KEEP_RATIO, "mmdp's --keep-ratio (jobs.train's default): the budget, share of "
                                                   "full's sample passes a pruning epoch spends at most")
    baseline_keep_ratio: float | None = option(
        None, "keep ratio of random, clip_filter and infobatch_exact; none = mmdp's measured share of full's "
              "sample passes in the same cell (equal compute)")
    step_schedule: str = option("full", "steps per epoch of every run (jobs.train --step-schedule)", choices=("full", "batch"))
    workers: int = option(2, "Ray Train workers")
    task: str = option("classify", "jobs.train --task: classify (the reference protocol) or clip (the caption-noise "
                                   "protocol: an open_clip model trained on the pool's image-caption pairs)",
                       choices=("classify", "clip"))
    model: str | None = option(None, "the model trained (jobs.train --model; default: the task's)")
    width: int = option(8, "classifier width (0 = the model's default)")
    batch_size: int = option(128, "samples per step per worker")
    lr: float | None = option(None, "peak learning rate (default: the task's)")
    warmup_steps: int = option(50, "linear warm-up steps")
    # The protocol's figure is the final epoch's accuracy: evaluating and checkpointing every epoch is work
    # that pruning does not shrink (about 1.5 s an epoch on 2 cores), which would hide part of its saving.
    eval_every: int = option(5, "evaluate every run on the test split every this many epochs, and after the last "
                                "(jobs.train --eval-every; the overhead's plain loop too)")
    checkpoint_every: int = option(5, "checkpoint every this many epochs, and after the last "
                                      "(jobs.train --checkpoint-every; the overhead's plain loop too)")
    clip_model: str = option(REFERENCE_MODEL, "open_clip model that scores the pools")
    clip_pretrained: str | None = option(None, "its checkpoint (OUT/model.pt of python -m jobs.pretrain_reference_clip)")
    mode: str = option("label", "score against label prompts (gives clip_margin) or captions",
                       choices=("label", "caption"))
    split_seed: int = option(0, "seed of the reference/pool split: the one the CLIP model's dataset used")
    synthetic: bool = option(False, "the tiny synthetic dataset instead of Fashion-MNIST (tests)")
    score_actors: int = option(1, "most scoring actors")
    score_actor_cpus: float = option(1.0, "CPUs each scoring actor reserves")
    cpus: float = option(2, "CPUs of the local Ray instance (not used under a cluster)")
    warmup: bool = option(True, "an unmeasured one-epoch fit before the first measured one")
    skip_overhead: bool = option(False, "skip the machinery overhead measurement")
    overhead_repeats: int = option(2, "runs of each side in the overhead measurement")
    reuse: bool = option(False, "keep datasets, scores and runs already in --out (resume); a run of other code "
                                "(commit), flags or reference checkpoint is trained again")

    def __post_init__(self):
        # Normalised here, so the config logged and saved is the one that runs.
        from pipeline.train.config import TASK_DEFAULTS

        for name in ("model", "lr"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, TASK_DEFAULTS[self.task][name])
        noise = []
        for part in self.noise:
            spec = noise_spec(part)
            try:
                parse_noise_spec(spec)
            except ValueError as exc:
                raise ValueError(f"--noise: {exc}") from None
            noise.append("clean" if spec == "none" else part)
        object.__setattr__(self, "noise", tuple(noise))
        unknown = set(self.policies) - {*POLICIES, ORACLE}
        if unknown or not self.policies:
            raise ValueError(f"--policies: unknown {sorted(unknown)}; choose from {', '.join((*POLICIES, ORACLE))}")
        # The oracle runs last in a cell so that, on a pool with no noisy row, it can reuse full's run.
        object.__setattr__(self, "policies", tuple(p for p in (*POLICIES, ORACLE) if p in self.policies))
        if not self.seeds or not self.noise:
            raise ValueError("--seeds and --noise need at least one value")
        if self.pool_size < 8 or self.epochs < 1 or self.workers < 1 or not 0 < self.keep_ratio <= 1:
            raise ValueError("need --pool-size >= 8, --epochs >= 1, --workers >= 1 and 0 < --keep-ratio <= 1")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("--eval-every and --checkpoint-every must be >= 1")
        if self.task == "clip" and not self.skip_overhead:
            raise ValueError("the overhead measurement compares the classifier's loops; with --task clip pass "
                             "--skip-overhead")
        if self.baseline_keep_ratio is not None and not 0 < self.baseline_keep_ratio <= 1:
            raise ValueError("need 0 < --baseline-keep-ratio <= 1")


# ---------------------------------------------------------------- data and scores


def noise_spec(setting: str) -> str:
    """A ``--noise`` setting (``clean``, or kinds joined by ``+``) as a noise spec (``none``, or kinds joined by ``,``)."""
    return "none" if setting in ("clean", "none") else setting.replace("+", ",")


@functools.lru_cache(maxsize=1)
def _fashion_mnist():
    return reference.load_fashion_mnist()


def build_pool(pool_size: int, noise: str, seed: int, split_seed: int, synthetic: bool) -> reference.Dataset:
    """The pool of one (noise, seed) cell.

    The noise draw follows ``seed``, but the reference/pool split stays that of
    ``split_seed``: the reference CLIP model was pre-trained on that split's
    ``reference`` rows, which must never land in the pool being pruned.
    """
    if synthetic:
        return reference.make_synthetic(n=2 * pool_size, seed=seed, noise=noise)
    raw = _fashion_mnist()
    images, labels = raw["train"]
    # build_dataset splits by a permutation seeded with `seed` (from
    # stream_rng); reorder the source so that permutation picks
    # split_seed's reference and pool images.
    perm = np.arange(len(labels))
    if seed != split_seed:
        run_order = stream_rng(seed, "split").permutation(len(labels))
        perm[run_order] = stream_rng(split_seed, "split").permutation(len(labels))
    ds = reference.build_dataset(
        (images[perm], labels[perm]), raw["test"], reference.FASHION_MNIST_CLASSES, reference_size=10_000,
        noise=noise, seed=seed, limit=pool_size, pairflip=reference.FASHION_MNIST_PAIRFLIP,
        name="fashion-mnist", source=reference.FASHION_MNIST_DIR,
    )
    gt = ds.ground_truth
    source = pa.array(perm[gt.column("source_index").to_numpy()], pa.int64())
    gt = gt.set_column(gt.schema.get_field_index("source_index"), "source_index", source)
    return dataclasses.replace(ds, ground_truth=gt, metadata={**ds.metadata, "split_seed": split_seed})


def prepare_data(url: str, cfg: BenchPruningConfig, noise: str, seed: int) -> str:
    if not (cfg.reuse and storage.is_complete(url)):
        ds = build_pool(cfg.pool_size, noise, seed, cfg.split_seed, cfg.synthetic)
        with storage.output(url):
            reference.write_dataset(ds, url, rows_per_shard=max(64, math.ceil(cfg.pool_size / 8)))
    return url


def prepare_scores(url: str, data: str, cfg: BenchPruningConfig) -> str:
    from pipeline.score.job import ScoreConfig, score

    if not (cfg.reuse and storage.is_complete(url)):
        execute(ScoreConfig(input=storage.join(data, "train"), output=url, model=cfg.clip_model,
                            pretrained=cfg.clip_pretrained, mode=cfg.mode, batch_size=256, min_actors=1,
                            max_actors=cfg.score_actors, actor_cpus=cfg.score_actor_cpus,
                            torch_threads=max(1, int(cfg.cpus))), score)
    return url


# ---------------------------------------------------------------- runs


def train_config(cfg: BenchPruningConfig, data: str, scores: str, out: str, policy: str, seed: int,
                 keep_ratio: float | None = None):
    from pipeline.train.config import TrainConfig

    reference_keys = None
    if policy == "trajectory":  # its known-clean reference: 1% of the pool, from the ground truth
        reference_keys = out.rstrip("/") + ".reference-keys.txt"  # beside the run folder
        if not storage.exists(reference_keys):
            write_reference_keys(data, reference_keys, seed)
    policy = "full" if policy == ORACLE else policy
    budget = (keep_ratio or cfg.keep_ratio) if reads(policy, "keep_ratio") else None  # the others read none
    return TrainConfig(data=data, scores=scores, out=out, policy=policy, keep_ratio=budget, epochs=cfg.epochs,
                       workers=cfg.workers, seed=seed,
                       task=cfg.task, model=cfg.model, width=cfg.width, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, step_schedule=cfg.step_schedule, reference_keys=reference_keys,
                       eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every)


def train(train_cfg) -> dict:
    """One training run as ``jobs.train`` runs it: its folder gets config.json and is committed."""
    from pipeline.train.driver import fit

    return execute(train_cfg, fit)


@functools.cache
def code_version() -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files), or None outside a git
    checkout (a cluster job's working directory): what a kept row must have been run with."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                              text=True, timeout=30, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def run_settings(train_cfg, root: str) -> dict:
    """The training config a run was asked for (a TrainConfig, or the dict of its config.json), its paths under
    the benchmark folder ``root`` written from it (``OUT/...``: a moved or copied benchmark keeps its rows):
    what must match for a row to be kept."""
    fields = train_cfg if isinstance(train_cfg, dict) else dataclasses.asdict(train_cfg)
    prefix = root.rstrip("/") + "/"
    settings = {k: ("OUT/" + v[len(prefix):] if isinstance(v, str) and v.startswith(prefix) else v)
                for k, v in fields.items()}
    return json.loads(json.dumps(settings))  # as run.json and config.json hold them (tuples as lists)


def run_policy(cfg: BenchPruningConfig, data: str, scores: str, out: str, policy: str, seed: int,
               keep_ratio: float | None = None, clip_digest: str | None = None, before_fit=None) -> dict:
    """One policy's run and its table row: kept (``--reuse``, the same code, settings and reference checkpoint),
    evaluated from a kept fit, or trained (``before_fit()`` first, the benchmark's warm-up) and evaluated."""
    train_cfg = train_config(cfg, data, scores, out, policy, seed, keep_ratio)
    settings = run_settings(train_cfg, cfg.out)
    kept = kept_row(out, clip_digest, settings) if cfg.reuse else None
    if kept is not None:  # finished and evaluated with this code, settings and reference model: its row resumes it
        return {**kept, "out": out, "reused": True}
    reused = cfg.reuse and fit_matches(out, settings, cfg.out)
    host = {}
    if reused:
        metrics = storage.read_json(storage.join(out, "metrics.json"))
    else:
        if before_fit is not None:
            before_fit()
        storage.write_bytes(str(code_version()).encode(), _fit_code(out))  # beside the run folder, which the fit replaces
        speed = probe()  # the host's speed before and after the fit: a slowed host shows in these
        before = cpu_ticks()
        metrics = train(train_cfg)
        host = shares(before, cpu_ticks())  # the host's CPU time during the fit: steal = other tenants'
        host["probe_seconds"] = [speed, probe()]
    totals, epochs = metrics["totals"], metrics["epochs"]
    if cfg.task == "clip":  # the last epoch's zero-shot accuracy and recall, measured by the run itself
        quality = {k: v for k, v in epochs[-1].items() if "recall" in k}
    else:  # the classifier's checkpoint on the driver, on the clean and the shifted test split
        quality = evaluate_checkpoint(out, data, train_cfg)
    row = {"policy": policy, "seed": seed, "final_test_accuracy": totals["final_test_accuracy"], **quality,
           "noisy_in_final_plan": final_plan_noise(out, data, scores),
           "wall_seconds": totals["wall_seconds"], "train_seconds": totals["train_seconds"],
           "samples_forwarded": totals["samples_forwarded"], "num_samples": totals["num_samples"],
           "missing": int(sum(e.get("plan_missing", 0) for e in epochs)), "signal": totals["signal"],
           "keep_ratio": train_cfg.keep_ratio, "clip_digest": clip_digest, "code": code_version(),
           "settings": settings, **{f"host_{k}": v for k, v in host.items()}}
    storage.write_json(row, storage.join(out, RUN_SUMMARY))
    return {**row, "out": out, "reused": bool(reused)}


def kept_row(run_dir: str, clip_digest: str | None, settings: dict, say: bool = True) -> dict | None:
    """A run's kept row, if it was run by this code (its commit), with these ``settings`` and scored by the same
    reference checkpoint (its digest); else None, and the run is trained again (``say``: print why).

    A table comes from one code and one set of flags: a row of an earlier commit, or of other epochs or another
    keep ratio, is not one of its runs. The reference CLIP model's pretraining is not bit-for-bit reproducible
    across machines, so a row kept from a session with another checkpoint is trained again too.
    """
    path = storage.join(run_dir, RUN_SUMMARY)
    if not storage.exists(path):
        return None
    row = storage.read_json(path)
    differs = [what for what, theirs, ours in (("reference checkpoint", row.get("clip_digest"), clip_digest),
                                                ("code", row.get("code"), code_version()),
                                                ("settings", row.get("settings"), settings)) if theirs != ours]
    if differs:
        if say:
            print(f"    {path} was run with another {' and '.join(differs)} "
                  f"(code {row.get('code')}, now {code_version()}): training it again", flush=True)
        return None
    return row


def _fit_code(run_dir: str) -> str:
    """Where the code that trains a run folder is recorded: beside the folder (the fit replaces the folder)."""
    return run_dir.rstrip("/") + ".code.txt"


def fit_matches(run_dir: str, settings: dict, root: str) -> bool:
    """Whether a run folder of the benchmark folder ``root`` holds a committed fit of this code and ``settings``
    (one whose row was not written yet: the benchmark stopped between the fit and its evaluation)."""
    if not (storage.is_complete(run_dir) and storage.exists(_fit_code(run_dir))):
        return False
    code = storage.read_bytes(_fit_code(run_dir)).decode()
    saved = storage.read_json(storage.join(run_dir, "config.json"))
    return code == str(code_version()) and run_settings(saved, root) == settings


def matched_keep_ratio(mmdp_run: dict | None, cfg: BenchPruningConfig, policy: str = "random") -> float:
    """The keep ratio at which the fixed-ratio baseline ``policy`` forwards mmdp's share of full's sample
    passes (pool x epochs): that share, or for a policy that trains on everything in its last epochs
    (``infobatch_exact``'s annealing), the share its pruning epochs must keep for the whole run to spend it
    (the least keep ratio where even that is too much: the run then spends more than mmdp, as its row says)."""
    if not mmdp_run:
        return cfg.keep_ratio
    n = mmdp_run["num_samples"]
    share = mmdp_run["samples_forwarded"] / (n * cfg.epochs)
    delta = getattr(make_policy(policy), "delta", None)
    everything = sum(is_annealing(e, cfg.epochs, delta) for e in range(cfg.epochs)) if delta is not None else 0
    if everything < cfg.epochs:
        share = (share * cfg.epochs - everything) / (cfg.epochs - everything)
    return round(min(1.0, max(share, 1.0 / n)), 4)


def warm_up(cfg: BenchPruningConfig, data: str, scores: str, out: str) -> None:
    """One unmeasured one-epoch fit, so that the first measured run does not pay Ray's cold start
    (fresh worker processes importing torch and Ray Train) alone."""
    started = time.perf_counter()
    print("[warm-up] one epoch of full, not measured", flush=True)
    train(dataclasses.replace(train_config(cfg, data, scores, out, "full", cfg.seeds[0]), stop_after=1))
    print(f"    warm-up took {time.perf_counter() - started:.1f}s", flush=True)


# ---------------------------------------------------------------- main


def _clip_info(cfg: BenchPruningConfig) -> dict:
    """The reference model's zero-shot accuracy and checkpoint digest, and a warning if its reference
    split is not ours.

    The accuracy and the split come from the pretraining job's output folder, the one holding the
    checkpoint: ``metrics.json`` and ``config.json`` (which names its dataset).
    """
    from pipeline.report.runs import Sources
    from pipeline.report.scores import reference_zero_shot

    if not cfg.clip_pretrained:
        return {}
    sources = Sources()
    zero_shot = reference_zero_shot(cfg.clip_pretrained, sources)
    folder = cfg.clip_pretrained.rstrip("/").rpartition("/")[0]
    data = ((folder and sources.json(storage.join(folder, "config.json"))) or {}).get("data")
    meta = sources.json(storage.join(data, "metadata.json")) if data and not cfg.synthetic else None
    if meta and (meta.get("seed"), meta.get("reference_size")) != (cfg.split_seed, 10_000):
        print(f"WARNING: the CLIP model was pre-trained on the reference split of seed {meta.get('seed')} "
              f"(size {meta.get('reference_size')}); this benchmark's pools come from split seed "
              f"{cfg.split_seed}: they may contain the CLIP model's training images", flush=True)
    digest = hashlib.sha256(storage.read_bytes(cfg.clip_pretrained)).hexdigest()[:16]
    return {"clip_digest": digest, **({} if zero_shot is None else {"clip_zero_shot_accuracy": zero_shot})}


def main(argv=None) -> int:
    return run_job(BenchPruningConfig, argv, run, doc=__doc__, prog="python -m benchmarks.pruning")


def run(cfg: BenchPruningConfig) -> None:
    """Every cell's runs, the overhead, then ``results.json`` and ``results.md`` in ``cfg.out``."""
    import ray
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # the driver's evaluations; workers idle meanwhile
    started_here = not ray.is_initialized()
    # Under `ray job submit` the cluster's Ray, which takes no num_cpus; else a local one of --cpus CPUs.
    init_args = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": cfg.cpus, "dashboard": False,
                                                           "log_to_driver": False}
    connect_ray(**init_args)
    setup = {**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out", "reuse")}, **_clip_info(cfg),
             "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Ray CPUs "
                        f"{ray.cluster_resources().get('CPU')}, torch {torch.__version__}, ray {ray.__version__}",
             "shift": SHIFT, "shift_seed": SHIFT_SEED, "code": code_version()}
    cells = [(noise, seed) for noise in cfg.noise for seed in cfg.seeds]
    total_runs = len(cells) * len(cfg.policies)
    runs, timed, t0 = [], [], time.perf_counter()
    warm = not cfg.warmup

    def ensure_warm(data, scores):
        nonlocal warm
        if not warm:
            warm_up(cfg, data, scores, storage.join(cfg.out, "warmup"))
            warm = True

    try:
        for noise, seed in cells:
            tag = f"{noise_tag(noise)}-s{seed}"
            spec = noise_spec(noise)
            data = prepare_data(storage.join(cfg.out, "data", tag), cfg, spec, seed)
            scores = prepare_scores(storage.join(cfg.out, "scores", tag), data, cfg)
            cell_runs = {}
            for policy in cfg.policies:
                done = len(runs)
                eta = f"{np.mean(timed) * (total_runs - done) / 60:.1f} min" if timed else "?"
                print(f"[run {done + 1}/{total_runs}] noise={noise} seed={seed} policy={policy}  "
                      f"elapsed {(time.perf_counter() - t0) / 60:.1f} min, ETA {eta}", flush=True)
                run_scores = scores
                if policy == ORACLE:
                    run_scores = storage.join(cfg.out, "scores", f"{tag}-oracle")
                    clean = write_oracle_scores(data, scores, run_scores)
                    if "full" in cell_runs and clean == cell_runs["full"]["num_samples"]:
                        # No noisy row in the pool: the oracle *is* full; training it again would be a copy.
                        runs.append({**cell_runs["full"], "policy": ORACLE, "same_as": "full", "noise": noise})
                        continue
                run_dir = storage.join(cfg.out, "runs", tag, policy)
                keep = None
                if policy in FIXED_RATIO:
                    keep = cfg.baseline_keep_ratio or matched_keep_ratio(cell_runs.get("mmdp"), cfg, policy)
                began = time.perf_counter()
                run = run_policy(cfg, data, run_scores, run_dir, policy, seed, keep, setup.get("clip_digest"),
                                 before_fit=lambda: ensure_warm(data, scores))
                if not run["reused"]:
                    timed.append(time.perf_counter() - began)
                run["noise"] = noise
                cell_runs[policy] = run
                runs.append(run)
                second = ("i2t_recall@1", "i2t R@1") if cfg.task == "clip" else ("shifted_test_accuracy", "shifted")
                steal = f"  host steal {run['host_steal_pct']:.1f}%" if "host_steal_pct" in run else ""
                if "host_plain_pct" in run:
                    steal += f"  plain {run['host_plain_pct']:.1f}%"
                if "host_probe_seconds" in run:
                    steal += "  probe {:.2f}s/{:.2f}s".format(*run["host_probe_seconds"])
                print(f"    acc {run['final_test_accuracy']:.4f}  {second[1]} {run[second[0]]:.4f}  "
                      f"wall {run['wall_seconds']:.1f}s  forwarded {run['samples_forwarded']}{steal}", flush=True)
        overhead = None
        if not cfg.skip_overhead:
            root = storage.join(cfg.out, "overhead")
            if cfg.reuse and storage.is_complete(root):
                overhead = storage.read_json(storage.join(root, "overhead.json"))
            else:
                noise, seed = cells[0]
                tag = f"{noise_tag(noise)}-s{seed}"
                data, scores = storage.join(cfg.out, "data", tag), storage.join(cfg.out, "scores", tag)
                ensure_warm(data, scores)
                # Each fit a Ray job of its own where this process connected Ray (a new local Ray, or a
                # new job on the cluster); not where it runs inside a caller's Ray (a test session).
                fresh_job = (lambda: (ray.shutdown(), connect_ray(**init_args))) if started_here else None
                with storage.output(root):
                    overhead = measure_overhead(train_config(cfg, data, scores, root, "full", cfg.seeds[0]), root,
                                                cfg.overhead_repeats, fresh_job)
                    storage.write_json(overhead, storage.join(root, "overhead.json"))
    finally:
        if started_here:
            ray.shutdown()
    summary = summarise(runs, list(cfg.noise), list(cfg.policies))
    result = {"setup": setup, "noise_settings": list(cfg.noise), "runs": runs, "summary": summary,
              "overhead": overhead, "targets": check_targets(summary, overhead, cfg.task),
              "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_json(result, storage.join(cfg.out, "results.json"))
    text = markdown(result)
    storage.write_bytes(text.encode(), storage.join(cfg.out, "results.md"))
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
