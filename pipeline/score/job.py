"""Ray runners: the Ray Data scoring pipeline.

Stages are plain callables from :mod:`pipeline.data.validate` and
:mod:`pipeline.score.scorer`; this module only decides where they run: row checks,
caption tokens and image decoding in CPU tasks, the CLIP model in an
autoscaling actor pool (on GPUs, ``--actors-per-gpu`` actors share each), writing
through Ray Data. On GPUs the actors decode JPEGs themselves (nvJPEG, see
``--decode``), since CPU decoding cannot keep up with one: the CPU tasks then
read, check, tokenise and read each image's header (which files the device
takes), and the actors take their batches as Arrow, so that an actor's own
CPU, which feeds its GPU, neither copies the files nor reads their headers.

Without GPUs, the row checks, tokens and decoding ask what a scoring actor
asks (``--actor-cpus``), so Ray Data fuses them into the actors (it fuses
consecutive stages that ask the same resources): they run batch by batch
before the model, decoded pixels never cross the object store, and no other
process imports torch and open_clip for the transform.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from pipeline import storage
from pipeline.data import shards
from pipeline.cli import check_apart, option, ray_layout
from pipeline.data.contract import DEFAULT_TEMPLATES, KEY, ColumnMapping
from pipeline.data.validate import RowValidator
from pipeline.score import REFERENCE_MODEL, TINY_MODEL
from pipeline.score.commit import SCORED_AT, commit_staged

log = logging.getLogger(__name__)
# Ray Data writes the scored rows here before commit_staged commits them as scores/ and rejects/.
STAGING = "_staging"
STAGED_ROWS_PER_FILE = 100_000
# CPUs a staging write task asks. A write of STAGED_ROWS_PER_FILE scored rows (keys and a few
# floats) is light; asking a whole CPU, the write waited behind every read task while the
# scoring actors and reads held the cluster's CPUs (on 2 cores, until the last shard was read),
# and the object store held every scored block of the job until then.
WRITE_TASK_CPUS = 0
# The object store (GiB) a job without GPUs keeps its blocks in flight in (ScoreConfig.in_flight_gib).
CPU_IN_FLIGHT_GIB = 0.5


@dataclass(frozen=True)
class ScoreConfig:
    """What the score job does; every field is a ``jobs.score`` flag."""

    OUTPUT: ClassVar[str] = "output"
    RAY: ClassVar[bool] = True
    RAY_DASHBOARD: ClassVar[bool] = False  # Ray Data alone: a local run starts Ray without it (connect_ray)
    # Read and written by Ray's workers: local paths only where they are one machine (check_shared_paths).
    SHARED_PATHS: ClassVar[tuple[str, ...]] = ("input", "output")
    SHARED_FILES: ClassVar[tuple[str, ...]] = ("pretrained",)  # a local checkpoint file; else an open_clip tag

    input: str = field(metadata={"help": "shards to score: a folder or file URL (local, s3://, gs://) of parquet or webdataset tars"})
    output: str = field(metadata={"help": "where scores/, rejects/ and summary.json go (URL)"})
    model: str = option(REFERENCE_MODEL, f"open_clip model name, or a config shipped with mmdp ({TINY_MODEL}, {REFERENCE_MODEL})")
    pretrained: str | None = option(None, "open_clip pretrained tag, checkpoint path or object-store URL; none = random weights")
    mode: str = option("caption", "score against each row's caption, or against class prompts from its label",
                     choices=("caption", "label"))
    classes: tuple[str, ...] | None = option(None, "class names for label prompts; default: the dataset's metadata.json")
    templates: tuple[str, ...] | None = option(None, "label prompts' templates, comma-separated, {} for the class "
                                               "name (one with a comma: name it in metadata.json); default: the "
                                               "dataset's metadata.json, else a small ensemble (DEFAULT_TEMPLATES)")
    columns: str = option("mmdp", "column mapping: mmdp, img2dataset, or pairs like image=jpg,caption=txt")
    batch_size: int = option(256, "rows per scoring batch")
    min_actors: int = option(1, "scoring actors the pool keeps (autoscaled between min and max)")
    max_actors: int = option(4, "most scoring actors the pool grows to (on GPUs: 1 / --actors-per-gpu of one each)")
    # Below 1 leaves the read tasks a CPU on a small machine: a pool
    # that takes every CPU starves its own input (the job then waits forever).
    # An autoscaling cluster may have no GPU node up yet when the job starts:
    # --use-gpu makes the pool ask for GPUs, and the autoscaler starts them.
    use_gpu: bool | None = option(None, "score on GPUs (see --actors-per-gpu); default: only if the cluster has GPUs at start")
    # A GPU actor outruns the CPUs that decode for it (PIL's resize is most of a CPU's 2 ms per
    # photo), so on GPUs the actors decode JPEGs themselves, with nvJPEG, and the CPUs only read.
    decode: str = option("auto", "where images are decoded: tasks (PIL, on the CPUs), actors (on the scoring "
                         "actors' device: nvJPEG on a GPU), auto = actors when they have GPUs",
                         choices=("auto", "tasks", "actors"))
    # One actor per GPU leaves the GPU idle while Ray hands the actor its next batch (converting a batch's
    # image bytes, building output blocks); two or more interleave that with each other's GPU work.
    actors_per_gpu: int = option(1, "scoring actors sharing each GPU (each asks 1/N of one, and holds its own "
                                 "model copy); with GPUs only")
    actor_cpus: float = option(1.0, "CPUs each scoring actor reserves on a cluster without GPUs (it also decodes "
                               "there)")
    torch_threads: int = option(0, "torch threads per scoring actor; 0 = as many as the actor's CPUs")
    # Ray Data's own default lets a job fill half the object store (30% of a node's memory). Without GPUs
    # 0.5 GiB keeps the scoring actor as busy and the node's peak memory 0.4 GB lower (BENCHMARKS.md);
    # with GPUs Ray Data's default stays until a GPU run measures the budget against the GPU's rate.
    in_flight_gib: float | None = option(None, "GiB of the object store the job's blocks in flight may take "
                                         "(Ray Data backpressures its reads beyond it); 0 = Ray Data's default, "
                                         f"half the store; none = {CPU_IN_FLIGHT_GIB} without GPUs on one "
                                         "machine, Ray Data's default with them or on a cluster")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        if self.in_flight_gib is not None and self.in_flight_gib < 0:
            raise ValueError("--in-flight-gib must be >= 0")
        if self.min_actors < 1 or self.max_actors < self.min_actors:
            raise ValueError(f"need 1 <= --min-actors <= --max-actors, got {self.min_actors} and {self.max_actors}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.actor_cpus <= 0:
            raise ValueError("--actor-cpus must be positive")
        if self.actors_per_gpu < 1:
            raise ValueError("--actors-per-gpu must be at least 1")
        _check_templates(self.templates or (), "--templates")

    def check_inputs(self) -> None:
        """Refuse what would fail the job, before its output is marked pending (``pipeline.cli.execute``), so
        that a re-run with a typo leaves the output it would have replaced committed: an output that is,
        holds or lies in the input, an input that is not there or is no shard folder (one listing), a
        ``--model`` open_clip does not know or a ``--pretrained`` that names no weights, label mode without
        class names, a ``--columns`` spec naming a column no shard has (the first shard's
        footer; all only where that one lacks it). Every shard's footer is read beside the scoring (:func:`_score`).

        Raises:
            ValueError, InputError: naming the flag or file.
        """
        from pipeline.score.clip_models import check_pretrained  # torch and open_clip: not for --help

        check_apart("output", self.output, "input", self.input)
        check_pretrained(self.model, self.pretrained)
        listing = shards.list_shards(self.input)
        label_prompts(self)
        shards.check_named_columns(self.input, ColumnMapping.parse(self.columns), listing=listing)


@functools.lru_cache(maxsize=4)
def _decoder(model: str, pretrained: str | None):
    from pipeline.score.scorer import ImageDecoder

    # uint8 pixels: a quarter of the bytes to ship to the scoring actors.
    return ImageDecoder(model, pretrained, pixel_dtype="uint8")


@functools.lru_cache(maxsize=4)
def _device_decoder(model: str, pretrained: str | None):
    from pipeline.score.scorer import TensorImageDecoder

    return TensorImageDecoder(model, pretrained)  # here only to read headers: mark()


def _prepare_stage(batch: dict, model: str, pretrained: str | None, mode: str, classes: tuple[str, ...],
                   decode: bool) -> dict:
    """The CPU tasks' share: row checks, then the images (``decode``: decoded; else their headers read
    for the actors' device decoder), and caption tokens."""
    from pipeline.score.scorer import tokenize_captions

    batch = RowValidator(mode, list(classes))(batch)
    # The decoder keeps a row's earlier reason (a failed check) over its own.
    batch = _decoder(model, pretrained)(batch) if decode else _device_decoder(model, pretrained).mark(batch)
    return tokenize_captions(batch, model) if mode == "caption" else batch


