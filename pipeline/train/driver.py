"""The TorchTrainer set-up: datasets, the pruning actor, and the run's outputs.

Data flow per epoch (Ray Data re-executes the lazy dataset every epoch)::

    read parquet (key, image, label) -> index stage (key -> dense sample index)
      -> keep stage (this epoch's plan from the pruning actor; pruned rows leave here)
      -> decode + augment -> streaming_split(equal=True) -> N Train workers

From webdataset tars the read itself takes the plan, reads only the kept
samples' bytes and gives their index and weight (:mod:`pipeline.train.tar_reads`);
decoding and the split follow as above.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline import storage
from pipeline.cli import option
from pipeline.prune.actor import actor_name
from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.prune.policies import POLICIES
from pipeline.train.loop import KEEP_CHECKPOINTS, PRUNER_STATE, TRAIN_STATE, PhaseClock
from pipeline.train.models import MODELS
from pipeline.train.pruning import Pruning
from pipeline.data.contract import DEFAULT_TEMPLATES, KEY, ColumnMapping
from pipeline.data.shards import check_shards, class_names, dataset_metadata, list_shards, read_shards

log = logging.getLogger(__name__)

# Ray Train's controller takes a worker's report when it polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's next report waits
# until the last one is taken; the run's start and end wait for polls too. Short epochs
# pay up to an interval each: a 4-epoch fit of 200 rows took 32-35 s at 2 s and 21-25 s
# at 0.5 s (BENCHMARKS.md). A value the user set wins.
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"

TASKS = ("classify", "clip")
TASK_DEFAULTS = {
    "classify": {"model": "resnet", "lr": 0.1, "weight_decay": 5e-4},
    # AdamW's peak for small ViTs from scratch, open_clip's weight decay (as jobs.pretrain_reference_clip).
    "clip": {"model": "mmdp-ref", "lr": 2e-3, "weight_decay": 0.1},
}


@dataclass(frozen=True)
class TrainConfig:
    """What the train job does; every field is a ``jobs.train`` flag."""

    OUTPUT: ClassVar[str] = "out"
    RAY: ClassVar[bool] = True

    data: str = field(metadata={"help": "dataset root with train/ and test/ shard folders (and metadata.json) (URL)"})
    scores: str = field(metadata={"help": "output folder of the score job for the train split (URL)"})
    out: str = field(metadata={"help": "run folder: metrics.json, config.json, plans.json, checkpoint/"})
    task: str = option("classify", "what to train: 'classify' (image -> label, cross entropy) or 'clip' (an open_clip "
                                   "model on image-caption pairs, open_clip's contrastive loss)", choices=TASKS)
    columns: str = option("mmdp", "column mapping of the shards: mmdp, img2dataset, or pairs like image=jpg,label=cls")
    classes: tuple[str, ...] | None = option(None, "class names (label i is the i-th); default: the dataset's "
                                                   "metadata.json (clip: optional, for zero-shot accuracy)")
    policy: str = option("mmdp", "pruning policy", choices=tuple(POLICIES))
    keep_ratio: float = option(DEFAULT_KEEP_RATIO, "the budget: share of full's sample passes a pruning epoch spends "
                                                   "(exactly: random, clip_filter, infobatch_exact; at most: mmdp, the "
                                                   "excluded noise first, then well-learned samples)")
    epochs: int = option(20, "training epochs (the reference protocol uses 20)")
    workers: int = option(2, "Ray Train workers")
    use_gpu: bool = option(False, "one GPU per worker")
    # A fraction so that Train workers leave CPUs to the Ray Data tasks that
    # feed them (two workers of 1 CPU on 2 cores leave none, and the run waits forever).
    cpus_per_worker: float = option(0.5, "CPUs each Train worker reserves")
    threads: int = option(1, "torch threads per worker")
    seed: int = option(0, "seed for the model, the plans and the augmentations")
    model: str | None = option(None, "classify: resnet or cnn (default resnet); clip: an open_clip config name "
                                     "(default mmdp-ref)")
    width: int = option(8, "channels of the model's first stage (0 = the model's default)")
    batch_size: int = option(128, "samples per step per worker")
    lr: float | None = option(None, "peak learning rate, cosine schedule (default: classify 0.1, SGD with "
                                    "momentum 0.9; clip 2e-3, AdamW)")
    weight_decay: float | None = option(None, "weight decay (default: classify 5e-4; clip 0.1, on matrices only)")
    warmup_steps: int = option(50, "linear warm-up steps before the cosine decay")
    augment: bool = option(True, "random 2-px shifts (classify: and horizontal flips)")
    step_schedule: str = option("full", "optimiser steps per epoch: 'full' = as many as an unpruned epoch, on batches "
                                        "shrunk with the plan; 'batch' = batches of --batch-size, fewer steps",
                                choices=("full", "batch"))
    eval_every: int = option(1, "evaluate on the test split every this many epochs (and always after the last)")
    checkpoint_every: int = option(1, "checkpoint (model, optimiser, pruner state) every this many epochs and after "
                                      "the last; a failure goes back to the last checkpoint")
    shuffle_buffer: int = option(2048, "rows each worker mixes before batching, reshuffled every epoch (0: read order)")
    # With one worker, rows arrive in file order every epoch, so a resumed run
    # repeats an uninterrupted one bit for bit; with several, which worker
    # gets which block still depends on timing.
    preserve_order: bool = option(False, "feed rows in input order (reproducible single-worker runs)")
    signal: str = option("auto", "consistency column: clip_margin, clip_score, or auto (margin when scored in label mode)",
                       choices=("auto", "clip_margin", "clip_score"))
    noise_fraction: float | None = option(
        None, "mmdp, clip_cut: share of samples excluded as likely noise; none = estimated from the scores "
              "(the low mode of the consistency histogram, Otsu's cut; 0 if it has one mode)")
    policy_params: tuple[str, ...] = option((), "more policy knobs as name=value, comma-separated (e.g. loss_weight=0.3)")
    reference_keys: str | None = option(None, "trajectory: a text file (URL) of keys of rows known to be clean, one "
                                              "per line (about 1%% of the rows); their losses are the reference")
    max_failures: int = option(2, "worker failures Ray Train recovers from (from the last checkpoint)")
    max_reports_in_flight: int = option(8, "loss reports a worker may have unacknowledged before it waits")
    pruner_partitions: int | None = option(None, "actors the pruner's per-sample state is split over (default: "
                                                 "one per 50M samples); workers send each loss to its partition")
    tar_reads: str = option("kept", "webdataset train shards: 'kept' reads only the samples each epoch's plan keeps "
                                    "(byte ranges, from an offset index built once per tar); 'all' streams every "
                                    "tar whole (Ray Data's webdataset reader)", choices=("kept", "all"))
    tar_index: str | None = option(None, "folder for the tars' offset indexes, which runs on the same data can share "
                                         "(default: OUT/tar_index)")
    max_gap_bytes: int = option(0, "kept tar reads: read through up to this many bytes of pruned samples to join two "
                                   "reads (fewer requests, more bytes)")
    resume_from: str | None = option(None, "a checkpoint folder to continue from (same config)")
    stop_after: int | None = option(None, "stop after this many epochs (the plan still covers --epochs)")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        # Task-dependent defaults, resolved here so config.json records what ran.
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.task == "classify" and self.model not in MODELS:
            raise ValueError(f"--model {self.model!r}: the classifier is one of {', '.join(MODELS)}")
        if self.task == "clip":
            from pipeline.score.clip_models import model_config

            model_config(self.model)  # a ValueError naming the known configs
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if self.noise_fraction is not None and not 0 <= self.noise_fraction < 1:
            raise ValueError(f"--noise-fraction must be in [0, 1), got {self.noise_fraction}")
        parse_params(self.policy_params)
        if (self.policy == "trajectory") != (self.reference_keys is not None):
            raise ValueError("--reference-keys goes with --policy trajectory, which needs it")
        ColumnMapping.parse(self.columns)
        if self.epochs < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("--epochs, --workers and --batch-size must be at least 1")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("--eval-every and --checkpoint-every must be >= 1")
        if self.shuffle_buffer < 0:
            raise ValueError("--shuffle-buffer must be >= 0")
        if self.max_gap_bytes < 0:
            raise ValueError("--max-gap-bytes must be >= 0")
        if self.pruner_partitions is not None and self.pruner_partitions < 1:
            raise ValueError("--pruner-partitions must be >= 1")


def parse_params(pairs: tuple[str, ...]) -> dict:
    """``("loss_weight=0.3", "loss_ramp_epochs=2")`` -> ``{"loss_weight": 0.3, "loss_ramp_epochs": 2}``."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--policy-params: expected name=value, got {pair!r}")
        try:
            params[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"--policy-params: {name.strip()} needs a number, got {value!r}") from None
    return params


