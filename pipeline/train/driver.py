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
from typing import NamedTuple

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline import storage
from pipeline.cli import check_apart
from pipeline.prune.actor import actor_name
from pipeline.prune.policies import reads
from pipeline.train.config import TrainConfig, parse_params
from pipeline.train.loop import (CHECKPOINT_FILES, KEEP_CHECKPOINTS, PRUNER_STATE, RUN_CONFIG, TRAIN_STATE,
                                 PhaseClock, saved_pruner_state)
from pipeline.train.pruning import NO_CAPTION_MARGIN, Pruning
from pipeline.data.contract import DEFAULT_TEMPLATES, KEY, ColumnMapping
from pipeline.data.shards import (check_named_columns, check_shards, class_names, dataset_metadata, list_shards,
                                  footer_stats, read_shards)

log = logging.getLogger(__name__)

# Ray Train's controller takes a worker's report when it polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's next report waits
# until the last one is taken; the run's start and end wait for polls too. Short epochs
# pay up to an interval each: a 4-epoch fit of 200 rows took 32-35 s at 2 s and 21-25 s
# at 0.5 s (BENCHMARKS.md). A value the user set wins.
POLL_INTERVAL_ENV, POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"

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
    shards = build_indexes(files, tar_index_folder(cfg))  # built by check_inputs where no manifest counts the tars
    return pruning.tar_dataset(shards, cfg.columns, tuple(split_fields(caption)), cfg.max_gap_bytes)


def split_fields(caption: bool = False) -> list[str]:
    """The contract columns training reads: key, image, label, and the caption if asked."""
    return [KEY, "image", "caption", "label"] if caption else [KEY, "image", "label"]


def evaluation_dataset(data: str, columns: str = "mmdp", num_classes: int | None = None) -> ray.data.Dataset:
    """The test split, decoded, with the key hash that splits evaluation across workers as ``index``; a row
    without one of the ``num_classes`` labels or a decodable image is an error naming it."""
    from pipeline.train.stages import test_decode_stage, test_stage

    return (read_split(data, "test", columns).map_batches(test_stage, fn_kwargs={"num_classes": num_classes},
                                                          batch_format="numpy")
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
        decode_stage, fn_kwargs={"augment": cfg.augment, "seed": cfg.seed, "num_classes": len(classes)},
        batch_format="numpy")
    return {"train": train, "test": evaluation_dataset(cfg.data, cfg.columns, len(classes))}


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


class Resume(NamedTuple):
    """Where a ``--resume-from`` checkpoint takes a run: the epochs trained, the wall seconds of the runs
    that trained them, and the pruner state it names (found, and committed)."""

    epochs_done: int
    earlier_seconds: float
    pruner_state: str


def resume_checkpoint(url: str) -> str:
    """The checkpoint folder ``--resume-from url`` names: ``url`` itself where it holds one, else the run
    folder ``url``'s latest whole checkpoint: its ``checkpoint/`` (which a run copies there once it ends), or
    one Ray Train keeps in ``ray/NAME/checkpoint_*`` (all a run killed before its end leaves). Whole: its
    files there, at the sizes its ``files.json`` gives (Ray Train copies a checkpoint file by file, so a
    kill during the copy leaves one in part; an older mmdp's checkpoint has no list: its files there).

    Raises:
        ValueError: ``url`` is a checkpoint in part, or no whole checkpoint is there.
    """
    if storage.exists(storage.join(url, TRAIN_STATE)):
        # (An older mmdp's checkpoint, without the list, gets check_checkpoint's own messages.)
        missing = _not_whole(url) if storage.exists(storage.join(url, CHECKPOINT_FILES)) else ""
        if missing:
            raise ValueError(f"--resume-from {url}: the checkpoint is in part ({missing}); its run stopped while "
                             "saving it: resume from its run folder, which takes the latest whole one")
        return url
    candidates = [storage.join(url, "checkpoint")]
    fs, path = storage.filesystem_for(storage.join(url, "ray"))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        runs = [e.path for e in fs.get_file_info(pafs.FileSelector(path)) if e.type == pafs.FileType.Directory]
        for run in runs:
            candidates += [storage.join(storage.join(url, "ray"), e.path[len(path):].lstrip("/"))
                           for e in fs.get_file_info(pafs.FileSelector(run))
                           if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]
    whole = [(_epoch(c), c) for c in candidates if storage.exists(storage.join(c, TRAIN_STATE)) and not _not_whole(c)]
    if not whole:
        raise ValueError(f"--resume-from {url}: no checkpoint there, nor a whole one in its run folder's checkpoint/ "
                         f"or ray/*/checkpoint_* (a checkpoint holds {TRAIN_STATE})")
    return max(whole)[1]


