"""The training data's Ray Data stages: plain NumPy/PIL functions, no torch.

They run in Ray Data tasks every epoch, so they import nothing heavy: a task
worker that starts fresh (Ray retires idle workers) pays for its imports at
every epoch.

    read parquet -> index_stage -> keep_stage -> decode_stage -> Train workers
"""

from __future__ import annotations

import functools
import io
import zlib

import numpy as np
from PIL import Image

from pipeline.data.contract import KEY
from pipeline.prune.selection import MASK64, splitmix64_finalize

# Fashion-MNIST pixel statistics; any dataset's images are normalised alike
# since the default models are trained from scratch.
MEAN, STD = 0.2860, 0.3530


def sorted_lookup(sorted_values: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each wanted value in ``sorted_values``, whether it is there); positions of absent ones are junk."""
    pos = np.searchsorted(sorted_values, wanted).clip(0, max(len(sorted_values) - 1, 0))
    found = sorted_values[pos] == wanted if len(sorted_values) else np.zeros(len(wanted), bool)
    return pos, found


def encode_keys(keys) -> np.ndarray:
    """Keys (str) as a fixed-width bytes array of their UTF-8, for :func:`~pipeline.train.stages.sorted_lookup`."""
    return np.char.encode(np.asarray(keys, dtype=str), "utf-8") if len(keys) else np.zeros(0, dtype="S1")


# The columns index_stage and keep_stage add to a training row.
PLAN_COLUMNS = ("index", "weight", "epoch")


def index_stage(batch: dict, keys, key: str = KEY) -> dict:
    """Attach the dense sample ``index`` by the ``key`` column; rows the score table lacks (rejected) leave here.

    ``keys``: the score table's :class:`~pipeline.train.keys.KeyIndex` (its
    chunks resolved where a block's keys need them, once per process). Every
    column is kept, the key too.

    Raises:
        ValueError: the rows already have a column of a name the plan's stages add (``index``, ``weight``,
            ``epoch``): it would stand for, or be replaced by, the plan's.
    """
    taken = [name for name in PLAN_COLUMNS if name in batch]
    if taken:
        raise ValueError(f"the rows have column(s) {', '.join(taken)}, which the plan's stages add (the sample's "
                         f"index in the pruner, its plan weight, the epoch): rename or drop them before "
                         "Pruning.dataset()")
    index, found = keys.lookup(batch[key])
    return {"index": index[found], **{k: v[found] for k, v in batch.items()}}


def key_hash(keys) -> np.ndarray:
    """CRC-32 of each key: a test row's ``index`` (test rows are not in the pruner), which splits
    evaluation across workers the same way in any read order."""
    return np.fromiter((zlib.crc32(str(k).encode()) for k in keys), np.int64, len(keys))


def test_stage(batch: dict, num_classes: int | None = None) -> dict:
    """A test row with its key hash as ``index`` (:func:`key_hash`), its label checked; the key stays, for
    :func:`test_decode_stage`'s errors.

    Raises:
        ValueError: a row without a usable label (:func:`class_labels`): the
            test accuracy counts every row, so a row it cannot score is an
            error, not a row left out or counted wrong.
    """
    labels = class_labels(batch, num_classes, "test")
    return {"index": key_hash(batch[KEY]), KEY: batch[KEY], "image": batch["image"], "label": labels}


def class_labels(batch: dict, num_classes: int | None, split: str = "train") -> np.ndarray:
    """The batch's ``label`` column as int64 class indices, every one checked (vectorised) to be a class.

    A null label (NumPy batches hold an integer column with nulls as float
    NaN, which ``astype(np.int64)`` would turn into -2**63), a fraction, a
    negative one, or one of ``num_classes`` or more (where given) is no class.

    Raises:
        ValueError: naming the first such row's key (or index), its label and why, and how many the batch holds.
    """
    label = np.asarray(batch["label"])
    if label.dtype.kind in "iub":  # the usual case: no nulls in the block
        values, missing = label.astype(np.int64), np.zeros(len(label), bool)
        bad = values < 0
    elif label.dtype.kind == "f":
        missing = np.isnan(label)
        whole = np.isfinite(label) & (label == np.floor(label))
        values = np.where(whole, label, -1).astype(np.int64)
        bad = ~whole | (values < 0)
    else:  # object: Python ints and None
        missing = np.fromiter((v is None for v in label), bool, len(label))
        values = np.fromiter((-1 if v is None else int(v) for v in label), np.int64, len(label))
        bad = values < 0
    if num_classes is not None:
        bad |= values >= num_classes
    if bad.any():
        raise ValueError(_label_error(batch, label, bad, missing, num_classes, split))
    return values


def _row_name(batch: dict, i: int) -> str:
    if KEY in batch:
        key = batch[KEY][i]
        return repr(key.decode() if isinstance(key, bytes) else str(key))
    return f"of index {int(batch['index'][i])}" if "index" in batch else f"#{i} of its block"


def _label_error(batch: dict, label: np.ndarray, bad: np.ndarray, missing: np.ndarray, num_classes: int | None,
                 split: str) -> str:
    i = int(np.flatnonzero(bad)[0])
    classes = (f"one of the {num_classes} classes (0..{num_classes - 1})" if num_classes is not None
               else "a class (0, 1, ...)")
    value = label[i]
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    what = "no label (null)" if missing[i] else f"label {value} is not {classes}"
    others = int(bad.sum()) - 1
    more = f" ({others} more in its batch)" if others else ""
    # Short: Ray Train's error summary keeps the last 500 characters of a worker's traceback.
    need = ("test accuracy needs every test row labelled: fix the test split" if split == "test" else
            "classify training needs every row labelled: score in label mode (it rejects such rows) or fix the data")
    return f"{split} row {_row_name(batch, i)}: {what}{more}; {need}"


@functools.lru_cache(maxsize=8)
def _pruner(name: str):
    from pipeline.prune.actor import get_pruner

    return get_pruner(name)  # a handle stays valid across actor restarts


def epoch_plan(pruner_name: str) -> tuple[int, np.ndarray, np.ndarray]:
    """The current epoch's plan as the pruning actor published it: (epoch, kept sample indices (sorted), their weights).

    A read that never queues behind loss ingest; the arrays come from the
    object store (zero-copy where the process already holds them).
    """
    import ray

    actor = _pruner(pruner_name)
    epoch, plan_ref = ray.get(actor.published_plan.remote()) or ray.get(actor.current_plan.remote())
    kept, weights = ray.get(plan_ref[0])
    return epoch, kept, weights


def keep_stage(batch: dict, pruner_name: str) -> dict:
    """Keep the rows of this epoch's plan and attach their weights (runs in Ray Data tasks)."""
    epoch, kept, weights = epoch_plan(pruner_name)  # once per block: the stage gets whole blocks
    pos, mask = sorted_lookup(kept, batch["index"].astype(np.int64))
    out = {k: v[mask] for k, v in batch.items()}
    out["weight"] = weights[pos[mask]].astype(np.float32)
    out["epoch"] = np.full(int(mask.sum()), epoch, np.int64)
    return out