def read_split(data: str, split: str, columns: str = "mmdp", caption: bool = False,
               listing: tuple[str, list[str]] | None = None) -> ray.data.Dataset:
    """A split of the dataset at ``data`` (its ``split`` folder of parquet or tar shards) as
    ``(key, image, label)`` rows, and ``caption`` too if asked (lazy); ``listing`` as :func:`read_shards` takes it."""
    fields = split_fields(caption)
    return read_shards(storage.join(data, split), columns, tuple(fields), listing).select_columns(fields)


def training_rows(cfg: TrainConfig, pruning: Pruning, caption: bool = False) -> ray.data.Dataset:
    """The train split as each epoch's plan: :func:`read_split`'s rows through :meth:`Pruning.dataset`.

    From webdataset tars (with ``--tar-reads kept``) only the samples the
    epoch keeps are read (:mod:`pipeline.train.tar_reads`); their offset
    indexes are built first where ``--tar-index`` lacks them. Every policy
    reads so, ``full`` too (its reads cover whole blocks of each tar), so
    that policies compared on tars are read by the same reader.
    """
    kind, files = list_shards(storage.join(cfg.data, "train"))
    if kind != "webdataset" or cfg.tar_reads != "kept":
        return pruning.dataset(read_split(cfg.data, "train", cfg.columns, caption, (kind, files)))
    from pipeline.train.tar_reads import build_indexes

    check_shards(kind, files)
    shards = build_indexes(files, cfg.tar_index or storage.join(cfg.out, "tar_index"))
    return pruning.tar_dataset(shards, cfg.columns, tuple(split_fields(caption)), cfg.max_gap_bytes)


