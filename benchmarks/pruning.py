"""Benchmark of the pruning half in the reference protocol (DESIGN.md, "Targets"), in one invocation.

For each noise setting and seed: build the pool (Fashion-MNIST, 20k train
rows), score it once with the reference CLIP model, then train every policy
(``full``, ``random``, ``infobatch``, ``clip_filter``, ``mmdp``) and the clean
oracle (``full`` on the pool's truly clean rows only) with the same model,
epochs, workers and keep ratio. Each run's final checkpoint is also evaluated
on a deterministic shifted copy of the test split (noise, blur, rotation,
shift). Last, the machinery overhead: policy ``full`` through the pruner
against a plain Ray Train loop without it, alternated side by side.

Local (Ray starts here with 2 CPUs; about 3 hours on 2 idle cores: ~5.5 min a full-data run)::

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
and scores already in ``OUT``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.cli import HELP, connect_ray, execute, option, run_job
from pipeline.data import reference
from pipeline.data.noise import parse_noise_spec, stream_rng
from pipeline.data.contract import KEY
from pipeline.report.page import markdown_table

POLICIES = ("full", "random", "infobatch", "clip_filter", "mmdp")
ORACLE = "oracle"
ORACLE_REASON = "oracle: excluded (noisy in ground truth)"
# The shifted test copy is a pure function of the test images and this seed.
SHIFT_SEED = 20240
SHIFT = {"rotate_deg": 12.0, "shift_px": 2, "blur_radius": (0.4, 1.0), "noise_std": 20.0}


@dataclass(frozen=True)
class BenchPruningConfig:
    """The benchmark's knobs; one field per command-line flag."""

    OUTPUT: ClassVar[str] = "out"

    out: str = field(metadata={HELP: "benchmark folder: data/, scores/, runs/, results.json, results.md"})
    pool_size: int = option(20_000, "train rows in each pool")
    epochs: int = option(20, "training epochs")
    seeds: tuple[int, ...] = option((0, 1, 2), "comma-separated seeds (noise draw, model, plans)")
    noise: tuple[str, ...] = option(("clean", "symmetric:0.3"),
                                    "comma-separated noise settings; join the kinds of one setting with +, "
                                    "e.g. symmetric:0.2+caption:0.05")
    policies: tuple[str, ...] = option((*POLICIES, ORACLE), "policies to train, and oracle")
    keep_ratio: float = option(0.5, "keep ratio of every pruning policy")
    workers: int = option(2, "Ray Train workers")
    model: str = option("resnet", "image model", choices=("resnet", "cnn"))
    width: int = option(8, "model width (0 = the model's default)")
    batch_size: int = option(128, "samples per step per worker")
    lr: float = option(0.1, "peak learning rate")
    warmup_steps: int = option(50, "linear warm-up steps")
    clip_model: str = option("mmdp-ref", "open_clip model that scores the pools")
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
    reuse: bool = option(False, "keep datasets, scores and runs already in --out (resume)")

    def __post_init__(self):
        # Normalised here, so the config logged and saved is the one that runs.
        noise = []
        for part in self.noise:
            spec = "none" if part in ("clean", "none") else part.replace("+", ",")
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


# ---------------------------------------------------------------- data and scores


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


