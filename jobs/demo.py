"""mmdp end to end on one machine: noisy data -> reference CLIP -> scores -> training -> report.

Local (Ray starts on this machine; about 8 minutes on 2 CPU cores)::

    python -m jobs.demo --out runs/demo

On a cluster (stage outputs in an object store; ``--source``: Fashion-MNIST's
four ``*-ubyte.gz`` files, uploaded once from ``/usr/share/datasets/fashion-mnist``
or the Fashion-MNIST project, since the head node that builds the dataset has
no copy of its own)::

    ray job submit --working-dir . -- python -m jobs.demo --out s3://bucket/mmdp-demo \\
        --source s3://bucket/fashion-mnist --workers 4

Stages, each one of mmdp's jobs run with the arguments printed before it:

1. ``jobs.make_dataset``: Fashion-MNIST image-caption pairs with injected
   label noise (``--noise``), the ground truth kept aside;
2. ``jobs.pretrain_reference_clip``: the small reference CLIP model, trained
   offline on the clean ``reference`` split;
3. ``jobs.score``: every train pair's CLIP consistency (Ray Data);
4. ``jobs.train``, once per policy (Ray Train + the pruning actor);
5. ``jobs.report``: ``OUT/report/report.md`` (+ ``report.html`` and ``figures/``).

A stage whose output is already complete is reused (``--no-reuse`` redoes
it), so a second run with more policies only trains those. Only a stage
built from this run's flags is reused (its ``config.json`` says): one built
from others (another ``--seed``) is refused before any stage runs; give those
settings another ``--out``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline import storage
from pipeline.cli import log, option, run_job
from pipeline.data.reference import FASHION_MNIST_DIR
from pipeline.prune.budget import DEFAULT_KEEP_RATIO
from pipeline.prune.policies import POLICIES, reads
from pipeline.score import REFERENCE_MODEL

@dataclass(frozen=True)
class DemoConfig:
    """What the demo does; every field is a flag."""

    OUTPUT: ClassVar[str] = "out"
    # Ray started first, as the training stages need it: with the dashboard (pipeline.cli.connect_ray).
    RAY: ClassVar[bool] = True
    # Every stage's output, which the next stages' Ray workers read: on a cluster, refused before the first.
    SHARED_PATHS: ClassVar[tuple[str, ...]] = ("out",)

    out: str = field(metadata={"help": "folder or URL for every stage's output and the report"})
    source: str | None = option(None, "folder or URL (s3://, gs://) with Fashion-MNIST's four *-ubyte.gz files, "
                                      f"read by the machine running the demo's driver (default: {FASHION_MNIST_DIR})")
    noise: str = option("symmetric:0.3", "label noise injected into the train split (kind:rate,...)")
    train_rows: int = option(8000, "rows in the train split and in the test split")
    reference_rows: int = option(5000, "clean rows the reference CLIP model is trained on")
    clip_epochs: int = option(16, "reference CLIP pre-training epochs")
    policies: tuple[str, ...] = option(("full", "mmdp"), "policies to train, comma-separated")
    keep_ratio: float = option(DEFAULT_KEEP_RATIO, "--keep-ratio of jobs.train for the policies with a budget: "
                                                   "the share of full's sample passes a pruning epoch spends")
    epochs: int = option(16, "training epochs per policy")
    workers: int = option(2, "Ray Train workers")
    seed: int = option(0, "seed for the data, the models and the plans")
    reuse: bool = option(True, "skip a stage whose output is already complete")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        object.__setattr__(self, "policies", tuple(dict.fromkeys(self.policies)))  # each trained once
        unknown = sorted(set(self.policies) - set(POLICIES))
        if unknown or not self.policies:
            raise ValueError(f"--policies: unknown {unknown or 'none given'}; known: {', '.join(POLICIES)}")
        if min(self.train_rows, self.reference_rows, self.clip_epochs, self.epochs, self.workers) < 1:
            raise ValueError("--train-rows, --reference-rows, --clip-epochs, --epochs and --workers must be >= 1")
        if not 0 < self.keep_ratio <= 1:  # else the first training stage refuses it, after minutes of the others
            raise ValueError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if "trajectory" in self.policies:  # else its training stage fails after minutes of the others' work
            raise ValueError("--policies: trajectory needs the keys of known-clean pool rows, which the demo does not "
                             "have; run jobs.train with --policy trajectory --reference-keys FILE")


def stages(cfg: DemoConfig) -> list[tuple[str, str, object, list[str], str]]:
    """(stage, what, job module, argv, the stage's output folder) for each step."""
    from jobs import make_dataset, pretrain_reference_clip, report, score, train

    data, clip = storage.join(cfg.out, "data"), storage.join(cfg.out, "clip")
    scores = storage.join(cfg.out, "scores")
    s3 = ["--s3-endpoint", cfg.s3_endpoint] if cfg.s3_endpoint else []
    steps = [
        ("data", f"dataset with {cfg.noise} noise", make_dataset,
         ["--out", data, "--source", cfg.source or FASHION_MNIST_DIR, "--noise", cfg.noise,
          "--seed", str(cfg.seed), "--reference-size", str(cfg.reference_rows), "--limit", str(cfg.train_rows), *s3],
         data),
        ("clip", "reference CLIP pre-training", pretrain_reference_clip,
         ["--data", data, "--out", clip, "--epochs", str(cfg.clip_epochs), "--seed", str(cfg.seed)], clip),
        ("score", "CLIP consistency of every train pair", score,
         ["--input", storage.join(data, "train"), "--output", scores, "--model", REFERENCE_MODEL,
          "--pretrained", pretrain_reference_clip.checkpoint_url(clip), "--mode", "label", *s3], scores),
    ]
    for policy in cfg.policies:
        run = storage.join(cfg.out, "runs", policy)
        steps.append(("train", f"training with policy {policy}", train,
                      ["--data", data, "--scores", scores, "--out", run, "--policy", policy,
                       *(["--keep-ratio", str(cfg.keep_ratio)] if reads(policy, "keep_ratio") else []),
                       "--epochs", str(cfg.epochs),
                       "--workers", str(cfg.workers), "--seed", str(cfg.seed), *s3], run))
    steps.append(("report", "report", report, [cfg.out, "--out", report_dir(cfg), *s3], None))
    return steps


# What a stage built without a flag took for it (a dataset built before the demo named its --source).
UNSET = {"--source": FASHION_MNIST_DIR}


def reuse_plan(steps, cfg: DemoConfig) -> list[bool]:
    """Which stages stand as they are (:func:`reusable`), all checked before any runs: a stage after one
    that is built again (the dataset, the reference CLIP, the scores) is built again too, whatever its
    own output, since it was made from the inputs being replaced. The training stages depend on those
    three alone, not on one another.

    Raises:
        ValueError: as :func:`reusable`.
    """
    plan, rebuilt = [], False
    for stage, _, _, argv, output in steps:
        reuse = reusable(argv, output, cfg) and not rebuilt
        rebuilt = rebuilt or (stage in ("data", "clip", "score") and not reuse)
        plan.append(reuse)
    return plan


def reusable(argv: list[str], output: str | None, cfg: DemoConfig) -> bool:
    """Whether a stage's finished output stands for running it: complete, and built from this run's flags.

    Raises:
        ValueError: the output is complete, but its ``config.json`` says other flags built it
            (another demo's settings): reusing it would report that demo's results as this one's.
    """
    if not cfg.reuse or output is None or not storage.is_complete(output):
        return False
    config = storage.join(output, "config.json")
    if not storage.exists(config):
        raise ValueError(f"{output} is a finished stage without the config.json that says which flags built it; "
                         "give this run another --out")
    saved = storage.read_json(config)
    inside = storage.join(cfg.out, "")
    differ = []
    for flag, value in zip(argv[::2], argv[1::2]):  # a stage with an output takes --flag value pairs only
        # Flags that say where files are, not what the stage builds: the store's endpoint, and folders
        # inside --out (the demo's own stages, each checked in turn; the same wherever --out is moved).
        if flag == "--s3-endpoint" or value.startswith(inside):
            continue
        built = saved.get(flag[2:].replace("-", "_"))
        if built is None:  # a flag the stage was built without: its default
            built = UNSET.get(flag)
        if str(built) != value:  # the job saved the flag's value parsed from this same text
            differ.append(f"{flag} {built} (this run: {value})")
    if differ:
        raise ValueError(f"{output} is a finished stage built with {', '.join(differ)}; a stage is reused only "
                         "with the flags that built it: give these settings another --out")
    return True


def _work(cfg: DemoConfig, stage: str) -> int:
    """A stage's units of work (rows, times epochs where it has them): what its measured pace scales by."""
    return {"data": cfg.train_rows + cfg.reference_rows, "clip": cfg.reference_rows * cfg.clip_epochs,
            "score": cfg.train_rows, "train": cfg.train_rows * cfg.epochs, "report": 0}[stage]


def time_left(kinds: list[str], pace: dict[str, float], cfg: DemoConfig) -> float | None:
    """Seconds the stages ``kinds`` will take at the pace measured on this machine so far
    (seconds a unit of work, per kind of stage); None while a kind among them is not measured yet."""
    if any(kind not in pace and _work(cfg, kind) for kind in kinds):
        return None
    return sum(pace.get(kind, 0.0) * _work(cfg, kind) for kind in kinds)


def run(cfg: DemoConfig) -> int:
    steps = stages(cfg)
    reuse = reuse_plan(steps, cfg)  # refused before any stage runs
    started = time.perf_counter()
    pace: dict[str, float] = {}
    for number, (stage, what, job, argv, output) in enumerate(steps, start=1):
        left = time_left([s[0] for s in steps[number - 1:]], pace, cfg)
        estimate = "" if left is None else f", about {left:.0f} s left"
        banner = f"[{number}/{len(steps)}] {what}  (elapsed {time.perf_counter() - started:.0f} s{estimate})"
        if reuse[number - 1]:
            log.info("%s: reusing %s", banner, output)
            continue
        log.info("%s\n    python -m %s %s", banner, job.__name__, " ".join(argv))
        stage_started = time.perf_counter()
        code = job.main(argv)
        if code:
            log.error("stage %d (%s) failed with exit code %d; see the messages above", number, what, code)
            return code
        if _work(cfg, stage):
            pace[stage] = (time.perf_counter() - stage_started) / _work(cfg, stage)
    log.info("done in %.0f s: %s", time.perf_counter() - started, storage.join(report_dir(cfg), "report.md"))
    return 0


def report_dir(cfg: DemoConfig) -> str:
    return storage.join(cfg.out, "report")


def main(argv=None) -> int:
    return run_job(DemoConfig, argv, _run_or_fail, doc=__doc__, prog="python -m jobs.demo", check=_check_reuse)


def _check_reuse(cfg: DemoConfig) -> None:
    """A usage error, before the demo marks its folder pending, if a finished stage there was built from other flags."""
    for _, _, _, argv, output in stages(cfg):
        reusable(argv, output, cfg)


def _run_or_fail(cfg: DemoConfig) -> None:
    code = run(cfg)
    if code:  # a stage failed: its message is above; the demo's output stays uncommitted
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
