"""Reference datasets: Fashion-MNIST from its idx files and a synthetic test set, with injected noise.

A dataset is built in memory as a :class:`Dataset` (three tables in the shard
contract, a ground-truth table and metadata), then written by
:func:`write_dataset`::

    URL/{reference,train,test}/part-*.parquet   key, image (PNG), caption, label
    URL/ground_truth.parquet                    one row per train row: what was done to it
    URL/metadata.json                           classes, splits, noise asked and measured

``reference`` is a clean slice of the 60k training images (to pre-train the
reference CLIP model), ``train`` the rest (the pool that gets pruned, and the
only split with noise, injected by :mod:`pipeline.data.noise`), ``test`` the
clean 10k test set. Everything is a pure function of the arguments and
``seed``: same arguments, same bytes. No Ray here.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.data.contract import SHARD_SCHEMA
from pipeline.data.noise import (
    corrupt_png, format_noise_spec, inject_noise, measured_noise, parse_noise_spec, stream_rng,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_TRAIN_SIZE = 60_000
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Pair-flip noise moves each class to a look-alike. An involution (pairs swap)
# keeps the class balance of the pool; Bag has no close neighbour, so it pairs
# with Ankle boot, the other solid non-garment shape.
FASHION_MNIST_PAIRFLIP = (6, 3, 4, 1, 2, 7, 0, 5, 9, 8)  # T-shirt<->Shirt, Trouser<->Dress, Pullover<->Coat, ...
SYNTHETIC_CLASSES = ("red square", "blue circle", "green triangle", "yellow cross")
CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {} in a product photo.",
    "a close-up photo of a {}.",
    "an image of a {}.",
)
SPLITS = ("reference", "train", "test")
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data, 3 dims / 1 dim


class MissingSourceError(storage.InputError):
    """The Fashion-MNIST files are not where they were looked for; the message says how to get them."""


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory.

    Attributes:
        splits: ``reference``/``train``/``test`` tables in :data:`SHARD_SCHEMA`.
        ground_truth: one row per train row, in the train split's order: ``key``,
            ``source_index`` (the row's image in the source's train file, before any
            duplicate replaced it), ``clean_label`` (a duplicate's is its source's),
            ``label`` (as written), ``caption_label`` (the class the caption names),
            ``corruption`` ("none" or a noise kind) and ``duplicate_of`` (key or null).
        metadata: JSON-able description (classes, split sizes, noise, seed, templates, source).
    """

    splits: dict[str, pa.Table]
    ground_truth: pa.Table
    metadata: dict = field(default_factory=dict)