def _not_whole(checkpoint: str) -> str:
    """What is missing or short in ``checkpoint`` (by its files.json), "" where nothing is."""
    names = (TRAIN_STATE, PRUNER_STATE, "history.json")
    listed = storage.join(checkpoint, CHECKPOINT_FILES)
    expected = storage.read_json(listed) if storage.exists(listed) else dict.fromkeys(names)
    fs, path = storage.filesystem_for(checkpoint)
    sizes = {e.base_name: e.size for e in fs.get_file_info(pafs.FileSelector(path)) if e.type == pafs.FileType.File}
    for name, size in expected.items():
        if name not in sizes:
            return f"no {name}"
        if size is not None and sizes[name] != size:
            return f"{name} {sizes[name]:,} bytes of {size:,}"
    return ""


def _epoch(checkpoint: str) -> int:
    return int(storage.read_json(storage.join(checkpoint, "history.json"))[-1]["epoch"])


def check_checkpoint(cfg: TrainConfig) -> Resume:
    """Where ``cfg``'s ``--resume-from`` checkpoint takes its run; a ValueError, before any training,
    unless it is a checkpoint this mmdp resumes from with these flags and an epoch is left to train.
    ``cfg.resume_from`` is a checkpoint folder (:func:`resume_checkpoint`)."""
    url = cfg.resume_from
    if not storage.exists(storage.join(url, TRAIN_STATE)):
        raise ValueError(f"--resume-from {url}: no checkpoint there (a run's checkpoint/ folder holds {TRAIN_STATE})")
    if not storage.exists(storage.join(url, PRUNER_STATE)):
        raise ValueError(f"--resume-from {url}: the checkpoint has no {PRUNER_STATE}, so an older mmdp wrote it "
                         "(with the pruner's state inside it, as pruner.pt); resume it with the mmdp that wrote it, "
                         "or train afresh")
    saved = storage.join(url, RUN_CONFIG)
    if storage.exists(saved):  # (an older mmdp's checkpoint has none)
        was = storage.read_json(saved)
        now = json.loads(json.dumps({name: getattr(cfg, name) for name in was}))
        # A budget the policy does not read changes nothing (an older mmdp recorded 0.6 for every policy).
        unread = () if reads(cfg.policy, "keep_ratio") else ("keep_ratio",)
        differ = [f"--{name.replace('_', '-')} {was[name]} (this run: {now[name]})"
                  for name in was if name not in unread and now[name] != was[name]]
        if differ:
            raise ValueError(f"--resume-from {url}: its run trained with {', '.join(differ)}; a resume continues "
                             "that run, so these flags stay as they were (or train afresh)")
    # The history ends with the checkpoint's own epoch (the loop saves them together); a small read, not train.pt.
    history = storage.read_json(storage.join(url, "history.json"))
    done = int(history[-1]["epoch"]) + 1
    last = cfg.epochs if cfg.stop_after is None else cfg.stop_after  # the epochs this run trains up to
    if done >= last:  # the loop would train nothing and leave no checkpoint to report
        flag = "--epochs" if cfg.stop_after is None else "--stop-after"
        hint = ("its run has trained all of them" if done >= cfg.epochs else
                f"resume with a --stop-after above {done} (at most --epochs {cfg.epochs}) or none")
        raise ValueError(f"--resume-from {url}: the checkpoint has {done} epochs trained, so none "
                         f"is left to train with {flag} {last}: {hint}")
    state = saved_pruner_state(url)
    if not storage.is_complete(state):
        raise ValueError(f"--resume-from {url}: the pruner state it names, {state}, is not there (its run folder "
                         "moved without it, or it was removed)")
    # (An older mmdp's checkpoint has no wall_seconds: its epochs' own seconds, a lower bound.)
    earlier = history[-1].get("wall_seconds") or sum(h.get("epoch_seconds", 0.0) for h in history)
    return Resume(done, earlier, state)