def write_oracle_scores(data: str, scores: str, url: str) -> int:
    """A copy of ``scores`` where rows noisy in the ground truth are rejected; returns the clean count.

    The trainer trains on ``status == "ok"`` rows only, so the oracle needs no
    code path of its own: policy ``full`` on this folder trains on the clean rows.
    """
    from pipeline.score.job import write_scores

    table = storage.read_table(storage.join(scores, "scores"))
    gt = storage.read_table(storage.join(data, "ground_truth.parquet"), columns=[KEY, "corruption"])
    noisy_keys = gt.filter(pc.not_equal(gt.column("corruption"), "none")).column(KEY)
    status = table.column("status").to_numpy(zero_copy_only=False).astype(object)
    error = table.column("error").to_numpy(zero_copy_only=False).astype(object)
    excluded = pc.is_in(table.column(KEY), value_set=noisy_keys).to_numpy(zero_copy_only=False) & (status == "ok")
    status[excluded], error[excluded] = "rejected", ORACLE_REASON
    for name, values in (("status", status), ("error", error)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    with storage.output(url):
        summary = write_scores(table, url, oracle_excluded=int(excluded.sum()))
        storage.write_json({"derived_from": scores, "ground_truth": storage.join(data, "ground_truth.parquet")},
                           storage.join(url, "config.json"))
    return summary["scored"]


# ---------------------------------------------------------------- evaluation


def shift_image(png: bytes, rng: np.random.Generator) -> bytes:
    """A deterministic out-of-distribution copy of one image: rotation, shift, blur, Gaussian noise."""
    from PIL import Image, ImageFilter

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("L").resize((28, 28))
    dx, dy = (int(v) for v in rng.integers(-SHIFT["shift_px"], SHIFT["shift_px"] + 1, 2))
    angle = float(rng.uniform(-1, 1) * SHIFT["rotate_deg"])
    im = im.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=0)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*SHIFT["blur_radius"]))))
    pixels = np.asarray(im, np.float32) + rng.normal(0.0, SHIFT["noise_std"], (28, 28))
    return reference.encode_png(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=2)  # one dataset at a time: its clean and shifted copies
def test_inputs(data: str, shifted: bool) -> tuple:
    """(x, labels) of the test split, normalised by the train pipeline's own decode stage."""
    from pipeline.train.stages import decode_stage

    table = storage.read_table(storage.join(data, "test"), columns=[KEY, "image", "label"]).sort_by(KEY)
    images = table.column("image").to_pylist()
    if shifted:
        images = [shift_image(b, np.random.default_rng([SHIFT_SEED, i])) for i, b in enumerate(images)]
    labels = table.column("label").to_numpy()
    batch = {"index": np.arange(len(labels)), "image": np.array(images, dtype=object), "label": labels}
    out = decode_stage(batch, augment=False, seed=0)
    return out["x"], out["label"]


def evaluate_checkpoint(run_dir: str, data: str, cfg) -> dict:
    """Accuracy of a run's final checkpoint on the clean and the shifted test split."""
    import torch

    from pipeline.train.models import build_model

    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "checkpoint", "train.pt"))),
                       map_location="cpu", weights_only=True)
    num_classes = len(storage.read_json(storage.join(data, "metadata.json"))["classes"])
    model = build_model(cfg.model, num_classes, cfg.width or None)
    model.load_state_dict(state["model"])
    model.eval()
    out = {}
    for name, shifted in (("driver_test_accuracy", False), ("shifted_test_accuracy", True)):
        x, y = test_inputs(data, shifted)
        with torch.inference_mode():
            pred = torch.cat([model(torch.from_numpy(x[i:i + 1024])).argmax(1) for i in range(0, len(x), 1024)])
        out[name] = float((pred.numpy() == y).mean())
    return out


def final_plan_noise(run_dir: str, data: str, scores: str) -> float | None:
    """Share of the rows noisy in the ground truth among those the last epoch's plan keeps.

    The plan is replayed from the pruner state in the run's final checkpoint
    (a plan is a pure function of state, epoch and seed). That state already
    holds the last epoch's own losses, so for loss-driven policies this is
    the plan a next epoch at the same step would get: close to, not exactly,
    the last one trained on. None when the pool has no noisy row.
    """
    import torch

    from pipeline.prune.pruner import Pruner
    from pipeline.train.driver import load_index

    truth = storage.read_table(storage.join(data, "ground_truth.parquet"), columns=[KEY, "corruption"]).to_pandas()
    noisy_keys = set(truth.loc[truth["corruption"] != "none", KEY])
    if not noisy_keys:
        return None
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "checkpoint", "pruner.pt"))),
                       map_location="cpu", weights_only=True)
    keys, consistency, _ = load_index(scores, "auto")
    pruner = Pruner(**state["config"], consistency=consistency)  # the config names the constructor's arguments
    pruner.load_state_dict(state)  # takes the saved tensors as they are
    kept, _ = pruner.plan(pruner.epochs - 1)
    return float(np.isin(keys[kept], list(noisy_keys)).mean()) if len(kept) else 0.0


# ---------------------------------------------------------------- the plain Ray Train loop


