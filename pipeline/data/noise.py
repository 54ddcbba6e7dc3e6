"""Noise injection: which train rows get which corruption, a pure function of the seed.

Each kind goes to ``round(rate * n)`` rows of the pool, disjoint across kinds
(:func:`inject_noise`); a spec such as ``"symmetric:0.3,caption:0.05"`` names
the rates (:func:`parse_noise_spec`):

- ``symmetric``: label and caption name a uniformly drawn other class;
- ``pairflip``: label and caption move to a look-alike class (a class map);
- ``caption``: the caption names another class, the label stays right;
- ``duplicate``: a near-copy of a clean row, with that row's label;
- ``corrupt_image``: image bytes that do not decode (:func:`corrupt_png`).

No Ray here.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

# Canonical order: rows are dealt to kinds in this order, whatever order the spec names them in.
NOISE_KINDS = ("symmetric", "pairflip", "caption", "duplicate", "corrupt_image")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """The random generator of one purpose (``"split"``, ``"noise"``, ...) under ``seed``.

    One independent stream per purpose, so changing (say) the noise spec does
    not move which images land in the reference split.
    """
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


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


def decodes(data: bytes) -> bool:
    """Whether ``data`` is an image PIL can fully decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
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
    rng = stream_rng(seed, "noise")
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


def corrupt_png(data: bytes, rng: np.random.Generator, truncate: bool) -> bytes:
    """Undecodable PNG bytes: ``data`` cut short mid-stream (``truncate``: a partial download), or garbled after the signature (bit rot).

    Both keep the PNG signature so they look like images; should the result
    still decode, the bare signature is returned instead.
    """
    if truncate:
        broken = data[: int(len(data) * rng.uniform(0.3, 0.7))]
    else:
        broken = PNG_SIGNATURE + rng.integers(0, 256, len(data) - len(PNG_SIGNATURE), dtype=np.uint8).tobytes()
    return broken if not decodes(broken) else PNG_SIGNATURE


def measured_noise(ground_truth: pa.Table) -> dict[str, float]:
    """Fraction of train rows of each noise kind, from a ground-truth table."""
    n = max(ground_truth.num_rows, 1)
    counts = pc.value_counts(ground_truth.column("corruption")).to_pylist()
    found = {c["values"]: c["counts"] for c in counts}
    return {kind: found.get(kind, 0) / n for kind in NOISE_KINDS}
