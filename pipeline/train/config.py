"""What the train job does: :class:`TrainConfig`, one field a ``jobs.train`` flag.

Kept apart from the driver (Ray Train, torch) so that ``--help`` and a
usage error answer at once; the checks that need torch or open_clip import
them when a config is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.cli import option
from pipeline.data.contract import ColumnMapping
from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.prune.policies import POLICIES, check_settings, reads
from pipeline.score import REFERENCE_MODEL

TASKS = ("classify", "clip")
TASK_DEFAULTS = {
    "classify": {"model": "resnet", "lr": 0.1, "weight_decay": 5e-4},
    # AdamW's peak for small ViTs from scratch, open_clip's weight decay (as jobs.pretrain_reference_clip).
    "clip": {"model": REFERENCE_MODEL, "lr": 2e-3, "weight_decay": 0.1},
}


@dataclass(frozen=True)
class TrainConfig:
    """What the train job does; every field is a ``jobs.train`` flag."""

    OUTPUT: ClassVar[str] = "out"
    RAY: ClassVar[bool] = True
    # Read or written by Ray's workers and actors: local paths only where they are one machine
    # (pipeline.cli.check_shared_paths), made absolute for Train workers that run in folders of their own.
    SHARED_PATHS: ClassVar[tuple[str, ...]] = ("data", "scores", "out", "resume_from", "reference_keys", "tar_index")
    # What a --resume-from run keeps of the run it continues: what it trains, how, and its plans (the
    # schedule's steps follow the batch size and workers). Where files are, the device, evaluation and
    # checkpoint cadence, retries and the pruner's layout may change.
    RESUME_SAME: ClassVar[tuple[str, ...]] = (
        "task", "columns", "classes", "policy", "keep_ratio", "epochs", "workers", "seed", "model", "width",
        "batch_size", "lr", "weight_decay", "warmup_steps", "augment", "step_schedule", "signal",
        "noise_fraction", "policy_params")

    data: str = field(metadata={"help": "dataset root with train/ and test/ shard folders (and metadata.json) (URL)"})
    scores: str = field(metadata={"help": "output folder of the score job for the train split (URL)"})
    out: str = field(metadata={"help": "run folder: metrics.json, config.json, plans.json, checkpoint/"})
    task: str = option("classify", "what to train: 'classify' (image -> label, cross entropy) or 'clip' (an open_clip "
                                   "model on image-caption pairs, open_clip's contrastive loss)", choices=TASKS)
    columns: str = option("mmdp", "column mapping of the shards: mmdp, img2dataset, or pairs like image=jpg,label=cls")
    classes: tuple[str, ...] | None = option(None, "class names (label i is the i-th); default: the dataset's "
                                                   "metadata.json (clip: optional, for zero-shot accuracy)")
    policy: str = option("mmdp", "pruning policy", choices=tuple(POLICIES))
    keep_ratio: float | None = option(None, "the budget: share of full's sample passes a pruning epoch spends "
                                            "(exactly: random, clip_filter, infobatch_exact; mmdp: the share its "
                                            "pruning stops at, the excluded noise first, then well-learned samples, "
                                            f"more where too few are well learned); default "
                                            f"{DEFAULT_KEEP_RATIO}; the other policies decide their own share")
    epochs: int = option(20, "training epochs (the reference protocol uses 20)")
    workers: int = option(2, "Ray Train workers")
    use_gpu: bool = option(False, "one GPU per worker")
    # A fraction so that Train workers leave CPUs to the Ray Data tasks that
    # feed them (two workers of 1 CPU on 2 cores leave none, and the run waits forever).
    cpus_per_worker: float = option(0.5, "CPUs each Train worker reserves")
    threads: int = option(1, "torch threads per worker")
    seed: int = option(0, "seed for the model, the plans and the augmentations")
    model: str | None = option(None, "classify: resnet or cnn (default resnet); clip: an open_clip CLIP config "
                                     "name (default mmdp-ref; not SigLIP or CoCa)")
    width: int = option(8, "classify: channels of the model's first stage (0 = the model's default); the clip "
                           "task's model is --model's config")
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
              "(the low mode of the consistency histogram, Otsu's cut; 0 if it has one mode; at most 0.5)")
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
    resume_from: str | None = option(None, "a checkpoint folder to continue from, or a run folder (its latest "
                                           "whole checkpoint, a killed run's too), with the training flags of the "
                                           "run that saved it (policy, epochs, seed, batch size, workers, lr, ...)")
    stop_after: int | None = option(None, "stop after this many epochs, 1 to --epochs (the plan still covers "
                                          "--epochs); none: all")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        # Task-dependent defaults, resolved here so config.json records what ran.
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.task == "classify":
            from pipeline.train.models import MODELS

            if self.model not in MODELS:
                raise ValueError(f"--model {self.model!r}: the classifier is one of {', '.join(MODELS)}")
        if self.task == "clip":
            from pipeline.score.clip_models import contrastive_config

            contrastive_config(self.model)  # a ValueError naming the known configs, or why not this one
        params = parse_params(self.policy_params)
        check_settings(self.policy, params, keep_ratio=self.keep_ratio, noise_fraction=self.noise_fraction,
                       signal=self.signal, reference=self.reference_keys is not None, flags=True)
        if self.keep_ratio is None and reads(self.policy, "keep_ratio"):
            object.__setattr__(self, "keep_ratio", DEFAULT_KEEP_RATIO)  # config.json records what ran
        ColumnMapping.parse(self.columns)
        if self.epochs < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("--epochs, --workers and --batch-size must be at least 1")
        # 0 or more than --epochs would train all epochs, or extra ones at learning rate 0; below 0, none.
        if self.stop_after is not None and not 1 <= self.stop_after <= self.epochs:
            raise ValueError(f"--stop-after must be in 1..{self.epochs} (--epochs), got {self.stop_after}")
        if not (self.lr > 0 and self.weight_decay >= 0):  # NaN too
            raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.threads < 1 or self.max_reports_in_flight < 1:
            raise ValueError("--threads and --max-reports-in-flight must be at least 1")
        if self.width < 0:
            raise ValueError(f"--width must be >= 0 (0: the model's default), got {self.width}")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("--eval-every and --checkpoint-every must be >= 1")
        if self.shuffle_buffer < 0:
            raise ValueError("--shuffle-buffer must be >= 0")
        if self.max_gap_bytes < 0:
            raise ValueError("--max-gap-bytes must be >= 0")
        if self.pruner_partitions is not None and self.pruner_partitions < 1:
            raise ValueError("--pruner-partitions must be >= 1")

    def check_inputs(self) -> None:
        """What fails the run, refused before its folder is marked pending (:func:`pipeline.train.driver.check_inputs`)."""
        from pipeline.train.driver import check_inputs

        check_inputs(self)


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
