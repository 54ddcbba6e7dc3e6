"""pipeline.data.reference and .noise without writing: idx reading, noise spec and injection, the synthetic set."""

from __future__ import annotations

import gzip
import io as bytesio

import numpy as np
import pytest
from PIL import Image

from pipeline.data import noise
from pipeline.data import reference as ds

ALL_KINDS = {"symmetric": 0.3, "pairflip": 0.1, "caption": 0.05, "duplicate": 0.05, "corrupt_image": 0.05}


def test_parse_noise_spec_canonical_order_and_clean():
    assert noise.parse_noise_spec("symmetric:0.3") == {"symmetric": 0.3}
    a = noise.parse_noise_spec("caption:0.05, symmetric:0.3")
    assert list(a.items()) == [("symmetric", 0.3), ("caption", 0.05)]
    assert noise.parse_noise_spec(noise.format_noise_spec(a)) == a
    assert noise.parse_noise_spec("") == noise.parse_noise_spec("none") == noise.parse_noise_spec(None) == {}
    assert noise.parse_noise_spec("symmetric:0.6,pairflip:0.4") == {"symmetric": 0.6, "pairflip": 0.4}  # total 1 is fine


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gaussian:0.1", "unknown noise kind 'gaussian'"),
        ("symmetric:1.0", r"in \[0, 1\)"),
        ("symmetric:-0.1", r"in \[0, 1\)"),
        ("symmetric:0.6,pairflip:0.5", "sum to 1.1"),
        ("symmetric", "use kind:rate"),
        ("symmetric:lots", "use kind:rate"),
        ("caption:0.1,caption:0.2", "given twice"),
    ],
)
def test_parse_noise_spec_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        noise.parse_noise_spec(spec)