class _Scorer:
    """Actor-side wrapper: one ClipScorer per actor, loaded once; with ``decode``, a decoder on its device first."""

    def __init__(self, decode: bool, **kwargs):
        from pipeline.score.scorer import ClipScorer, TensorImageDecoder

        self.scorer = ClipScorer(**kwargs)
        self.decoder = TensorImageDecoder(kwargs["model"], kwargs["pretrained"], self.scorer.device) if decode else None

    def __call__(self, batch: dict | pa.Table) -> dict:
        out = self.scorer(self.decoder(decoder_batch(batch)) if self.decoder else batch)
        ok = out["error"] == ""
        return {
            KEY: out[KEY],
            "clip_score": np.where(ok, out["clip_score"], np.nan).astype(np.float32),
            "clip_margin": np.asarray(out.get("clip_margin", np.full(len(ok), np.nan)), np.float32),
            "status": np.where(ok, "ok", "rejected").astype(object),
            "error": out["error"],
            # When this batch was scored: the job's summary gives the first one's delay from the start.
            SCORED_AT: np.full(len(ok), time.time()),
        }


def decoder_batch(block: pa.Table) -> dict:
    """A block as the device decoder takes it: every column but ``image`` as NumPy (Ray Data's own
    conversion), ``image`` left Arrow, so its files are viewed, not copied into Python ``bytes``
    (:func:`pipeline.score.scorer.encoded_files`)."""
    batch = BlockAccessor.for_block(block.drop_columns(["image"])).to_batch_format("numpy")
    batch["image"] = block.column("image")
    return batch


