"""Reference datasets: Fashion-MNIST from its idx files, noise injection, a synthetic test set.

A dataset is built in memory as a :class:`Dataset` (three tables in the shard
contract, a ground-truth table and metadata), then written by
:func:`write_dataset`::

    URL/{reference,train,test}/part-*.parquet   key, image (PNG), caption, label
    URL/ground_truth.parquet                    one row per train row: what was done to it
    URL/metadata.json                           classes, splits, noise asked and measured

``reference`` is a clean slice of the 60k training images (to pre-train the
reference CLIP model), ``train`` the rest (the pool that gets pruned, and the
only split with injected noise), ``test`` the clean 10k test set. Everything
is a pure function of the arguments and ``seed``: same arguments, same bytes.
No Ray here.
"""

from __future__ import annotations

import gzip
import io as _bytesio
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.data.contract import SHARD_SCHEMA

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
# Canonical order: rows are dealt to kinds in this order, whatever order the spec names them in.
NOISE_KINDS = ("symmetric", "pairflip", "caption", "duplicate", "corrupt_image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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


def _rng(seed: int, stream: str) -> np.random.Generator:
    # One independent stream per purpose, so changing (say) the noise spec
    # does not move which images land in the reference split.
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


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
    out = {}
    for split, (image_name, label_name) in FASHION_MNIST_FILES.items():
        images = _read_idx(_gunzip(storage.read_bytes(storage.join(folder, image_name))), "images", image_name)
        labels = _read_idx(_gunzip(storage.read_bytes(storage.join(folder, label_name))), "labels", label_name)
        if len(images) != len(labels):
            raise ValueError(f"{image_name} has {len(images)} images but {label_name} {len(labels)} labels")
        out[split] = (images, labels.astype(np.int64))
    return out


def parse_noise_spec(spec: str | dict | None) -> dict[str, float]:
    """``"symmetric:0.3,caption:0.05"`` -> ``{"symmetric": 0.3, "caption": 0.05}`` (canonical order).

    Empty, ``None`` or ``"none"`` means no noise. Each rate is the fraction of
    train rows given that kind; the kinds get disjoint rows.

    Raises:
        ValueError: malformed entry, unknown or repeated kind, rate outside [0, 1), or rates summing above 1.
    """
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        text = (spec or "").strip()
        items = []
        for part in filter(None, (p.strip() for p in ("" if text == "none" else text).split(","))):
            kind, sep, rate = part.partition(":")
            try:
                items.append((kind.strip(), float(rate)))
            except ValueError:
                raise ValueError(f"bad noise entry {part!r}: use kind:rate, e.g. symmetric:0.3") from None
            if not sep:
                raise ValueError(f"bad noise entry {part!r}: use kind:rate, e.g. symmetric:0.3")
    rates = {}
    for kind, rate in items:
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; known kinds: {', '.join(NOISE_KINDS)}")
        if kind in rates:
            raise ValueError(f"noise kind {kind!r} given twice")
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"noise rate for {kind!r} is {rate}; it must be in [0, 1)")
        rates[kind] = float(rate)
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"noise rates sum to {sum(rates.values()):.3g} > 1; kinds get disjoint rows")
    return {k: rates[k] for k in NOISE_KINDS if k in rates}


def format_noise_spec(rates: dict[str, float]) -> str:
    """The inverse of :func:`parse_noise_spec` (``"none"`` when clean)."""
    return ",".join(f"{k}:{v:g}" for k, v in rates.items()) or "none"