def split_fields(caption: bool = False) -> list[str]:
    """The contract columns training reads: key, image, label, and the caption if asked."""
    return [KEY, "image", "caption", "label"] if caption else [KEY, "image", "label"]


def evaluation_dataset(data: str, columns: str = "mmdp") -> ray.data.Dataset:
    """The test split, decoded, with the key hash that splits evaluation across workers as ``index``."""
    from pipeline.train.stages import test_decode_stage, test_stage

    return (read_split(data, "test", columns).map_batches(test_stage, batch_format="numpy")
            .map_batches(test_decode_stage, batch_format="numpy"))


def build_datasets(cfg: TrainConfig, pruning: Pruning, classes: list[str], templates: list[str]) -> dict:
    """The training dataset (the plan's rows of each epoch, decoded) and the test split, for ``cfg.task``."""
    if cfg.task == "clip":
        from pipeline.train.clip import pair_stage, test_pair_stage

        text = {"model": cfg.model, "classes": tuple(classes), "templates": tuple(templates)}
        train = training_rows(cfg, pruning, caption=True).map_batches(
            pair_stage, fn_kwargs={**text, "augment": cfg.augment, "seed": cfg.seed}, batch_format="numpy")
        test = read_split(cfg.data, "test", cfg.columns, caption=True).map_batches(
            test_pair_stage, fn_kwargs=text, batch_format="numpy")
        return {"train": train, "test": test}
    from pipeline.train.stages import decode_stage

    train = training_rows(cfg, pruning).map_batches(
        decode_stage, fn_kwargs={"augment": cfg.augment, "seed": cfg.seed}, batch_format="numpy")
    return {"train": train, "test": evaluation_dataset(cfg.data, cfg.columns)}


def run_trainer(cfg: TrainConfig, loop, loop_config: dict, datasets: dict, name: str) -> ray.train.Result:
    """Run ``loop`` on ``cfg.workers`` Ray Train workers; Ray keeps its run folder in ``cfg.out``/ray.

    ``datasets["train"]`` is split equally across the workers, every other
    dataset goes whole to each; failed workers restart from the last
    checkpoint, up to ``cfg.max_failures`` times.

    Raises:
        The run's error, when it failed for good.
    """
    # mmdp's filesystem for an object store: its retries and endpoint, in Ray Train's uploads too.
    ray_fs, ray_storage = storage.filesystem_for(storage.join(cfg.out, "ray"))
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)  # read when fit() starts the controller
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=_ingest_options(cfg)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage,
            storage_filesystem=None if storage.is_local(cfg.out) else ray_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def check_checkpoint(url: str) -> None:
    """A ValueError, before any training, unless ``url`` is a checkpoint folder this mmdp resumes from."""
    if not storage.exists(storage.join(url, TRAIN_STATE)):
        raise ValueError(f"--resume-from {url}: no checkpoint there (a run's checkpoint/ folder holds {TRAIN_STATE})")
    if not storage.exists(storage.join(url, PRUNER_STATE)):
        raise ValueError(f"--resume-from {url}: the checkpoint has no {PRUNER_STATE}, so an older mmdp wrote it "
                         "(with the pruner's state inside it, as pruner.pt); resume it with the mmdp that wrote it, "
                         "or train afresh")