def _plain_stage(batch: dict) -> dict:
    """What the pruner's index + keep stages give decode_stage, without a pruner: fresh random crops."""
    n = len(batch["label"])
    return {"index": np.random.default_rng().integers(0, 2**62, n), "image": batch["image"],
            "label": batch["label"].astype(np.int64), "epoch": np.zeros(n, np.int64)}


def plain_loop_per_worker(config: dict) -> None:
    """A Ray Train loop with no pruner: the train loop's model, optimiser, schedule, evaluation and checkpoints."""
    import ray.train
    import torch.nn.functional as F

    from pipeline.train.loop import DTYPES, all_sum, evaluate, report_epoch, save_train_state, setup_model, take_step, unwrap

    cfg = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, opt, sched = setup_model(cfg, cfg["epochs"] * math.ceil(cfg["num_samples"] / (cfg["batch_size"] * world)))
    bare = unwrap(model)
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    cache, sums = None, {"train_seconds": 0.0, "epoch_seconds": 0.0, "samples_forwarded": 0}
    for epoch in range(cfg["epochs"]):
        started = time.perf_counter()
        model.train()
        forwarded = 0
        for batch in train_shard.iter_torch_batches(batch_size=cfg["batch_size"], dtypes=DTYPES, drop_last=False):
            take_step(F.cross_entropy(model(batch["x"]), batch["label"]), opt, sched)
            forwarded += len(batch["label"])
        train_seconds = time.perf_counter() - started
        correct, count, cache = evaluate(bare, test_shard, cache, cfg["batch_size"], rank, world)
        totals = all_sum([forwarded, correct, count])
        sums["train_seconds"] += train_seconds
        sums["epoch_seconds"] += time.perf_counter() - started
        sums["samples_forwarded"] += int(totals[0])
        metrics = {"epoch": epoch, "test_accuracy": float(totals[1] / max(float(totals[2]), 1.0)), **sums}
        checkpoint_dir = None
        if rank == 0:
            checkpoint_dir = tempfile.mkdtemp(prefix="mmdp-plain-ckpt-")
            save_train_state(checkpoint_dir, model, opt, sched, epoch)
        report_epoch(metrics, checkpoint_dir)


def plain_fit(cfg, out: str) -> dict:
    """Train ``cfg``'s model on all of ``cfg.data``'s train split without the pruner; returns totals."""
    from pipeline.train.driver import evaluation_dataset, read_split, run_trainer
    from pipeline.train.stages import decode_stage

    started = time.perf_counter()
    # No retries: a plain loop that restarted would start over, and its time would not compare.
    cfg = dataclasses.replace(cfg, out=out, max_failures=0)
    meta = storage.read_json(storage.join(cfg.data, "metadata.json"))
    train = (read_split(cfg.data, "train").map_batches(_plain_stage, batch_format="numpy")
             .map_batches(decode_stage, fn_kwargs={"augment": cfg.augment, "seed": cfg.seed}, batch_format="numpy"))
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    config.update(num_classes=len(meta["classes"]), num_samples=meta["splits"]["train"])
    result = run_trainer(cfg, plain_loop_per_worker, config, {"train": train, "test": evaluation_dataset(cfg.data)},
                         f"plain-{os.getpid()}-{time.time_ns()}")
    return {**result.metrics, "wall_seconds": round(time.perf_counter() - started, 2)}


def measure_overhead(cfg: BenchPruningConfig, data: str, scores: str, root: str) -> dict:
    """``full`` through the pruner vs the plain loop, alternated A B B A so drift hits both alike."""
    train_cfg = train_config(cfg, data, scores, storage.join(root, "unused"), "full", cfg.seeds[0])
    # wall: the whole fit() from the driver; epoch: the loops' epochs (training + test evaluation);
    # train: the training steps alone. Start-up (about 11 s a fit) is in wall only.
    times = {m: {"pruner": [], "plain": []} for m in ("wall", "epoch", "train")}
    order = ["pruner", "plain", "plain", "pruner"] * math.ceil(cfg.overhead_repeats / 2)
    for i, kind in enumerate(order[: 2 * cfg.overhead_repeats]):
        out = storage.join(root, f"{i}-{kind}")
        print(f"[overhead {i + 1}/{2 * cfg.overhead_repeats}] {kind}", flush=True)
        started = time.perf_counter()
        if kind == "pruner":
            history = train(dataclasses.replace(train_cfg, out=out))["epochs"]
            epoch, train_s = (sum(h[k] for h in history) for k in ("epoch_seconds", "train_seconds"))
        else:
            totals = plain_fit(train_cfg, out)
            epoch, train_s = totals["epoch_seconds"], totals["train_seconds"]
        for name, value in (("wall", time.perf_counter() - started), ("epoch", epoch), ("train", train_s)):
            times[name][kind].append(round(value, 2))
    ratio = {name: round(float(np.mean(t["pruner"]) / np.mean(t["plain"])), 3) for name, t in times.items()}
    return {"seconds": times, "ratio": ratio, "epochs": train_cfg.epochs, "data": data, "target": 1.05}