def caption_for(key: str, class_name: str) -> str:
    """A caption for a row: the template is picked by the row's key, so it never depends on the seed."""
    return CAPTION_TEMPLATES[zlib.crc32(key.encode()) % len(CAPTION_TEMPLATES)].format(class_name)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) image; deterministic."""
    buf = _bytesio.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decodes(data: bytes) -> bool:
    """Whether ``data`` is an image PIL can fully decode."""
    try:
        with Image.open(_bytesio.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for broken bytes
        return False


def inject_noise(
    labels: np.ndarray,
    num_classes: int,
    rates: dict[str, float],
    seed: int,
    pairflip: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Decide which rows get which corruption, and their new labels.

    Each kind gets ``round(rate * n)`` rows, disjoint across kinds, so each
    measured rate equals the asked one up to rounding.

    Args:
        labels: clean labels of the pool, int64 ``[n]``.
        num_classes: number of classes.
        rates: parsed noise spec (:func:`parse_noise_spec`).
        seed: random seed.
        pairflip: class -> class map for pair-flip noise; default ``c -> (c + 1) % num_classes``.

    Returns:
        Arrays of length n: ``corruption`` (kind or "none"), ``clean_label`` (a duplicate's
        is its source's), ``label`` (what the shard says), ``caption_label`` (the class its caption
        names) and ``duplicate_of`` (source row index, -1 if none).
    """
    n = len(labels)
    rng = _rng(seed, "noise")
    flip = np.asarray(pairflip if pairflip is not None else [(c + 1) % num_classes for c in range(num_classes)])
    order = rng.permutation(n)
    corruption = np.full(n, "none", dtype=object)
    clean, label, caption_label = labels.copy(), labels.copy(), labels.copy()
    duplicate_of = np.full(n, -1, dtype=np.int64)
    start, chosen = 0, {}
    for kind in NOISE_KINDS:
        count = min(int(rates.get(kind, 0.0) * n + 0.5), n - start)
        chosen[kind] = rows = order[start : start + count]
        corruption[rows] = kind
        start += count
    rows = chosen["symmetric"]  # uniform over the OTHER classes: every such row is really wrong
    label[rows] = caption_label[rows] = (labels[rows] + rng.integers(1, num_classes, len(rows))) % num_classes
    rows = chosen["pairflip"]
    label[rows] = caption_label[rows] = flip[labels[rows]]
    rows = chosen["caption"]  # the caption names another class; the label stays right
    caption_label[rows] = (labels[rows] + rng.integers(1, num_classes, len(rows))) % num_classes
    rows = chosen["duplicate"]  # a near-copy of a clean row, with that row's (correct) label
    pool = order[start:] if start < n else np.setdiff1d(order, rows)
    if len(rows) and not len(pool):
        raise ValueError(f"duplicate rate {rates['duplicate']} leaves no row of {n} to copy from")
    if len(rows):
        sources = rng.choice(pool, size=len(rows), replace=len(rows) > len(pool))
        duplicate_of[rows] = sources
        clean[rows] = label[rows] = caption_label[rows] = labels[sources]
    return {
        "corruption": corruption,
        "clean_label": clean,
        "label": label,
        "caption_label": caption_label,
        "duplicate_of": duplicate_of,
    }


def _corrupt(data: bytes, rng: np.random.Generator, truncate: bool) -> bytes:
    # Half cut short mid-stream (a partial download), half garbled after the
    # signature (bit rot); both keep the PNG signature so they look like images.
    if truncate:
        broken = data[: int(len(data) * rng.uniform(0.3, 0.7))]
    else:
        broken = PNG_SIGNATURE + rng.integers(0, 256, len(data) - len(PNG_SIGNATURE), dtype=np.uint8).tobytes()
    return broken if not decodes(broken) else PNG_SIGNATURE


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
    order = _rng(seed, "split").permutation(len(labels))
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
    jitter = _rng(seed, "duplicate").integers(-8, 9, pixels[dup_rows].shape)
    pixels[dup_rows] = np.clip(pixels[dup_src].astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    # A near-duplicate repeats its source's caption too: the same pair posted twice.
    caption_keys = list(keys)
    for row, src in zip(dup_rows, dup_src):
        caption_keys[row] = keys[src]
    captions = [caption_for(k, classes[c]) for k, c in zip(caption_keys, noisy["caption_label"])]
    encoded = [encode_png(p) for p in pixels]
    corrupt_rng = _rng(seed, "corrupt_image")
    for j, row in enumerate(np.flatnonzero(noisy["corruption"] == "corrupt_image")):
        encoded[row] = _corrupt(encoded[row], corrupt_rng, truncate=j % 2 == 0)
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


def measured_noise(ground_truth: pa.Table) -> dict[str, float]:
    """Fraction of train rows of each noise kind, from a ground-truth table."""
    n = max(ground_truth.num_rows, 1)
    counts = pc.value_counts(ground_truth.column("corruption")).to_pylist()
    found = {c["values"]: c["counts"] for c in counts}
    return {kind: found.get(kind, 0) / n for kind in NOISE_KINDS}


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
    rng = _rng(seed, f"synthetic-{stream}")
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
        noise: noise spec for the train split, as in :func:`parse_noise_spec`.
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
