"""Reference datasets: Fashion-MNIST, labelled image-caption rows of any source, a synthetic test set; with injected noise.

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

import dataclasses
import gzip
import io
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.data.contract import BAD_LABEL, CAPTION, IMAGE, KEY, LABEL, SHARD_SCHEMA, has_caption
from pipeline.data.tars import write_tars
from pipeline.data.noise import (
    corrupt_png, decodes, format_noise_spec, inject_noise, measured_noise, parse_noise_spec, stream_rng,
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
            duplicate replaced it; for image-caption rows, among the usable rows
            left after the test split), ``clean_label`` (a duplicate's is its source's),
            ``label`` (as written), ``caption_label`` (the class the caption names),
            ``corruption`` ("none" or a noise kind), ``duplicate_of`` (key or null)
            and, for image-caption rows, ``source_key`` (the row's key in the source).
        metadata: JSON-able description (classes, split sizes, noise, seed, templates, source;
            for image-caption rows also ``source_rows``: rows read, used, and left out by reason,
            :func:`build_from_rows`).
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
            "(https://github.com/zalandoresearch/fashion-mnist) into a folder (or an s3:// or gs:// prefix) "
            "and pass --source FOLDER_OR_URL."
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


@dataclass(frozen=True)
class Images:
    """Labelled source images: uint8 ``pixels`` or ``encoded`` bytes (any format PIL reads), optional captions.

    The rows a dataset is built from: Fashion-MNIST's idx arrays, or the rows
    of image-caption shards (:func:`build_from_rows`). A row's own caption is
    kept where it has one; rows without get a template naming their class.
    """

    labels: np.ndarray
    pixels: np.ndarray | None = None
    encoded: list[bytes] | None = None
    captions: list[str | None] | None = None
    keys: list[str] | None = None  # the rows' keys in their source, where it has keys

    def __post_init__(self):
        if (self.pixels is None) == (self.encoded is None):
            raise ValueError("Images needs exactly one of pixels and encoded")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Images":
        pick = (lambda values: None if values is None else [values[i] for i in index.tolist()])
        return Images(self.labels[index], None if self.pixels is None else self.pixels[index],
                      pick(self.encoded), pick(self.captions), pick(self.keys))

    def image(self, i: int) -> bytes:
        """Row ``i``'s image bytes: as stored, or PNG of its pixels."""
        return self.encoded[i] if self.encoded is not None else encode_png(self.pixels[i])

    def decoded(self, i: int) -> np.ndarray:
        if self.pixels is not None:
            return self.pixels[i]
        with Image.open(io.BytesIO(self.encoded[i])) as image:
            return np.asarray(image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode))

    def caption(self, i: int) -> str | None:
        """Row ``i``'s own caption, None where it has none."""
        caption = None if self.captions is None else self.captions[i]
        return caption if has_caption(caption) else None

    @property
    def image_info(self) -> dict:
        if self.pixels is not None:
            return {"format": "png", "shape": list(self.pixels.shape[1:])}
        return {"format": "as stored in the source"}


def _table(keys: list[str], images: list[bytes], captions: list[str], labels: np.ndarray) -> pa.Table:
    columns = [pa.array(keys, pa.string()), pa.array(images, pa.binary()), pa.array(captions, pa.string())]
    return pa.Table.from_arrays([*columns, pa.array(labels, pa.int64())], schema=SHARD_SCHEMA)


def _clean_split(split: str, images: Images, classes: tuple[str, ...]) -> pa.Table:
    keys = [f"{split}-{i:06d}" for i in range(len(images))]
    captions = [images.caption(i) or caption_for(k, classes[c]) for i, (k, c) in enumerate(zip(keys, images.labels))]
    return _table(keys, [images.image(i) for i in range(len(images))], captions, images.labels)