# ---------------------------------------------------------------- runs


def train_config(cfg: BenchPruningConfig, data: str, scores: str, out: str, policy: str, seed: int):
    from pipeline.train.driver import TrainConfig

    return TrainConfig(data=data, scores=scores, out=out, policy="full" if policy == ORACLE else policy,
                       keep_ratio=cfg.keep_ratio, epochs=cfg.epochs, workers=cfg.workers, seed=seed,
                       model=cfg.model, width=cfg.width, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps)


def train(train_cfg) -> dict:
    """One training run as ``jobs.train`` runs it: its folder gets config.json and is committed."""
    from pipeline.train.driver import fit

    return execute(train_cfg, fit)


def run_policy(cfg: BenchPruningConfig, data: str, scores: str, out: str, policy: str, seed: int) -> dict:
    train_cfg = train_config(cfg, data, scores, out, policy, seed)
    reused = cfg.reuse and storage.is_complete(out)
    metrics = storage.read_json(storage.join(out, "metrics.json")) if reused else train(train_cfg)
    totals, epochs = metrics["totals"], metrics["epochs"]
    return {"policy": policy, "seed": seed, "out": out, "reused": bool(reused),
            "final_test_accuracy": totals["final_test_accuracy"], **evaluate_checkpoint(out, data, train_cfg),
            "noisy_in_final_plan": final_plan_noise(out, data, scores),
            "wall_seconds": totals["wall_seconds"], "train_seconds": totals["train_seconds"],
            "samples_forwarded": totals["samples_forwarded"], "num_samples": totals["num_samples"],
            "missing": int(sum(e.get("plan_missing", 0) for e in epochs)), "signal": totals["signal"]}


def warm_up(cfg: BenchPruningConfig, data: str, scores: str, out: str) -> None:
    """One unmeasured one-epoch fit, so that the first measured run does not pay Ray's cold start
    (fresh worker processes importing torch and Ray Train) alone."""
    started = time.perf_counter()
    print("[warm-up] one epoch of full, not measured", flush=True)
    train(dataclasses.replace(train_config(cfg, data, scores, out, "full", cfg.seeds[0]), stop_after=1))
    print(f"    warm-up took {time.perf_counter() - started:.1f}s", flush=True)


def noise_tag(noise: str) -> str:
    return "clean" if noise in ("", "none", "clean") else noise.replace(":", "").replace("+", "_")


def summarise(runs: list[dict], noises: list[str], policies: list[str]) -> list[dict]:
    rows = []
    for noise in noises:
        cell = [r for r in runs if r["noise"] == noise]
        full_wall = [r["wall_seconds"] for r in cell if r["policy"] == "full"]
        full_train = [r["train_seconds"] for r in cell if r["policy"] == "full"]
        for policy in policies:
            rs = [r for r in cell if r["policy"] == policy]
            if not rs:
                continue
            acc = np.array([r["final_test_accuracy"] for r in rs]) * 100
            shifted = 100 * float(np.mean([r["shifted_test_accuracy"] for r in rs]))
            wall = float(np.mean([r["wall_seconds"] for r in rs]))
            train = float(np.mean([r["train_seconds"] for r in rs]))
            residual = [r["noisy_in_final_plan"] for r in rs if r.get("noisy_in_final_plan") is not None]
            rows.append({"noise": noise, "policy": policy, "seeds": len(rs),
                         "accuracy_mean": round(float(acc.mean()), 3),
                         "accuracy_std": round(float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, 3),
                         "shifted_accuracy_mean": round(shifted, 3),
                         "wall_seconds_mean": round(wall, 2),
                         "train_seconds_mean": round(train, 2),
                         "noisy_in_final_plan_mean": round(100 * float(np.mean(residual)), 2) if residual else None,
                         "samples_forwarded_mean": int(round(np.mean([r["samples_forwarded"] for r in rs]))),
                         "num_samples": int(rs[0]["num_samples"]),
                         "speedup_vs_full": round(float(np.mean(full_wall)) / wall, 3) if full_wall else None,
                         "train_speedup_vs_full": round(float(np.mean(full_train)) / train, 3) if full_train else None})
    return rows