def start_pruning(cfg: TrainConfig, name: str | None = None) -> Pruning:
    """The run's pruner (its actor started, named ``name``), as ``cfg``'s flags set it up."""
    return Pruning.from_scores(cfg.scores, policy=cfg.policy, epochs=cfg.epochs, keep_ratio=cfg.keep_ratio,
                               seed=cfg.seed, signal=cfg.signal, noise_fraction=cfg.noise_fraction,
                               policy_params=parse_params(cfg.policy_params),
                               max_reports_in_flight=cfg.max_reports_in_flight, name=name,
                               num_partitions=cfg.pruner_partitions, reference_keys=cfg.reference_keys)


def fit(cfg: TrainConfig) -> dict:
    """Train with pruning; writes the run folder and returns the metrics."""
    from pipeline.train.loop import train_loop_per_worker

    started = time.perf_counter()
    storage.check_not_pending(cfg.data)
    storage.check_not_pending(cfg.scores)
    if cfg.resume_from:
        check_checkpoint(cfg.resume_from)
    classes = class_names(cfg.data, cfg.classes, required=cfg.task == "classify")
    templates = list(dataset_metadata(cfg.data).get("templates") or DEFAULT_TEMPLATES)
    run_id = uuid.uuid4().hex[:8]
    pruning = start_pruning(cfg, actor_name(run_id))
    log.info("policy %s with %s", cfg.policy, pruning.params or "its defaults")
    loop_config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    loop_config.update(pruning=pruning, num_classes=len(classes), class_names=classes, templates=templates,
                       num_samples=pruning.num_samples,
                       epochs=cfg.stop_after if cfg.stop_after else cfg.epochs, plan_epochs=cfg.epochs)
    result = run_trainer(cfg, train_loop_per_worker, loop_config, build_datasets(cfg, pruning, classes, templates),
                         f"mmdp-{run_id}")
    history = _checkpoint_json(result.checkpoint, "history.json")
    plans = _checkpoint_json(result.checkpoint, "plans.json")
    _copy_checkpoint(result.checkpoint, storage.join(cfg.out, "checkpoint"))
    pruning.shutdown()
    totals = {
        "epochs": len(history),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "epoch_seconds": round(sum(h["epoch_seconds"] for h in history), 2),
        "train_seconds": round(sum(h["train_seconds"] for h in history), 2),
        # Training time by phase (PhaseClock); 0 for epochs of a run resumed from an older mmdp.
        **{f"{phase}_seconds": round(sum(h.get(f"{phase}_seconds", 0.0) for h in history), 2)
           for phase in PhaseClock.PHASES},
        "samples_forwarded": int(sum(h["samples_forwarded"] for h in history)),
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "num_samples": pruning.num_samples,
        "restarts": history[-1].get("restarts", 0) if history else 0,
        "signal": pruning.signal,
        "policy_params": pruning.params,
    }
    metrics = {"epochs": history, "totals": totals}
    storage.write_json(plans, storage.join(cfg.out, "plans.json"))
    storage.write_json(metrics, storage.join(cfg.out, "metrics.json"))
    return metrics


def _ingest_options(cfg: TrainConfig):
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or cfg.preserve_order
    return options


def _checkpoint_json(checkpoint: ray.train.Checkpoint, name: str):
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return json.loads(f.read())


def _copy_checkpoint(checkpoint: ray.train.Checkpoint, url: str) -> None:
    """Copy the checkpoint's files to ``url``, streamed store to store (the pruner state is never in memory here)."""
    fs, path = storage.filesystem_for(url)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(checkpoint.path, path, source_filesystem=checkpoint.filesystem, destination_filesystem=fs)