def decode_stage(batch: dict, augment: bool, seed: int, num_classes: int | None = None,
                 split: str = "train") -> dict:
    """PNG/JPEG bytes -> normalised float32 [n, 1, 28, 28], with a per-sample deterministic augmentation.

    The augmentation (a shift of up to 2 pixels, black fill, and a horizontal
    flip) is drawn per sample from (seed, epoch, sample), so a restarted run
    sees the same crops, and is applied to the whole batch at once.

    Raises:
        ValueError: a row without a usable label (:func:`class_labels`; a label
            of ``num_classes`` or more only where it is given), or whose image
            does not decode; the message names the ``split`` and the row's key.
    """
    labels = class_labels(batch, num_classes, split)  # before the decode: a cheap check fails first
    n = len(batch["index"])
    images = np.empty((n, 1, 28, 28), np.float32)
    for i in range(n):
        try:
            with Image.open(io.BytesIO(batch["image"][i])) as im:
                im = im if im.mode == "L" else im.convert("L")
                images[i, 0] = np.asarray(im if im.size == (28, 28) else im.resize((28, 28)), np.float32)
        except Exception as exc:  # PIL: OSError, SyntaxError, DecompressionBombError... for bytes of no image
            raise ValueError(f"{split} row {_row_name(batch, i)}: image does not decode "
                             f"({type(exc).__name__}); {UNDECODABLE[split]}") from exc
    images /= 255.0
    if augment:
        draws = row_draws(seed, batch["epoch"], batch["index"])
        images = shift_images(images, draws, shift=2, flip=True)
    images -= MEAN
    images /= STD
    out = {"x": images, "label": labels, "index": batch["index"].astype(np.int64)}
    if "weight" in batch:
        out["weight"] = batch["weight"]
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """One SplitMix64 step over a uint64 array: add the golden-ratio increment, then finalise."""
    with np.errstate(over="ignore"):
        return splitmix64_finalize(x + np.uint64(0x9E3779B97F4A7C15))


def row_draws(seed: int, epoch, index) -> np.ndarray:
    """64 random bits per row, a function of (seed, epoch, sample index) alone (uint64 [n]).

    Counter-based: no generator state, so a row's draws do not depend on the
    batch it arrives in, its position there, or the worker that decodes it.
    """
    epoch = np.broadcast_to(np.asarray(epoch, np.int64), np.shape(index))
    x = _mix(np.full(np.shape(index), seed & MASK64, np.uint64))  # _mix wraps on overflow
    x = _mix(x ^ epoch.astype(np.uint64))
    return _mix(x ^ np.asarray(index, np.int64).astype(np.uint64))


def shift_images(images: np.ndarray, draws: np.ndarray, shift: int, flip: bool = False) -> np.ndarray:
    """Each image of ``images`` [n, C, H, W] moved by up to ``shift`` pixels each way (the uncovered border 0),
    and with ``flip`` mirrored left-right for half of them; the moves come from ``draws`` (:func:`row_draws`)."""
    n, _, h, w = images.shape
    span = np.uint64(2 * shift + 1)
    dy = (draws % span).astype(np.int64)  # 0..2*shift: the crop's offset in the padded image
    dx = ((draws >> np.uint64(16)) % span).astype(np.int64)
    padded = np.pad(images, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    if flip:
        mirrored = ((draws >> np.uint64(32)) & np.uint64(1)).astype(bool)
        cols[mirrored] = cols[mirrored, ::-1]
    return padded[np.arange(n)[:, None, None, None], np.arange(images.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def test_decode_stage(batch: dict, num_classes: int | None = None) -> dict:
    """:func:`test_stage`'s rows decoded (:func:`decode_stage`, no augmentation); an image that does not decode
    is a ValueError naming its key."""
    return decode_stage(batch, augment=False, seed=0, num_classes=num_classes, split="test")


# What to do about a row whose image does not decode, by split.
UNDECODABLE = {
    "train": "the score job rejects such rows: the data changed after scoring; score it again",
    "test": "test accuracy needs every test image: fix the test split",
}