def check_targets(summary: list[dict], overhead: dict | None) -> list[dict]:
    get = {(r["noise"], r["policy"]): r for r in summary}
    checks = []

    def add(what, value, target, ok):
        checks.append({"what": what, "value": round(value, 3), "target": target, "met": bool(ok)})

    for noise in sorted({r["noise"] for r in summary}):
        acc = {p: get[(noise, p)]["accuracy_mean"] for p in (*POLICIES, ORACLE) if (noise, p) in get}
        if "mmdp" not in acc:
            continue
        if "full" in acc:
            d = acc["mmdp"] - acc["full"]
            if noise_tag(noise) == "clean":
                add(f"{noise}: mmdp - full (points)", d, ">= -0.3", d >= -0.3)
            else:
                add(f"{noise}: mmdp - full (points)", d, ">= +2.8", d >= 2.8)
            s = get[(noise, "mmdp")]["speedup_vs_full"]
            add(f"{noise}: mmdp wall-clock speedup over full (whole fit)", s, ">= 1.7", s >= 1.7)
            s = get[(noise, "mmdp")]["train_speedup_vs_full"]
            add(f"{noise}: mmdp speedup over full (training time)", s, ">= 1.7", s >= 1.7)
        if ORACLE in acc and noise_tag(noise) != "clean":
            d = acc["mmdp"] - acc[ORACLE]
            add(f"{noise}: mmdp - clean oracle (points)", d, ">= -0.5", d >= -0.5)
        for base in ("infobatch", "clip_filter", "random"):
            if base in acc and noise_tag(noise) != "clean":
                d = acc["mmdp"] - acc[base]
                add(f"{noise}: mmdp - {base} (points)", d, "> 0", d > 0)
    if overhead:
        add("machinery overhead (full via pruner / plain loop, wall)", overhead["ratio"]["wall"], "<= 1.05",
            overhead["ratio"]["wall"] <= 1.05)
    return checks