def check_inputs(cfg: TrainConfig) -> None:
    """Refuse what would fail the run before its folder is marked pending (``pipeline.cli.execute``), so that
    a refused re-run or resume leaves the run there committed: a ``--out`` that is or holds ``--data`` or
    ``--scores``, or lies in a folder the run reads; an input not committed or not there; a classifier
    without class names; a ``--columns`` spec naming a column no shard of a split has
    (:func:`~pipeline.data.shards.check_named_columns`); ``--signal clip_margin`` on scores made in caption
    mode (their ``config.json``); a test row without an image, or in classify training without a label of one
    of the classes, as far as the footers tell (:func:`check_test_split`); in classify training on scores
    made in caption mode, such a train row too (:func:`check_train_labels`); scores of other
    rows than the train split's (:func:`check_scores_match` by their count, :func:`check_keys_scored` by
    their keys); a
    checkpoint that cannot resume (:func:`check_checkpoint`). (The signal's values and every shard's footer
    are checked once the run reads them.)

    Raises:
        ValueError, InputError: naming the flag or folder.
    """
    # The run folder may not be or hold an input, nor lie in a folder the run reads (beside them is fine).
    check_apart("out", cfg.out, "data", cfg.data, [storage.join(cfg.data, split) for split in ("train", "test")])
    check_apart("out", cfg.out, "scores", cfg.scores)
    storage.check_not_pending(cfg.data)
    storage.check_not_pending(cfg.scores)
    storage.list_files(storage.join(cfg.scores, "scores"))  # a scores folder there, committed
    if cfg.reference_keys and not storage.exists(cfg.reference_keys):
        raise storage.InputError(f"--reference-keys {cfg.reference_keys}: no such file")
    classes = class_names(cfg.data, cfg.classes, required=cfg.task == "classify")
    mapping = ColumnMapping.parse(cfg.columns)
    for split in ("train", "test"):
        check_named_columns(storage.join(cfg.data, split), mapping, tuple(split_fields(cfg.task == "clip")))
    check_test_split(storage.join(cfg.data, "test"), mapping, len(classes) if cfg.task == "classify" else None)
    mode = score_mode(cfg.scores)
    if cfg.signal == "clip_margin" and mode == "caption":
        raise ValueError(f"--signal clip_margin: {cfg.scores} was scored in caption mode (its config.json), and "
                         f"{NO_CAPTION_MARGIN}")
    if cfg.task == "classify" and mode == "caption":
        check_train_labels(cfg, mapping, len(classes))
    check_scores_match(cfg)
    check_keys_scored(cfg, mapping)
    if cfg.resume_from:
        check_checkpoint(dataclasses.replace(cfg, resume_from=resume_checkpoint(cfg.resume_from)))


def check_test_split(test: str, mapping: ColumnMapping, num_classes: int | None = None) -> None:
    """Refuse a test split that evaluation would stop at after training has run, as far as its parquet
    footers tell (no data page is read): rows with no image (a null image column, as img2dataset keeps its
    failed downloads); with ``num_classes`` (classify training), rows with no label, or a shard whose
    integer labels reach outside ``0..num_classes-1``. The test accuracy counts every test row. (The
    train split's such rows are the score job's rejects: never trained on. A label the statistics do not
    range, a float or a file written without them, is checked as evaluation reads it.)

    Raises:
        ValueError: the count or the shard, and what to do.
    """
    columns = [mapping.image] + ([mapping.label] if num_classes is not None else [])
    stats = footer_stats(test, columns)
    missing = sum(s[mapping.image].nulls for _, s in stats if mapping.image in s)
    if missing:
        raise ValueError(f"{test}: {missing:,} rows have no image (a null {mapping.image}, as img2dataset keeps its "
                         "failed downloads); the test accuracy counts every test row: leave them out of the test "
                         "split (python -m jobs.make_dataset does) and train again")
    if num_classes is not None:
        check_labels(test, stats, mapping.label, num_classes,
                     "test accuracy needs every test row labelled with one of the classes: fix the test split")


def check_labels(split: str, stats: list, label: str, num_classes: int, fix: str) -> None:
    """Refuse, by a split's parquet footer ``stats`` (:func:`~pipeline.data.shards.footer_stats`, with the
    ``label`` column asked for), a shard without the label column, rows with a null label, or a shard whose
    integer labels reach outside ``0..num_classes-1``; ``fix`` says what to do.

    Raises:
        ValueError: the shard or the count, and ``fix``.
    """
    without = [file_url for file_url, s in stats if label not in s]
    if without:
        more = (f" (and {len(without) - 1:,} more shard{'s' if len(without) > 2 else ''})"
                if len(without) > 1 else "")
        raise ValueError(f"{without[0]}{more}: no label column {label!r} (--columns names the label's column); "
                         f"{fix}")
    unlabelled = sum(s[label].nulls for _, s in stats)
    if unlabelled:
        raise ValueError(f"{split}: {unlabelled:,} rows have no label (a null {label}); {fix}")
    for file_url, s in stats:
        if _outside_classes(s[label], num_classes):
            raise ValueError(f"{file_url}: labels {s[label].low}..{s[label].high}, not all among the {num_classes} "
                             f"classes (0..{num_classes - 1}); {fix}")