def _captions(pool: Images, keys: list[str], noisy: dict, classes: tuple[str, ...], seed: int) -> list[str]:
    """Each train row's caption: its own where it names the row's class, else one naming ``caption_label``.

    A caption that must name another class is a real caption of a clean row of
    that class when the source has captions (so a mismatched caption reads
    like any other), else a template; a duplicate repeats its source's caption.
    """
    rng = stream_rng(seed, "caption")
    duplicate_of = noisy["duplicate_of"]
    donors = {}
    if pool.captions is not None:
        has_caption = np.array([pool.caption(i) is not None for i in range(len(pool))], dtype=bool)
        clean = (noisy["corruption"] == "none") & has_caption
        donors = {c: np.flatnonzero(clean & (pool.labels == c)) for c in range(len(classes))}
    captions = []
    for i, (key, c) in enumerate(zip(keys, noisy["caption_label"].tolist())):
        own = pool.caption(i)
        if duplicate_of[i] >= 0:
            captions.append(None)  # filled below, from its source
        elif c == pool.labels[i] and own is not None:
            captions.append(own)
        elif len(donors.get(c, ())):
            captions.append(pool.caption(int(rng.choice(donors[c]))))
        else:
            captions.append(caption_for(key, classes[c]))
    for row in np.flatnonzero(duplicate_of >= 0).tolist():
        captions[row] = captions[int(duplicate_of[row])]  # a clean row's: the same pair posted twice
    return captions