def test_inject_noise_exact_disjoint_counts_and_labels():
    clean = np.arange(2000, dtype=np.int64) % 10
    out = noise.inject_noise(clean, 10, ALL_KINDS, seed=3, pairflip=ds.FASHION_MNIST_PAIRFLIP)
    kind, label, cap = out["corruption"], out["label"], out["caption_label"]
    for name, rate in ALL_KINDS.items():
        assert (kind == name).sum() == round(rate * 2000)
    assert (kind == "none").sum() == 2000 * 0.45
    sym = kind == "symmetric"
    assert (label[sym] != clean[sym]).all() and (cap[sym] == label[sym]).all()
    offsets = np.bincount((label[sym] - clean[sym]) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 40  # 600 rows over 9 other classes, ~67 each
    flip = kind == "pairflip"
    assert (label[flip] == np.array(ds.FASHION_MNIST_PAIRFLIP)[clean[flip]]).all() and (cap[flip] == label[flip]).all()
    capt = kind == "caption"
    assert (label[capt] == clean[capt]).all() and (cap[capt] != clean[capt]).all()
    dup = kind == "duplicate"
    sources = out["duplicate_of"][dup]
    assert (kind[sources] == "none").all() and (label[dup] == clean[sources]).all()
    assert (out["clean_label"][dup] == label[dup]).all() and (out["duplicate_of"][~dup] == -1).all()
    rest = ~(sym | flip | capt | dup)
    assert (label[rest] == clean[rest]).all() and (cap[rest] == clean[rest]).all()


def test_pairflip_map_swaps_pairs_of_distinct_classes():
    flip = np.array(ds.FASHION_MNIST_PAIRFLIP)
    assert sorted(flip) == list(range(10)) and (flip[flip] == np.arange(10)).all() and (flip != np.arange(10)).all()
    names = ds.FASHION_MNIST_CLASSES
    assert names[flip[names.index("T-shirt/top")]] == "Shirt" and names[flip[names.index("Sandal")]] == "Sneaker"


def test_load_fashion_mnist_from_debian_package():
    raw = ds.load_fashion_mnist()
    images, labels = raw["train"]
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    assert raw["test"][0].shape == (10000, 28, 28) and np.bincount(raw["test"][1]).tolist() == [1000] * 10


def _idx(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    return gzip.compress(header + payload)


def _fake_source(folder, images_magic=0x803, cut=0):
    images, labels = _idx(images_magic, (2, 28, 28), bytes(2 * 784 - cut)), _idx(0x801, (2,), bytes([1, 2]))
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(images)
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(labels)
    return str(folder)


def test_load_fashion_mnist_validates_idx_files(tmp_path):
    raw = ds.load_fashion_mnist(_fake_source(tmp_path))
    assert raw["test"][0].shape == (2, 28, 28) and raw["test"][1].tolist() == [1, 2]
    with pytest.raises(ValueError, match="not an idx images file"):
        ds.load_fashion_mnist(_fake_source(tmp_path, images_magic=0x801))
    with pytest.raises(ValueError, match="truncated"):
        ds.load_fashion_mnist(_fake_source(tmp_path, cut=10))


def test_missing_source_says_what_to_do(tmp_path):
    with pytest.raises(ds.MissingSourceError) as info:
        ds.load_fashion_mnist(str(tmp_path))
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "--source" in message
    assert all(name in message for pair in ds.FASHION_MNIST_FILES.values() for name in pair)


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(bytesio.BytesIO(data)).convert("RGB"))


def test_make_synthetic_layout_and_colours():
    data = ds.make_synthetic(n=256, seed=0, size=32)
    assert data.metadata["classes"] == list(ds.SYNTHETIC_CLASSES)
    assert data.metadata["splits"] == {"reference": 64, "train": 128, "test": 64}
    keys = [k for t in data.splits.values() for k in t["key"].to_pylist()]
    assert len(set(keys)) == 256 and keys[0] == "reference-000000" and keys[-1] == "test-000063"
    train = data.splits["train"]
    assert train.schema == ds.SHARD_SCHEMA and data.ground_truth.num_rows == 128
    assert np.bincount(train["label"].to_numpy(), minlength=4).min() >= 24  # balanced, 32 each in the pool
    rows = zip(train["image"].to_pylist(), train["caption"].to_pylist(), train["label"].to_pylist())
    for image, caption, label in rows:
        pixels = _rgb(image)
        assert pixels.shape == (32, 32, 3) and ds.SYNTHETIC_CLASSES[label] in caption
        r, g, b = pixels[pixels.max(axis=2) > 120].mean(axis=0)  # the shape, not the dark background
        dominant = {"red": r > 2 * max(g, b), "blue": b > 2 * max(r, g), "green": g > 2 * max(r, b)}
        dominant["yellow"] = min(r, g) > 2 * b
        assert dominant[ds.SYNTHETIC_CLASSES[label].split()[0]]


def test_same_seed_same_tables_other_seed_differs():
    a, b, c = ds.make_synthetic(n=64, seed=1), ds.make_synthetic(n=64, seed=1), ds.make_synthetic(n=64, seed=2)
    assert all(a.splits[s].equals(b.splits[s]) for s in ds.SPLITS) and a.ground_truth.equals(b.ground_truth)
    assert a.splits["train"]["image"].to_pylist() != c.splits["train"]["image"].to_pylist()


def test_limit_keeps_the_first_rows_of_the_full_order():
    small, large = (ds.make_fashion_mnist(reference_size=80, limit=n) for n in (50, 120))
    for split in ("train", "test"):
        assert small.splits[split].equals(large.splits[split].slice(0, 50))
    assert small.splits["reference"].equals(large.splits["reference"])  # not capped: reference_size rows
    assert small.metadata["splits"] == {"reference": 80, "train": 50, "test": 50}


def test_corrupt_bytes_never_decode_and_duplicates_are_near_copies():
    data = ds.make_synthetic(n=400, seed=5, noise={"duplicate": 0.2, "corrupt_image": 0.2})
    train, truth = data.splits["train"], data.ground_truth.to_pylist()
    images, keys = train["image"].to_pylist(), train["key"].to_pylist()
    for image, row in zip(images, truth):
        assert noise.decodes(image) == (row["corruption"] != "corrupt_image")
        if row["corruption"] == "duplicate":
            copy, source = _rgb(image).astype(int), _rgb(images[keys.index(row["duplicate_of"])]).astype(int)
            assert 0 < np.abs(copy - source).max() <= 8