def _metadata_files(input_url: str) -> list[dict]:
    """The dataset's metadata.json files beside the split: the split folder's, then its parent's, those there."""
    up = storage.parent(input_url)  # None above a bucket's root
    urls = [storage.join(input_url, "metadata.json")] + ([storage.join(up, "metadata.json")] if up else [])
    return [storage.read_json(url) for url in urls if storage.exists(url)]


def _named(metadata: list[dict], name: str) -> tuple[str, ...]:
    """``name`` (a list) from the first metadata file that names it; () if none does (img2dataset's has no class
    names: caption mode needs none, label mode then says so)."""
    return next((tuple(m[name]) for m in metadata if m.get(name)), ())


def resolve_classes(cfg: ScoreConfig, metadata: list[dict] | None = None) -> tuple[str, ...]:
    """Class names from the config, else the dataset's metadata.json next to the split folder (``metadata``:
    those files, already read)."""
    if cfg.classes:
        return tuple(cfg.classes)
    return _named(_metadata_files(cfg.input) if metadata is None else metadata, "classes")


def resolve_templates(cfg: ScoreConfig, metadata: list[dict] | None = None) -> tuple[str, ...]:
    """Label prompts' templates from the config, else the dataset's metadata.json (as the train job's zero-shot
    evaluation and the reference pre-training read them), else :data:`DEFAULT_TEMPLATES`."""
    if cfg.templates:
        return tuple(cfg.templates)
    named = _named(_metadata_files(cfg.input) if metadata is None else metadata, "templates")
    _check_templates(named, "the dataset's metadata.json")
    return named or DEFAULT_TEMPLATES