def build_dataset(
    train: Images | tuple[np.ndarray, np.ndarray],
    test: Images | tuple[np.ndarray, np.ndarray],
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

    ``train`` and ``test`` are :class:`Images` or ``(pixels, labels)``.
    ``reference`` is the first ``reference_size`` rows of a seeded permutation
    of ``train``, the ``train`` split the rest; ``limit`` caps the ``train``
    and ``test`` splits (``reference`` holds ``reference_size`` rows whatever
    it is), so a limited dataset holds the first rows of the full one's order.

    Raises:
        ValueError: bad noise spec, sizes out of range.
    """
    train, test = (t if isinstance(t, Images) else Images(labels=t[1], pixels=t[0]) for t in (train, test))
    rates = parse_noise_spec(noise)
    labels = train.labels
    if not 0 <= reference_size < len(labels):
        raise ValueError(f"reference_size {reference_size} must be in [0, {len(labels)})")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    order = stream_rng(seed, "split").permutation(len(labels))
    ref_index, pool_index = order[:reference_size], order[reference_size:][:limit]
    test_index = np.arange(len(test))[:limit]
    splits = {
        "reference": _clean_split("reference", train.take(ref_index), classes),
        "test": _clean_split("test", test.take(test_index), classes),
    }
    pool = train.take(pool_index)
    noisy = inject_noise(pool.labels, len(classes), rates, seed, pairflip)
    keys = [f"train-{i:06d}" for i in range(len(pool_index))]
    encoded = [pool.image(i) for i in range(len(pool))]
    dup_rows = np.flatnonzero(noisy["duplicate_of"] >= 0)
    # +-8 grey levels: a near-copy that a byte hash does not catch.
    jitter_rng = stream_rng(seed, "duplicate")
    sources = [_decoded(pool, int(i)) for i in noisy["duplicate_of"][dup_rows]]
    if pool.pixels is not None and len(dup_rows):  # one draw for all: images of one shape
        sources = list(np.stack(sources).astype(np.int16) + jitter_rng.integers(-8, 9, (len(dup_rows), *sources[0].shape)))
    else:
        sources = [image.astype(np.int16) + jitter_rng.integers(-8, 9, image.shape) for image in sources]
    for row, copy in zip(dup_rows.tolist(), sources):
        encoded[row] = encode_png(np.clip(copy, 0, 255).astype(np.uint8))
    captions = _captions(pool, keys, noisy, classes, seed)
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
    if pool.keys is not None:
        ground_truth = ground_truth.append_column("source_key", pa.array(pool.keys, pa.string()))
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
        "image": train.image_info,
    }
    return Dataset(splits=splits, ground_truth=ground_truth, metadata=metadata)


def _decoded(images: Images, i: int) -> np.ndarray:
    """Row ``i``'s pixels; a ValueError naming the row where its bytes do not decode.

    Image-caption rows are checked before (:func:`image_problem`) by their
    header and, for truncation, their end, not by a full decode: bytes broken
    in some other way are found here, where a duplicate is made of them.
    """
    try:
        return images.decoded(i)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, zlib.error...
        key = images.keys[i] if images.keys is not None else f"row {i}"
        raise ValueError(f"source row {key!r}: image bytes do not decode ({type(exc).__name__}: {exc}); "
                         "remove or re-download it") from None


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


# Why a source row is left out of every split (metadata.json's source_rows.left_out): the score job's words.
NO_IMAGE = "empty image bytes"  # null or empty: img2dataset's failed downloads (status failed_to_download)
UNDECODABLE_IMAGE = "undecodable image"  # bytes PIL cannot open, or cut short

# How a whole file of a format ends; one that does not end so is decoded to tell a cut-short one from
# one with bytes after its end (which decodes). Other formats are checked by their header only.
_ENDS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b"\x3b",)}


def image_problem(data: bytes | None) -> str | None:
    """Why ``data`` is not a usable image (:data:`NO_IMAGE`, :data:`UNDECODABLE_IMAGE`), None where it is one.

    Cheap, not a decode: the header must open in PIL, and a JPEG, PNG or GIF
    must end as a whole file does, a WebP hold the bytes its header counts
    (a cut-short download); only a file that does not is decoded, to be sure.
    A file broken in some other way passes.
    """
    if data is None or len(data) == 0:
        return NO_IMAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                kind = image.format
    except Exception:  # noqa: BLE001 - UnidentifiedImageError, DecompressionBombError, broken headers...
        return UNDECODABLE_IMAGE
    if kind == "WEBP":
        whole = len(data) >= 8 + int.from_bytes(data[4:8], "little")  # RIFF: size of what follows the first 8 bytes
    else:
        whole = kind not in _ENDS or data.endswith(_ENDS[kind])
    return None if whole or decodes(data) else UNDECODABLE_IMAGE


def images_from_rows(rows: pa.Table, classes: tuple[str, ...]) -> tuple[Images, dict]:
    """Contract rows (key, image, caption, label) as :class:`Images`, less the rows without a usable image.

    A row whose image bytes are null or empty (a failed download: img2dataset
    writes those rows too) or not an image (:func:`image_problem`) is left
    out; every other row needs a label among ``classes``.

    Returns:
        The usable rows, and what was read: ``{"read": n, "used": n, "left_out": {reason: {"rows": n,
        "first_key": key}}}`` (a reason only where it left a row out).

    Raises:
        ValueError: no row has a usable image (with the count and reasons); a usable row without a label, or with
            one outside ``classes``, named by key.
    """
    keys = rows.column(KEY).to_pylist()
    problems = [image_problem(data) for data in rows.column(IMAGE).to_pylist()]
    left_out: dict[str, dict] = {}
    for key, problem in zip(keys, problems):
        if problem is not None:
            left_out.setdefault(problem, {"rows": 0, "first_key": key})["rows"] += 1
    summary = {"read": len(keys), "used": len(keys) - sum(r["rows"] for r in left_out.values()),
               "left_out": left_out}
    if not summary["used"]:
        raise ValueError(f"none of the {len(keys)} source rows has a usable image ({describe_left_out(left_out)}): "
                         "nothing to build a dataset from")
    if left_out:
        rows = rows.filter(pa.array([p is None for p in problems], pa.bool_()))
        keys = rows.column(KEY).to_pylist()
    labels = rows.column(LABEL).to_pylist()
    texts = rows.column(BAD_LABEL).to_pylist() if BAD_LABEL in rows.column_names else [None] * len(keys)
    not_integers = [(k, t) for k, v, t in zip(keys, labels, texts) if v is None and t is not None]
    if not_integers:
        raise ValueError(f"{len(not_integers)} of {len(keys)} rows have a label that is not an integer (first: "
                         f"{not_integers[0][0]!r} with {not_integers[0][1]!r}); label noise needs a class index on "
                         f"every row, 0..{len(classes) - 1}: write the labels as integers")
    missing = [k for k, v in zip(keys, labels) if v is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(keys)} rows have no label (first: {missing[0]!r}); label noise "
                         "needs a class on every row: map one with --columns, e.g. img2dataset's label=cls")
    outside = [(k, v) for k, v in zip(keys, labels) if not 0 <= v < len(classes)]
    if outside:
        raise ValueError(f"{len(outside)} rows have a label outside 0..{len(classes) - 1} (first: {outside[0][0]!r} "
                         f"with {outside[0][1]}); there are {len(classes)} class names")
    images = Images(labels=np.asarray(labels, np.int64), encoded=rows.column(IMAGE).to_pylist(),
                    captions=rows.column(CAPTION).to_pylist(), keys=keys)
    return images, summary


def describe_left_out(left_out: dict) -> str:
    """``left_out`` of :func:`images_from_rows` in words: "40 empty image bytes (first: 'k'), ..."."""
    return ", ".join(f"{r['rows']} {reason} (first: {r['first_key']!r})" for reason, r in left_out.items()) or "none"


def build_from_rows(rows: pa.Table, classes: tuple[str, ...], *, reference_size: int, test_size: int,
                    noise: str | dict | None = None, seed: int = 0, limit: int | None = None,
                    source: str = "") -> Dataset:
    """A dataset from one collection of labelled image-caption rows (image-caption shards, read in order).

    A seeded permutation of the rows gives ``test`` its first ``test_size``
    rows, then :func:`build_dataset` takes ``reference_size`` of the rest as
    ``reference`` and the remainder as the noisy ``train`` pool. Images are
    kept as stored; the rows' own captions are kept (noisy rows get another
    clean row's caption of the class they now name). Rows without a usable
    image (null or empty bytes, as img2dataset writes failed downloads, or
    bytes that are no image) are left out of every split, and counted in the
    metadata's ``source_rows`` (:func:`images_from_rows`).

    Raises:
        ValueError: no row with a usable image, unlabelled rows, labels outside ``classes``, sizes that leave no
            train row.
    """
    images, source_rows = images_from_rows(rows, classes)
    if test_size < 1 or reference_size < 0 or reference_size + test_size >= len(images):
        dropped = sum(r["rows"] for r in source_rows["left_out"].values())
        also = f" ({dropped} more left out without a usable image)" if dropped else ""
        raise ValueError(f"{len(images)} rows{also} cannot give {test_size} test and {reference_size} reference rows "
                         "and leave a train pool: pass smaller --test-size / --reference-size")
    order = stream_rng(seed, "test-split").permutation(len(images))
    dataset = build_dataset(images.take(order[test_size:]), images.take(order[:test_size]), tuple(classes),
                            reference_size=reference_size, noise=noise, seed=seed, limit=limit,
                            name="image-caption shards", source=source)
    return dataclasses.replace(dataset, metadata={**dataset.metadata, "source_rows": source_rows})


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


def write_dataset(dataset: Dataset, url: str, rows_per_shard: int = 5000, shard_format: str = "parquet") -> None:
    """Write ``dataset``'s files under ``url`` (local folder or object store).

    Each split is a committed folder of shards, parquet or (``shard_format``
    ``webdataset``) tars; the dataset folder as a whole is committed by its
    writer (``storage.output``, or the make_dataset job's skeleton), so a
    rewrite that dies half-way reads as incomplete.
    """
    write = {"parquet": storage.write_shards, "webdataset": write_tars}[shard_format]
    meta_url = storage.join(url, "metadata.json")
    for split in SPLITS:
        write(dataset.splits[split], storage.join(url, split), rows_per_shard)
    storage.write_table(dataset.ground_truth, storage.join(url, "ground_truth.parquet"))
    storage.write_json(dataset.metadata, meta_url)
