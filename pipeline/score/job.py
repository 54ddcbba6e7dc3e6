"""Ray runners: the Ray Data scoring pipeline.

Stages are plain callables from :mod:`pipeline.data.validate` and
:mod:`pipeline.score.scorer`; this module only decides where they run: row checks
and image decoding in CPU tasks, the CLIP model in an autoscaling actor pool
(one GPU per actor when the cluster has GPUs), writing through Ray Data.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.data import shards
from pipeline.cli import option
from pipeline.data.contract import KEY, REJECTS_SCHEMA, SCORES_SCHEMA
from pipeline.data.validate import DUPLICATE_KEY, RowValidator, first_occurrence_mask

log = logging.getLogger(__name__)
# Ray Data writes the scored rows here before write_scores commits them as scores/.
STAGING = "_staging"


@dataclass(frozen=True)
class ScoreConfig:
    """What the score job does; every field is a ``jobs.score`` flag."""

    OUTPUT: ClassVar[str] = "output"
    RAY: ClassVar[bool] = True

    input: str = field(metadata={"help": "shards to score: a folder or file URL (local, s3://, gs://) of parquet or webdataset tars"})
    output: str = field(metadata={"help": "where scores/, rejects.parquet and summary.json go (URL)"})
    model: str = option("mmdp-ref", "open_clip model name, or a config shipped with mmdp (mmdp-tiny, mmdp-ref)")
    pretrained: str | None = option(None, "open_clip pretrained tag, checkpoint path or object-store URL; none = random weights")
    mode: str = option("caption", "score against each row's caption, or against class prompts from its label",
                     choices=("caption", "label"))
    classes: tuple[str, ...] | None = option(None, "class names for label prompts; default: the dataset's metadata.json")
    columns: str = option("mmdp", "column mapping: mmdp, img2dataset, or pairs like image=jpg,caption=txt")
    batch_size: int = option(256, "rows per scoring batch")
    min_actors: int = option(1, "scoring actors the pool keeps (autoscaled between min and max)")
    max_actors: int = option(4, "most scoring actors the pool grows to (one GPU each when the cluster has GPUs)")
    # Below 1 leaves the read/decode tasks a CPU on a small machine: a pool
    # that takes every CPU starves its own input (ENVIRONMENT.md, deadlock 1).
    # An autoscaling cluster may have no GPU node up yet when the job starts:
    # --use-gpu makes the pool ask for GPUs, and the autoscaler starts them.
    use_gpu: bool | None = option(None, "one GPU per scoring actor; default: only if the cluster has GPUs at start")
    actor_cpus: float = option(1.0, "CPUs each scoring actor reserves on a cluster without GPUs")
    torch_threads: int = option(0, "torch threads per scoring actor; 0 = as many as the actor's CPUs")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        if self.min_actors < 1 or self.max_actors < self.min_actors:
            raise ValueError(f"need 1 <= --min-actors <= --max-actors, got {self.min_actors} and {self.max_actors}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.actor_cpus <= 0:
            raise ValueError("--actor-cpus must be positive")


@functools.lru_cache(maxsize=4)
def _decoder(model: str, pretrained: str | None):
    from pipeline.score.scorer import ImageDecoder

    # uint8 pixels: a quarter of the bytes to ship to the scoring actors.
    return ImageDecoder(model, pretrained, pixel_dtype="uint8")


def _decode_stage(batch: dict, model: str, pretrained: str | None, mode: str, classes: tuple[str, ...]) -> dict:
    # The decoder keeps a row's earlier reason (a failed check) over its own.
    return _decoder(model, pretrained)(RowValidator(mode, list(classes))(batch))


class _Scorer:
    """Actor-side wrapper: one ClipScorer per actor, loaded once."""

    def __init__(self, **kwargs):
        from pipeline.score.scorer import ClipScorer

        self.scorer = ClipScorer(**kwargs)

    def __call__(self, batch: dict) -> dict:
        out = self.scorer(batch)
        ok = out["error"] == ""
        return {
            KEY: out[KEY],
            "clip_score": np.where(ok, out["clip_score"], np.nan).astype(np.float32),
            "clip_margin": np.asarray(out.get("clip_margin", np.full(len(ok), np.nan)), np.float32),
            "status": np.where(ok, "ok", "rejected").astype(object),
            "error": out["error"],
        }


def resolve_classes(cfg: ScoreConfig) -> tuple[str, ...]:
    """Class names from the config, else the dataset's metadata.json next to the split folder."""
    if cfg.classes:
        return tuple(cfg.classes)
    for meta in (storage.join(cfg.input, "metadata.json"), storage.join(cfg.input.rstrip("/").rsplit("/", 1)[0], "metadata.json")):
        if storage.exists(meta):
            return tuple(storage.read_json(meta)["classes"])
    return ()