def _read_idx(data: bytes, kind: str, name: str) -> np.ndarray:
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{name}: not an idx {kind} file (magic {magic:#010x}, expected {_IDX_MAGIC[kind]:#010x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{name}: header says {shape} but holds {array.size} bytes; the file is truncated")
    return array.reshape(shape)


def _gunzip(data: bytes) -> bytes:
    # pyarrow's input streams already inflate files named *.gz; accept either form.
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def check_fashion_mnist(source: str | None = None) -> str:
    """The folder holding Fashion-MNIST's four idx files (default: the Debian package's).

    Raises:
        MissingSourceError: a file is missing; the message says how to get them.
    """
    folder = source or FASHION_MNIST_DIR
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    missing = [n for n in names if not storage.exists(storage.join(folder, n))]
    if missing:
        raise MissingSourceError(
            f"Fashion-MNIST not found: {', '.join(missing)} missing in {folder}.\n"
            "Install the Debian package:  apt-get install -y dataset-fashion-mnist\n"
            f"or download {', '.join(names)} from the Fashion-MNIST project "
            "(https://github.com/zalandoresearch/fashion-mnist) into a folder and pass --source FOLDER."
        )
    return folder


def load_fashion_mnist(source: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read Fashion-MNIST's four ``*-ubyte.gz`` idx files.

    Args:
        source: folder (or URL) holding the files; default the Debian package folder.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}``: uint8 ``[n, 28, 28]``, int64 ``[n]``.

    Raises:
        MissingSourceError: a file is missing; the message says how to get them.
        ValueError: a file is not an idx file of the right kind, or is cut short.
    """
    folder = check_fashion_mnist(source)
    out = {}
    for split, (image_name, label_name) in FASHION_MNIST_FILES.items():
        images = _read_idx(_gunzip(storage.read_bytes(storage.join(folder, image_name))), "images", image_name)
        labels = _read_idx(_gunzip(storage.read_bytes(storage.join(folder, label_name))), "labels", label_name)
        if len(images) != len(labels):
            raise ValueError(f"{image_name} has {len(images)} images but {label_name} {len(labels)} labels")
        out[split] = (images, labels.astype(np.int64))
    return out


def caption_for(key: str, class_name: str) -> str:
    """A caption for a row: the template is picked by the row's key, so it never depends on the seed."""
    return CAPTION_TEMPLATES[zlib.crc32(key.encode()) % len(CAPTION_TEMPLATES)].format(class_name)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) image; deterministic."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _table(keys: list[str], images: list[bytes], captions: list[str], labels: np.ndarray) -> pa.Table:
    columns = [pa.array(keys, pa.string()), pa.array(images, pa.binary()), pa.array(captions, pa.string())]
    return pa.Table.from_arrays([*columns, pa.array(labels, pa.int64())], schema=SHARD_SCHEMA)


def _clean_split(split: str, pixels: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> pa.Table:
    keys = [f"{split}-{i:06d}" for i in range(len(labels))]
    captions = [caption_for(k, classes[c]) for k, c in zip(keys, labels)]
    return _table(keys, [encode_png(p) for p in pixels], captions, labels)


def build_dataset(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: tuple[str, ...],
    *,
    reference_size: int,
    noise: str | dict | None = None,
    seed: int = 0,
    limit: int | None = None,
    pairflip: tuple[int, ...] | None = None,
    name: str = "dataset",
    source: str = "",
) -> Dataset:
    """Split a labelled image source into reference/train/test and inject noise into train.

    ``reference`` is the first ``reference_size`` rows of a seeded permutation
    of ``train``, the ``train`` split the rest; ``limit`` caps every split, so
    a limited dataset holds the first rows of the full one's order.

    Raises:
        ValueError: bad noise spec, sizes out of range.
    """
    rates = parse_noise_spec(noise)
    images, labels = train
    if not 0 <= reference_size < len(labels):
        raise ValueError(f"reference_size {reference_size} must be in [0, {len(labels)})")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    order = stream_rng(seed, "split").permutation(len(labels))
    ref_index, pool_index = order[:reference_size][:limit], order[reference_size:][:limit]
    test_index = np.arange(len(test[1]))[:limit]
    splits = {
        "reference": _clean_split("reference", images[ref_index], labels[ref_index], classes),
        "test": _clean_split("test", test[0][test_index], test[1][test_index], classes),
    }
    noisy = inject_noise(labels[pool_index], len(classes), rates, seed, pairflip)
    pixels = images[pool_index].copy()
    keys = [f"train-{i:06d}" for i in range(len(pool_index))]
    dup_rows = np.flatnonzero(noisy["duplicate_of"] >= 0)
    dup_src = noisy["duplicate_of"][dup_rows]
    # +-8 grey levels: a near-copy that a byte hash does not catch.
    jitter = stream_rng(seed, "duplicate").integers(-8, 9, pixels[dup_rows].shape)
    pixels[dup_rows] = np.clip(pixels[dup_src].astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    # A near-duplicate repeats its source's caption too: the same pair posted twice.
    caption_keys = list(keys)
    for row, src in zip(dup_rows, dup_src):
        caption_keys[row] = keys[src]
    captions = [caption_for(k, classes[c]) for k, c in zip(caption_keys, noisy["caption_label"])]
    encoded = [encode_png(p) for p in pixels]
    corrupt_rng = stream_rng(seed, "corrupt_image")
    for j, row in enumerate(np.flatnonzero(noisy["corruption"] == "corrupt_image")):
        encoded[row] = corrupt_png(encoded[row], corrupt_rng, truncate=j % 2 == 0)
    splits["train"] = _table(keys, encoded, captions, noisy["label"])
    ground_truth = pa.table({
        "key": pa.array(keys, pa.string()),
        "source_index": pa.array(pool_index, pa.int64()),
        "clean_label": pa.array(noisy["clean_label"], pa.int64()),
        "label": pa.array(noisy["label"], pa.int64()),
        "caption_label": pa.array(noisy["caption_label"], pa.int64()),
        "corruption": pa.array(noisy["corruption"], pa.string()),
        "duplicate_of": pa.array([keys[s] if s >= 0 else None for s in noisy["duplicate_of"]], pa.string()),
    })
    splits = {s: splits[s] for s in SPLITS}
    metadata = {
        "name": name,
        "source": source,
        "classes": list(classes),
        "splits": {s: t.num_rows for s, t in splits.items()},
        "noise": rates,
        "noise_spec": format_noise_spec(rates),
        "noise_measured": measured_noise(ground_truth),
        "pairflip_map": [int(c) for c in (pairflip or [(c + 1) % len(classes) for c in range(len(classes))])],
        "seed": seed,
        "reference_size": reference_size,
        "limit": limit,
        "templates": list(CAPTION_TEMPLATES),
        "image": {"format": "png", "shape": list(images.shape[1:])},
    }
    return Dataset(splits=splits, ground_truth=ground_truth, metadata=metadata)


def make_fashion_mnist(
    source: str | None = None,
    reference_size: int = 10_000,
    noise: str | dict | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """Fashion-MNIST as reference (clean, ``reference_size``), train (the rest, noisy) and test (clean).

    Raises:
        MissingSourceError: the idx files are not found; the message says how to get them.
    """
    raw = load_fashion_mnist(source)
    return build_dataset(
        raw["train"],
        raw["test"],
        FASHION_MNIST_CLASSES,
        reference_size=reference_size,
        noise=noise,
        seed=seed,
        limit=limit,
        pairflip=FASHION_MNIST_PAIRFLIP,
        name="fashion-mnist",
        source=source or FASHION_MNIST_DIR,
    )


_COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 230), "green": (40, 190, 60), "yellow": (230, 210, 40)}


def draw_synthetic(n: int, seed: int = 0, size: int = 32, stream: str = "pool") -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB images of :data:`SYNTHETIC_CLASSES` shapes on a dark noisy background, classes balanced.

    ``stream`` names an independent random stream (the test images are not the pool's).

    Returns:
        uint8 ``[n, size, size, 3]`` images and int64 ``[n]`` labels.
    """
    rng = stream_rng(seed, f"synthetic-{stream}")
    labels = rng.permutation(np.arange(n) % len(SYNTHETIC_CLASSES)).astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        image = Image.fromarray(rng.integers(0, 70, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        colour_name, shape = SYNTHETIC_CLASSES[c].split()
        colour = tuple(int(v) for v in np.clip(np.array(_COLOURS[colour_name]) + rng.integers(-25, 26, 3), 0, 255))
        r = size * rng.uniform(0.2, 0.32)
        cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
        if shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:  # cross
            w = r / 3
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        images[i] = np.asarray(image)
    return images, labels


def make_synthetic(n: int = 256, seed: int = 0, size: int = 32, noise: str | dict | None = None) -> Dataset:
    """A tiny image-text dataset for tests, laid out like Fashion-MNIST's.

    Args:
        n: rows in total: ``n // 4`` reference, ``n // 4`` test, the rest train.
        seed: random seed (images, split, noise).
        size: image side in pixels.
        noise: noise spec for the train split, as in :func:`~pipeline.data.noise.parse_noise_spec`.
    """
    if n < 8:
        raise ValueError(f"make_synthetic needs n >= 8 rows, got {n}")
    pool = draw_synthetic(n - n // 4, seed, size)
    test = draw_synthetic(n // 4, seed, size, stream="test")
    return build_dataset(
        pool, test, SYNTHETIC_CLASSES, reference_size=n // 4, noise=noise, seed=seed, name="synthetic", source="synthetic"
    )


def write_dataset(dataset: Dataset, url: str, rows_per_shard: int = 5000) -> None:
    """Write ``dataset``'s files under ``url`` (local folder or object store).

    Each split is a committed folder of shards; the dataset folder as a whole
    is committed by its writer (``storage.output``, or the make_dataset job's
    skeleton), so a rewrite that dies half-way reads as incomplete.
    """
    meta_url = storage.join(url, "metadata.json")
    for split in SPLITS:
        storage.write_shards(dataset.splits[split], storage.join(url, split), rows_per_shard)
    storage.write_table(dataset.ground_truth, storage.join(url, "ground_truth.parquet"))
    storage.write_json(dataset.metadata, meta_url)