def _outside_classes(stats, num_classes: int) -> bool:
    """Whether a label column's footer range (:class:`~pipeline.data.shards.ColumnStats`) reaches outside
    ``0..num_classes-1`` (False where the footers kept no range)."""
    return stats.low is not None and (stats.low < 0 or stats.high >= num_classes)


def check_train_labels(cfg: TrainConfig, mapping: ColumnMapping, num_classes: int) -> None:
    """Classify training on scores made in caption mode, which keeps rows without a usable label (label
    mode rejects them, with the reason): refuse a train row the run would train on without a label of one
    of the classes, before the run (else the first one stops training, exit 1 after Ray Train's retries).
    The footers flag the shards (no label column, null labels, a label range outside the classes); only
    those are read, and a flagged row the score job rejected (no image, nor a caption or label) is never
    trained on and passes. Tars, and labels the statistics do not range, are checked as training reads them.

    Raises:
        ValueError: the shard, the count and the first key, and what to do.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.score.commit import REJECTS

    fix = ("classify training needs every train row labelled with one of the classes: score the split in label "
           "mode (it rejects such rows, with the reason), fix the split, or train with --task clip")
    label, stats = mapping.label, dict(footer_stats(storage.join(cfg.data, "train"), [mapping.label]))
    flagged = [url for url, st in stats.items()
               if label not in st or st[label].nulls or _outside_classes(st[label], num_classes)]
    if not flagged:
        return
    rejected = _keys_of(storage.join(cfg.scores, REJECTS))
    for url in flagged:
        table = storage.read_table(url, columns=[mapping.key] + ([label] if label in stats[url] else []))
        try:
            keys = table.column(mapping.key).cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return  # keys as bytes that are not text: training's own check names the row
        if label in table.column_names:
            values = table.column(label)
            bad = pc.is_null(values, nan_is_null=True)
            if pa.types.is_integer(values.type):  # the footers range integers alone
                bad = pc.or_(bad, pc.fill_null(pc.or_(pc.less(values, 0), pc.greater_equal(values, num_classes)),
                                               False))
            keys = keys.filter(bad)
        keys = keys.filter(pc.invert(pc.is_in(keys, value_set=rejected)))
        if len(keys):
            what = (f"no label of the {num_classes} classes (a null {label}, or one outside 0..{num_classes - 1})"
                    if label in table.column_names else
                    f"no label column {label!r} (--columns names the label's column)")
            raise ValueError(f"{url}: {len(keys):,} train rows the scores kept have {what}, the first "
                             f"{keys[0].as_py()!r}; {fix}")


def _keys_of(folder: str):
    """The keys (an Arrow string array) of the parquet shards in ``folder``; empty where there are none."""
    import pyarrow as pa

    try:
        files = storage.list_files(folder)
    except storage.InputError:  # none written
        return pa.array([], pa.string())
    columns = [storage.read_table(url, columns=[KEY]).column(KEY) for url in files]
    return pa.chunked_array([c for column in columns for c in column.chunks], pa.string()).combine_chunks()


def score_mode(scores: str) -> str | None:
    """The mode the score job scored in (``label`` or ``caption``, its ``config.json``); None if not recorded."""
    config = storage.join(scores, "config.json")
    return storage.read_json(config).get("mode") if storage.exists(config) else None


def check_scores_match(cfg: TrainConfig) -> None:
    """Refuse ``--scores`` that account for other rows than ``--data``'s train split (training finds each
    row's score by its key, and a row without one would not be trained on, unsaid): the rows the score
    job scored or rejected (its ``summary.json``) must be the split's: its manifest's count, or the sum of
    its parquet footers; webdataset tars that no mmdp job committed are counted by their offset indexes,
    built here for ``--tar-reads kept`` (which reads by them; with ``all`` they are not counted)."""
    summary = storage.join(cfg.scores, "summary.json")
    accounted = storage.read_json(summary).get("rows_in") if storage.exists(summary) else None
    if accounted is None:
        return
    train = storage.join(cfg.data, "train")
    rows, counted = split_rows(train), ""
    if rows is None and cfg.tar_reads == "kept":
        from pipeline.train.tar_reads import build_indexes

        kind, files = list_shards(train)
        check_shards(kind, files)
        # The folder fit() builds them in (absolute: Ray's tasks need not share this process's directory).
        indexes = [index for _, _, index in build_indexes(files, tar_index_folder(absolute_paths(cfg)))]
        rows, counted = sum(f.rows for f in check_shards("parquet", indexes)), " (its tars' offset indexes)"
    if rows is not None and accounted != rows:
        raise ValueError(f"--scores {cfg.scores} scored or rejected {accounted:,} rows (its summary.json), but "
                         f"{train} holds {rows:,}{counted}: they are the scores of other rows. Score this split "
                         f"(python -m jobs.score --input {train} ...) and pass that output")


def check_keys_scored(cfg: TrainConfig, mapping: ColumnMapping) -> None:
    """Refuse ``--scores`` that hold none of three keys of the train split's first parquet shard (its
    lowest, middle and highest), scored or rejected: another split's scores of the same row count
    (``jobs.make_dataset --limit`` makes both splits that size) pass :func:`check_scores_match`, and
    training then found no row's index (``index_stage`` leaves rows without a score out, as rejects):
    every epoch trained on nothing, the run exited 0. Read: that shard's key column, the key column of the
    score files whose footer key ranges hold the three keys, and the rejects' keys. Tars, and score files
    without key statistics, are not checked here.

    Raises:
        ValueError: naming the shard, the scores and what to do.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.data.shards import string_ranges
    from pipeline.score.commit import REJECTS, SCORES

    kind, files = list_shards(storage.join(cfg.data, "train"))
    if kind != "parquet" or not files:
        return
    try:
        keys = pc.unique(storage.read_table(files[0], columns=[mapping.key]).column(mapping.key).cast(pa.string()))
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError, storage.InputError):
        return  # no such column, keys as bytes that are not text, a bad shard: the read path's checks name them
    keys = keys.drop_null()
    if not len(keys):
        return
    scored = storage.list_files(storage.join(cfg.scores, SCORES))
    ranges = string_ranges(scored, KEY)
    if any(r is None for r in ranges):
        return  # a file that does not range its keys: telling would read every such file
    # Three of the shard's keys (its lowest, middle and highest), each looked for in the score files whose
    # key range holds it (one, as the score job writes them) and in the rejects: the scores of these rows
    # hold every one, scored or rejected; another split's hold none.
    ordered = keys.take(pc.array_sort_indices(keys))
    sample = sorted({ordered[0].as_py(), ordered[len(ordered) // 2].as_py(), ordered[-1].as_py()})
    holding = sorted({url for url, r in zip(scored, ranges) for key in sample if r and r[0] <= key <= r[1]})
    wanted = pa.array(sample, pa.string())
    held = (lambda column: len(column) and pc.any(pc.is_in(wanted, value_set=column.cast(pa.string()))).as_py())
    if any(held(storage.read_table(url, columns=[KEY]).column(KEY).combine_chunks()) for url in holding):
        return
    if held(_keys_of(storage.join(cfg.scores, REJECTS))):  # read only where the scored rows lack them
        return
    raise ValueError(f"--scores {cfg.scores} holds none of the keys {', '.join(map(repr, sample))} of "
                     f"{files[0]}, scored or rejected: they are the scores of other rows (another split of as many "
                     f"rows?). Score this split (python -m jobs.score --input {storage.join(cfg.data, 'train')} "
                     "...) and pass that output")


def tar_index_folder(cfg: TrainConfig) -> str:
    """Where the train split's tar offset indexes are kept: ``--tar-index``, else the run folder's ``tar_index``."""
    return cfg.tar_index or storage.join(cfg.out, "tar_index")


def split_rows(url: str) -> int | None:
    """The rows of the shard folder ``url``: its manifest's count where a job committed it, else its parquet
    footers' sum; None for webdataset tars that no manifest counts."""
    committed = storage.manifest(url)  # None for another writer's _SUCCESS (Spark's empty marker)
    if committed is not None and committed.get("rows") is not None:
        return int(committed["rows"])
    kind, files = list_shards(url)
    return None if kind != "parquet" else sum(f.rows for f in check_shards(kind, files))


def start_pruning(cfg: TrainConfig, name: str | None = None) -> Pruning:
    """The run's pruner (its actor started, named ``name``), as ``cfg``'s flags set it up."""
    return Pruning.from_scores(cfg.scores, policy=cfg.policy, epochs=cfg.epochs, keep_ratio=cfg.keep_ratio,
                               seed=cfg.seed, signal=cfg.signal, noise_fraction=cfg.noise_fraction,
                               policy_params=parse_params(cfg.policy_params),
                               max_reports_in_flight=cfg.max_reports_in_flight, name=name,
                               num_partitions=cfg.pruner_partitions, reference_keys=cfg.reference_keys)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local paths made absolute against this process's working directory.

    Ray Train runs each worker in a folder of its own (its session's), so a
    relative ``--out`` or ``--resume-from`` would name another folder there:
    the resume would not find its checkpoint, and old pruner states would not
    be removed. URLs (``s3://``, ``gs://``) are left as they are.
    """
    def absolute(url: str | None) -> str | None:
        return storage.filesystem_for(url)[1] if url is not None and storage.is_local(url) else url

    return dataclasses.replace(cfg, **{name: absolute(getattr(cfg, name)) for name in cfg.SHARED_PATHS})


# What a run writes in its folder besides config.json (and the tar indexes, which runs on the same data share).
RUN_OUTPUTS = ("ray", "pruner", "checkpoint", "metrics.json", "plans.json")


def clear_earlier_run(cfg: TrainConfig) -> None:
    """Remove what an earlier run wrote in ``cfg.out`` (:data:`RUN_OUTPUTS`): its Ray Train folders, pruner
    states and checkpoints would stay beside this run's, in its manifest. Not where this run resumes one
    from its own folder (a continuation), nor before the resume's checkpoint was read."""
    if cfg.resume_from and storage.contains(cfg.out, cfg.resume_from):
        return
    for name in RUN_OUTPUTS:
        storage.remove(storage.join(cfg.out, name))


def fit(cfg: TrainConfig) -> dict:
    """Train with pruning; writes the run folder and returns the metrics."""
    from pipeline.train.loop import train_loop_per_worker

    started, started_at = time.perf_counter(), time.time()
    cfg = absolute_paths(cfg)
    if cfg.resume_from:  # a run folder: its latest whole checkpoint
        cfg = dataclasses.replace(cfg, resume_from=resume_checkpoint(cfg.resume_from))
    last = cfg.epochs if cfg.stop_after is None else cfg.stop_after  # the epochs this run trains up to
    # The whole fit's wall seconds before this run (the runs it resumes, up to their checkpoint), and the
    # pruner state the checkpoint names (execute checked the checkpoint before the run folder was touched).
    resume = check_checkpoint(cfg) if cfg.resume_from else None
    clear_earlier_run(cfg)
    earlier = resume.earlier_seconds if resume else 0.0
    classes = class_names(cfg.data, cfg.classes, required=cfg.task == "classify")
    templates = list(dataset_metadata(cfg.data).get("templates") or DEFAULT_TEMPLATES)
    run_id = uuid.uuid4().hex[:8]
    pruning = start_pruning(cfg, actor_name(run_id))
    log.info("policy %s with %s", cfg.policy, pruning.params or "its defaults")
    loop_config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    loop_config.update(pruning=pruning, num_classes=len(classes), class_names=classes, templates=templates,
                       num_samples=pruning.num_samples,
                       epochs=last, plan_epochs=cfg.epochs, fit_started_at=started_at - earlier,
                       resumed_state=resume.pruner_state if resume else None, run_config={name: getattr(cfg, name) for name in cfg.RESUME_SAME})
    try:
        result = run_trainer(cfg, train_loop_per_worker, loop_config,
                             build_datasets(cfg, pruning, classes, templates), f"mmdp-{run_id}")
        history = _checkpoint_json(result.checkpoint, "history.json")
        plans = _checkpoint_json(result.checkpoint, "plans.json")
        _copy_checkpoint(result.checkpoint, storage.join(cfg.out, "checkpoint"))
    finally:  # a failed run too: the actor holds the per-sample state, and a driver may go on (a benchmark's)
        pruning.shutdown()
    totals = {
        "epochs": len(history),
        "wall_seconds": round(earlier + time.perf_counter() - started, 2),  # over every run of a resumed fit
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