def markdown(result: dict) -> str:
    s = result["setup"]
    zero_shot = s.get("clip_zero_shot_accuracy")
    lines = [f"# Pruning benchmark ({'synthetic' if s['synthetic'] else 'Fashion-MNIST'})", "",
             f"Pool {s['pool_size']} rows, {s['epochs']} epochs, keep ratio {s['keep_ratio']}, {s['workers']} workers, "
             f"model {s['model']} (width {s['width']}), seeds {s['seeds']}, scores: {s['clip_model']} "
             f"{s['clip_pretrained'] or '(random init)'} in {s['mode']} mode"
             + (f", CLIP zero-shot test accuracy {zero_shot:.4f}" if zero_shot else "")
             + f". Machine: {s['machine']}.", "",
             "Accuracy is the final epoch's, on the clean test split; shifted = the same checkpoint on a deterministic "
             "shifted copy (rotation, shift, blur, Gaussian noise). Wall = the whole fit (Ray Train start-up and the "
             "per-epoch test evaluation included); train = the epochs' training time alone (each epoch's planning "
             "included). Speedups = full's mean / the policy's. Noisy in plan = share of ground-truth noisy rows in "
             "the last epoch's plan, replayed from the final checkpoint's pruner state.",
             ""]
    for noise in result["noise_settings"]:
        rows = []
        for r in (r for r in result["summary"] if r["noise"] == noise):
            speed = (f"{r['speedup_vs_full']:.2f}x / {r['train_speedup_vs_full']:.2f}x"
                     if r["speedup_vs_full"] else "n/a")
            noisy = "n/a" if r.get("noisy_in_final_plan_mean") is None else f"{r['noisy_in_final_plan_mean']:.1f}"
            rows.append((r["policy"], f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
                         f"{r['shifted_accuracy_mean']:.2f}", f"{r['wall_seconds_mean']:.1f}",
                         f"{r['train_seconds_mean']:.1f}", speed, r["samples_forwarded_mean"], r["num_samples"], noisy))
        lines += [f"## noise: {noise}", "",
                  markdown_table(("policy", "test acc % (mean ± std)", "shifted acc %", "wall s", "train s",
                                  "speedup vs full (wall / train)", "samples forwarded", "rows trained on",
                                  "noisy in plan %"), rows), ""]
    o = result.get("overhead")
    if o:
        sec = o["seconds"]
        lines += ["## machinery overhead", "",
                  f"Policy full through the pruner vs a plain Ray Train loop (same model, data, batch, workers), "
                  f"{o['epochs']} epochs, alternated A B B A. Wall = the whole fit, epoch = the loops' epochs "
                  "(training + evaluation), train = training steps alone.", "",
                  markdown_table(("measure", "pruner s", "plain s", "ratio"),
                                 [(m, sec[m]["pruner"], sec[m]["plain"], o["ratio"][m]) for m in ("wall", "epoch", "train")]),
                  ""]
    if result["targets"]:
        lines += ["## targets", "",
                  markdown_table(("check", "value", "target", "met"),
                                 [(c["what"], c["value"], c["target"], "yes" if c["met"] else "NO")
                                  for c in result["targets"]]),
                  ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def _clip_info(cfg: BenchPruningConfig) -> dict:
    """The reference model's zero-shot accuracy, and a warning if its reference split is not ours.

    Both come from the pretraining job's output folder, the one holding the
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
    return {} if zero_shot is None else {"clip_zero_shot_accuracy": zero_shot}


def main(argv=None) -> int:
    return run_job(BenchPruningConfig, argv, run, doc=__doc__, prog="python -m benchmarks.pruning")


def run(cfg: BenchPruningConfig) -> None:
    """Every cell's runs, the overhead, then ``results.json`` and ``results.md`` in ``cfg.out``."""
    import ray
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # the driver's evaluations; workers idle meanwhile
    started_here = not ray.is_initialized()
    # Under `ray job submit` the cluster's Ray, which takes no num_cpus; else a local one of --cpus CPUs.
    connect_ray(**({} if os.environ.get("RAY_ADDRESS") else
                   {"num_cpus": cfg.cpus, "include_dashboard": False, "log_to_driver": False}))
    setup = {**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out", "reuse")}, **_clip_info(cfg),
             "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Ray CPUs "
                        f"{ray.cluster_resources().get('CPU')}, torch {torch.__version__}, ray {ray.__version__}",
             "shift": SHIFT, "shift_seed": SHIFT_SEED}
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
            spec = "none" if noise == "clean" else noise.replace("+", ",")
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
                if not (cfg.reuse and storage.is_complete(run_dir)):
                    ensure_warm(data, scores)
                began = time.perf_counter()
                run = run_policy(cfg, data, run_scores, run_dir, policy, seed)
                if not run["reused"]:
                    timed.append(time.perf_counter() - began)
                run["noise"] = noise
                cell_runs[policy] = run
                runs.append(run)
                print(f"    acc {run['final_test_accuracy']:.4f}  shifted {run['shifted_test_accuracy']:.4f}  "
                      f"wall {run['wall_seconds']:.1f}s  forwarded {run['samples_forwarded']}", flush=True)
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
                with storage.output(root):
                    overhead = measure_overhead(cfg, data, scores, root)
                    storage.write_json(overhead, storage.join(root, "overhead.json"))
    finally:
        if started_here:
            ray.shutdown()
    summary = summarise(runs, list(cfg.noise), list(cfg.policies))
    result = {"setup": setup, "noise_settings": list(cfg.noise), "runs": runs, "summary": summary,
              "overhead": overhead, "targets": check_targets(summary, overhead),
              "seconds": round(time.perf_counter() - t0, 1)}
    storage.write_json(result, storage.join(cfg.out, "results.json"))
    text = markdown(result)
    storage.write_bytes(text.encode(), storage.join(cfg.out, "results.md"))
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