def score(cfg: ScoreConfig) -> dict:
    """Run the score job; returns its summary. Writes ``scores/``, ``rejects.parquet`` and ``summary.json``."""
    classes = resolve_classes(cfg)
    if cfg.mode == "label" and not classes:
        raise ValueError("label mode needs class names: pass --classes or keep metadata.json beside the split")
    ctx = ray.data.DataContext.get_current()
    # Output rows follow input order, so the first of two duplicate keys is
    # well defined and reruns write identical tables. Restored afterwards:
    # later datasets of this process (a TorchTrainer's) inherit the context.
    saved_order, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        return _score(cfg, classes)
    finally:
        ctx.execution_options.preserve_order = saved_order


def _score(cfg: ScoreConfig, classes: tuple[str, ...]) -> dict:
    start = time.perf_counter()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    ds = shards.read_shards(cfg.input, cfg.columns).map_batches(
        _decode_stage,
        batch_size=cfg.batch_size,
        fn_kwargs={"model": cfg.model, "pretrained": cfg.pretrained, "mode": cfg.mode, "classes": classes},
    )
    ds = ds.map_batches(
        _Scorer,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        fn_constructor_kwargs={
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "mode": cfg.mode,
            "classes": list(classes) or None,
            "device": "cuda" if use_gpu else "cpu",
            "num_threads": cfg.torch_threads or max(1, int(cfg.actor_cpus)),
        },
        num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else cfg.actor_cpus,
    )
    # The job's output folder is pending until the job skeleton commits it
    # (pipeline.cli.execute): a job killed half-way leaves it refused by readers,
    # and its staging folder is cleared by the next run here.
    staging = storage.join(cfg.output, STAGING)
    fs, staging_path = storage.filesystem_for(staging)
    if storage.exists(staging):
        fs.delete_dir(staging_path)
    try:
        ds.write_parquet(staging_path, filesystem=fs)
        table = storage.read_table(staging) if storage.exists(staging) else SCORES_SCHEMA.empty_table()
        summary = write_scores(table, cfg.output, time.perf_counter() - start)
    finally:
        if storage.exists(staging):
            fs.delete_dir(staging_path)
    return summary


def write_scores(table: pa.Table, output: str, seconds: float | None = None, **extra) -> dict:
    """Mark repeated keys, give good rows a dense index, write ``scores/``, ``rejects.parquet``, ``summary.json``.

    ``table`` has the scores schema's columns (``index`` is recomputed); rows
    already ``rejected`` stay so. Each row lands in exactly one place: a
    scored row in ``scores/`` (status ``ok``), a rejected one in
    ``rejects.parquet`` with its reason. ``extra`` goes into the summary,
    which is returned. The caller commits ``output`` (the job skeleton does).
    """
    keys = table.column(KEY).to_numpy(zero_copy_only=False)
    status = table.column("status").to_numpy(zero_copy_only=False).astype(object)
    error = table.column("error").to_numpy(zero_copy_only=False).astype(object)
    has_key = np.array([k is not None and k != "" for k in keys])
    repeat = np.zeros(len(keys), dtype=bool)
    repeat[has_key] = ~first_occurrence_mask(keys[has_key])
    status[repeat], error[repeat] = "rejected", DUPLICATE_KEY
    ok = status == "ok"
    ok_rows = np.flatnonzero(ok)
    # The dense index is the training-time sample id: good rows in key order,
    # so it depends on the data alone, not on how Ray ordered the blocks.
    index = np.empty(len(ok_rows), dtype=np.int64)
    index[np.argsort(keys[ok_rows].astype(str), kind="stable")] = np.arange(len(ok_rows))
    scores = pa.table(
        {
            KEY: keys[ok_rows],
            "index": index,
            "clip_score": table.column("clip_score").take(ok_rows),
            "clip_margin": table.column("clip_margin").take(ok_rows),
            "status": pa.array(status[ok_rows], pa.string()),
            "error": pa.array(error[ok_rows], pa.string()),
        },
        schema=SCORES_SCHEMA,
    )
    rejects = pa.table({KEY: keys[~ok], "reason": pa.array(error[~ok], pa.string())}, schema=REJECTS_SCHEMA)
    reasons = collections.Counter(error[~ok].tolist())
    summary = {
        "rows_in": len(keys),
        "scored": int(ok.sum()),
        "rejected": int((~ok).sum()),
        "rejected_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        **extra,
    }
    if seconds is not None:
        summary.update(seconds=round(seconds, 2),
                       pairs_per_second=round(len(keys) / seconds, 1) if seconds > 0 else None)
    storage.write_shards(scores, storage.join(output, "scores"), rows_per_shard=1_000_000)
    storage.write_table(rejects, storage.join(output, "rejects.parquet"))
    storage.write_json(summary, storage.join(output, "summary.json"))
    return summary