def _check_templates(templates: tuple[str, ...], where: str) -> None:
    """A template without ``{}`` (or ``{class}``) makes one prompt for every class, whose margins are all 0."""
    bare = [t for t in templates if "{}" not in t and "{class}" not in t]
    if bare:
        raise ValueError(f"{where}: templates need {{}} where the class name goes, not {bare[0]!r}")


def classes_for(cfg: ScoreConfig, metadata: list[dict] | None = None) -> tuple[str, ...]:
    """:func:`resolve_classes`; label mode without two or more is refused (ValueError): its margin compares a
    row's own class with the best other one."""
    classes = resolve_classes(cfg, metadata)
    if cfg.mode == "label" and not classes:
        raise ValueError("label mode needs class names: pass --classes or keep metadata.json beside the split")
    if cfg.mode == "label" and len(classes) < 2:
        raise ValueError(f"label mode needs two or more class names, got {list(classes)}: its margin compares a "
                         "row's own class with the best other one (score one class in caption mode)")
    return classes


def label_prompts(cfg: ScoreConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(:func:`classes_for`, :func:`resolve_templates` in label mode, else ()), the metadata files read once,
    and only where a flag does not name what they would."""
    needed = not cfg.classes or (cfg.mode == "label" and not cfg.templates)
    metadata = _metadata_files(cfg.input) if needed else []
    classes = classes_for(cfg, metadata)
    return classes, resolve_templates(cfg, metadata) if cfg.mode == "label" else ()


def score(cfg: ScoreConfig) -> dict:
    """Run the score job; returns its summary. Writes ``scores/``, ``rejects/`` and ``summary.json``."""
    classes, templates = label_prompts(cfg)
    if templates:
        log.info("label prompts: %d classes x %d templates (%s)", len(classes), len(templates),
                 "; ".join(templates))
    ctx = ray.data.DataContext.get_current()
    # The commit's output does not depend on the order rows are staged in, so
    # Ray Data may finish blocks in any order. The object store budget is
    # restored afterwards: later datasets of this process (a TorchTrainer's)
    # inherit the context.
    options = ctx.execution_options
    saved = options.resource_limits
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    nodes, cpus_here = ray_layout()
    budget = in_flight_bytes(cfg, use_gpu, one_machine=nodes == 1 and cpus_here > 0)
    if budget:
        options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
    try:
        return _score(cfg, classes, templates, use_gpu)
    finally:
        options.resource_limits = saved


def in_flight_bytes(cfg: ScoreConfig, use_gpu: bool, one_machine: bool = True) -> int:
    """The object store the job's blocks in flight may take, in bytes; 0: Ray Data's own default.

    :data:`CPU_IN_FLIGHT_GIB` by default only without GPUs on ``one_machine`` (Ray with one node, CPUs on
    the driver's), where it was measured: Ray Data applies it to the whole cluster, and on many nodes it
    would keep most scoring actors waiting for input.
    """
    default = CPU_IN_FLIGHT_GIB if not use_gpu and one_machine else 0.0
    gib = cfg.in_flight_gib if cfg.in_flight_gib is not None else default
    return int(gib * 2**30)


def _score(cfg: ScoreConfig, classes: tuple[str, ...], templates: tuple[str, ...], use_gpu: bool) -> dict:
    start = time.time()  # wall clock: the scoring actors stamp their batches with it too
    kind, files = shards.list_shards(cfg.input)
    # Every shard's footer is checked beside the scoring, not before it: with thousands of shards in
    # an object store the reads take a while, and nothing waits for them unless the job fails.
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Every column is read (and must join across shards): the projection needs the footers first.
        checked = pool.submit(_timed, shards.check_shards, kind, files, ColumnMapping.parse(cfg.columns), None, True)
        try:
            summary = _score_listed(cfg, classes, templates, kind, files, use_gpu, start, checked)
        except Exception:
            checked.result()  # a bad shard's own error (naming it) before the failure it caused
            raise
    log.info("%d shards checked in %.1f s, beside the scoring", len(files), checked.result()[0])
    return summary


def actor_resources(cfg: ScoreConfig, use_gpu: bool) -> dict:
    """What each scoring actor asks of Ray: a share of a GPU and one CPU to feed it, or ``--actor-cpus``."""
    if use_gpu:
        return {"num_gpus": 1 / cfg.actors_per_gpu, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": cfg.actor_cpus}


def actor_threads(cfg: ScoreConfig, use_gpu: bool) -> int:
    """Torch threads of each scoring actor: ``--torch-threads``, else one per CPU it asks (at least one)."""
    return cfg.torch_threads or max(1, int(actor_resources(cfg, use_gpu)["num_cpus"]))


def decodes_in_actors(cfg: ScoreConfig, use_gpu: bool) -> bool:
    """``--decode``: the actors decode when asked to, and (auto) on GPUs where this torchvision can; else
    the CPU tasks do, with PIL. Asked for a device decoder that this torchvision lacks: its ImportError."""
    if cfg.decode == "tasks" or (cfg.decode == "auto" and not use_gpu):
        return False
    from pipeline.score.scorer import device_jpeg_decoder

    try:
        device_jpeg_decoder()
    except ImportError as exc:
        if cfg.decode == "actors":
            raise
        log.warning("%s; images are decoded with PIL in the CPU tasks", exc)
        return False
    return True


def _timed(fn, *args) -> tuple[float, object]:
    """``fn(*args)``'s seconds and result."""
    began = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - began, result


def _score_listed(cfg: ScoreConfig, classes: tuple[str, ...], templates: tuple[str, ...], kind: str,
                  files: list[str], use_gpu: bool, start: float, checked: Future) -> dict:
    in_actors = decodes_in_actors(cfg, use_gpu)
    resources = actor_resources(cfg, use_gpu)
    ds = shards.read_listed(cfg.input, kind, files, cfg.columns).map_batches(
        _prepare_stage,
        batch_size=cfg.batch_size,
        # The CPUs the actors ask: without GPUs Ray Data fuses this stage into them (module docstring);
        # GPU actors ask a GPU too, so there it stays in tasks. For 50k rows on 2 cores fusing took
        # 43 s against 48 s, 9 CPU-s less (medians of five pairs) than decode tasks of their own.
        num_cpus=resources["num_cpus"],
        fn_kwargs={"model": cfg.model, "pretrained": cfg.pretrained, "mode": cfg.mode, "classes": classes,
                   "decode": not in_actors},
    )
    ds = ds.map_batches(
        _Scorer,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        fn_constructor_kwargs={
            "decode": in_actors,
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "mode": cfg.mode,
            "classes": list(classes) or None,
            "templates": list(templates) or None,
            "device": "cuda" if use_gpu else "cpu",
            "num_threads": actor_threads(cfg, use_gpu),
        },
        # Decoding in the actors, the block stays Arrow: the files reach the decoder without a copy.
        batch_format="pyarrow" if in_actors else "numpy",
        **resources,
    )
    # The job's output folder is pending until the job skeleton commits it
    # (pipeline.cli.execute): a job killed half-way leaves it refused by readers,
    # and its staging folder is cleared by the next run here.
    staging = storage.join(cfg.output, STAGING)
    fs, staging_path = storage.filesystem_for(staging)
    if storage.exists(staging):
        fs.delete_dir(staging_path)
    try:
        # Few staged files (Ray's sort shuffles files x files pieces), each in one write task.
        # The write tasks ask no CPU (WRITE_TASK_CPUS): they run while the job scores, not after it.
        ds.write_parquet(staging_path, filesystem=fs, min_rows_per_file=STAGED_ROWS_PER_FILE,
                         ray_remote_args={"num_cpus": WRITE_TASK_CPUS})
        # Every shard passed its check before anything is committed; parquet footers give the rows that
        # the commit must account for, each scored or rejected (webdataset tars do not say).
        footers = checked.result()[1]
        expected = None if footers is None else sum(f.rows for f in footers)
        summary = commit_staged(storage.list_files(staging) if storage.exists(staging) else [], cfg.output, start,
                                expected)
    finally:
        if storage.exists(staging):
            fs.delete_dir(staging_path)
    return summary
