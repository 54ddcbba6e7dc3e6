"""ImageDecoder and ClipScorer on plain dict batches (no Ray), with the tiny random-init config."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import storage as pio
from pipeline.data.contract import DEFAULT_TEMPLATES
from pipeline.score import REFERENCE_MODEL, TINY_MODEL
from pipeline.score.clip_models import (check_pretrained, load_clip, preprocess_config, register_model_configs,
                                        save_checkpoint)
from pipeline.score.scorer import (DEVICE_JPEG, ClipScorer, ImageDecoder, TensorImageDecoder, decode_image,
                                   encoded_files, fill_template, jpeg_tensors, tokenize_captions)

CAPTIONS = ["a photo of a cat.", "a red square", "two dogs on a beach", "an empty room", "x", "a blue circle"]


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Mixed sizes and aspect ratios exercise open_clip's resize + centre crop.
    sizes = [(40, 40), (64, 48), (31, 77), (32, 32), (100, 60), (45, 45)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 6], 3), dtype=np.uint8)) for i in range(n)]


def caption_batch(n: int = 6) -> dict[str, np.ndarray]:
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "image": np.array([encode(im) for im in random_images(n)], dtype=object),
        "caption": np.array(CAPTIONS[:n], dtype=object),
    }


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    torch.manual_seed(0)
    return ClipScorer(TINY_MODEL, device="cpu")


def test_register_model_configs_is_idempotent():
    from open_clip import factory

    names = register_model_configs()
    paths = len(factory._MODEL_CONFIG_PATHS)
    assert register_model_configs() == names == sorted([REFERENCE_MODEL, TINY_MODEL])  # the names match the files
    assert len(factory._MODEL_CONFIG_PATHS) == paths
    assert {REFERENCE_MODEL, TINY_MODEL} <= set(open_clip.list_models())


def test_preprocess_config_matches_the_built_model_and_hub_tags():
    model, _, _ = load_clip(TINY_MODEL)
    cfg = preprocess_config(TINY_MODEL)
    assert {k: v for k, v in cfg.items() if k != "size"} == {
        k: v for k, v in model.visual.preprocess_cfg.items() if k != "size"
    }
    assert model.visual.preprocess_cfg["size"] == (cfg["size"], cfg["size"]) == (32, 32)
    siglip = preprocess_config("ViT-B-16-SigLIP", "webli")  # a tag with its own normalisation
    assert siglip["mean"] == (0.5, 0.5, 0.5) and siglip["resize_mode"] == "squash"
    with pytest.raises(ValueError, match="unknown model config"):
        preprocess_config("no-such-model")


def test_decoder_output_equals_open_clip_preprocess():
    _, preprocess, _ = load_clip(TINY_MODEL)
    images = random_images(6)
    batch = {"key": np.arange(6), "image": np.array([encode(im) for im in images], dtype=object)}
    out = ImageDecoder(TINY_MODEL)(batch)
    assert out["pixels"].shape == (6, 3, 32, 32) and out["pixels"].dtype == np.float32
    assert list(out["error"]) == [""] * 6 and "image" not in out and list(out["key"]) == list(range(6))
    expected = torch.stack([preprocess(im) for im in images]).numpy()
    np.testing.assert_allclose(out["pixels"], expected, atol=1e-6)
    raw = ImageDecoder(TINY_MODEL, pixel_dtype="uint8")(batch)
    assert raw["pixels"].dtype == np.uint8 and raw["pixels"].shape == (6, 3, 32, 32) and "image" not in raw


def test_decoder_reads_jpeg_as_open_clip_preprocesses_it():
    img = random_images(3)[2]  # 31 x 77
    jpeg = encode(img, "JPEG", quality=90)
    out = ImageDecoder("mmdp-ref")({"image": np.array([jpeg], dtype=object)})
    assert out["pixels"].shape == (1, 3, 28, 28) and out["error"][0] == ""
    _, preprocess, _ = load_clip("mmdp-ref")
    np.testing.assert_allclose(out["pixels"][0], preprocess(Image.open(io.BytesIO(jpeg))).numpy(), atol=1e-5)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (valid CRC) over a tiny body."""
    data = bytearray(encode(Image.new("RGB", (4, 4))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_images_get_reasons_and_do_not_break_the_batch():
    good = encode(random_images(1)[0])
    cases = {
        "empty": (b"", "empty image bytes"),
        "null": (None, "empty image bytes"),
        "garbage": (b"this is not an image at all", "undecodable image: unknown format"),
        "truncated": (good[: len(good) // 2], "undecodable image:"),
        "bomb": (png_with_header(50_000, 50_000), "image too large: 2500000000 pixels"),
        "big": (png_with_header(10_000, 10_000), "image too large: 10000x10000"),
        "strip": (encode(Image.new("RGB", (1, 3000))), "extreme aspect ratio: 1x3000"),
        "good": (good, ""),
    }
    batch = {"key": np.array(list(cases), dtype=object), "image": np.array([v[0] for v in cases.values()], dtype=object)}
    out = ImageDecoder(TINY_MODEL, max_pixels=2_000_000)(batch)
    for key, error, pixels in zip(out["key"], out["error"], out["pixels"]):
        expected = cases[key][1]
        assert error.startswith(expected) and (error == "") == (expected == ""), (key, error)
        assert (np.abs(pixels).sum() > 0) == (key == "good"), key  # rejected rows are zeros


@pytest.mark.parametrize("pixel_dtype", ["float32", "uint8"])
def test_earlier_errors_pass_through_the_decoder_undecoded(pixel_dtype):
    # The same good image twice: the row an earlier stage rejected keeps its reason and is not decoded.
    batch = {"image": np.array([encode(random_images(1)[0])] * 2, dtype=object), "error": np.array(["duplicate key", ""])}
    out = ImageDecoder(TINY_MODEL, pixel_dtype=pixel_dtype)(batch)
    assert list(out["error"]) == ["duplicate key", ""]
    assert not np.abs(out["pixels"][0]).any() and np.abs(out["pixels"][1]).any()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: encode(Image.new("L", (5, 5), 100)), (100, 100, 100)),
        (lambda: encode(Image.new("LA", (5, 5), (100, 255))), (100, 100, 100)),
        (lambda: encode(Image.new("RGBA", (5, 5), (10, 20, 30, 0))), (255, 255, 255)),  # transparent -> white
        (lambda: encode(Image.new("RGBA", (5, 5), (10, 20, 30, 255))), (10, 20, 30)),
        (lambda: encode(Image.new("1", (5, 5), 1)), (255, 255, 255)),
        (lambda: encode(Image.fromarray(np.full((5, 5), 32896, np.uint16))), (128, 128, 128)),  # 16-bit
        (lambda: encode(Image.fromarray(np.full((5, 5), 65535, np.int32)), "TIFF"), (255, 255, 255)),
        (lambda: encode(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), "JPEG", quality=100), (255, 0, 0)),
        # Float images: [0, 1] by convention (they came out nearly black, 0 or 1 of 255); larger, as 0..255.
        (lambda: encode(Image.fromarray(np.full((5, 5), 0.5, np.float32)), "TIFF"), (128, 128, 128)),
        (lambda: encode(Image.fromarray(np.full((5, 5), 100.0, np.float32)), "TIFF"), (100, 100, 100)),
    ],
    ids=["L", "LA", "RGBA-clear", "RGBA-opaque", "1bit", "I16", "I32", "CMYK", "F-unit", "F-255"],
)
def test_every_pil_mode_decodes_to_rgb(make, expected):
    data = make()
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (5, 5)
    np.testing.assert_allclose(np.asarray(img)[2, 2], expected, atol=2)
    assert ImageDecoder(TINY_MODEL)({"image": np.array([data], dtype=object)})["error"][0] == ""


def test_palette_images_decode_to_their_colours():
    p = Image.new("P", (5, 5), 3)
    p.putpalette([0, 0, 0, 1, 2, 3, 4, 5, 6, 200, 100, 50])
    assert tuple(np.asarray(decode_image(encode(p)))[0, 0]) == (200, 100, 50)
    assert tuple(np.asarray(decode_image(encode(p, transparency=3)))[0, 0]) == (255, 255, 255)


def jpeg_batch(n: int = 6) -> dict[str, np.ndarray]:
    """caption_batch's images as JPEGs (RGB and grey, mixed sizes, one progressive, one larger photo-sized)."""
    images = random_images(n - 1) + [Image.fromarray(np.random.default_rng(1).integers(0, 256, (180, 300, 3), np.uint8))]
    datas = [encode(im if i % 3 else im.convert("L"), "JPEG", quality=90, progressive=i == 2) for i, im in enumerate(images)]
    return {**caption_batch(n), "image": np.array(datas, dtype=object)}


def test_tensor_decoder_resamples_jpegs_like_the_pil_decoder():
    batch = jpeg_batch()
    pil = ImageDecoder(TINY_MODEL, pixel_dtype="uint8", jpeg_draft=False)(batch)["pixels"].astype(np.float64)
    out = TensorImageDecoder(TINY_MODEL, device="cpu")(batch)
    assert isinstance(out["pixels"], torch.Tensor) and out["pixels"].dtype == torch.uint8
    assert list(out["error"]) == [""] * 6 and "image" not in out and list(out["caption"]) == CAPTIONS
    diff = np.abs(out["pixels"].numpy() - pil).mean(axis=(1, 2, 3))
    # Decoded by torchvision and resized by the transform on tensors: the same pixels up to resampling
    # arithmetic (the PIL path would give exactly the same); the 32 x 32 image needs no resampling.
    assert (diff < 1.0).all() and (diff > 0).sum() == 5 and diff[3] == 0, diff


def test_the_device_decoders_input_tensors_are_the_files_own_bytes_not_copies(recwarn):
    datas = list(jpeg_batch()["image"])
    tensors = jpeg_tensors(datas)
    for data, tensor in zip(datas, tensors):
        assert tensor.dtype == torch.uint8 and tensor.data_ptr() == np.frombuffer(data, np.uint8).ctypes.data
        assert bytes(tensor.numpy()) == data
    assert not [w for w in recwarn if "not writable" in str(w.message)]  # read-only bytes: torch's warning kept quiet


def as_arrow(datas: list, kind: pa.DataType = pa.binary()) -> pa.ChunkedArray:
    """Files as a scoring actor's Arrow batch may hold them: two chunks, the first a slice of a larger array."""
    head = pa.array([b"not in the slice"] + datas[:3] + [b"after the slice"], kind).slice(1, len(datas[:3]))
    return pa.chunked_array([head, pa.array(datas[3:], kind)])


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()], ids=str)
def test_an_arrow_columns_files_are_views_of_its_buffers(recwarn, kind):
    datas = list(jpeg_batch()["image"])
    datas[1], datas[4] = None, b""
    column = as_arrow(datas, kind)
    files = encoded_files(column)
    assert [None if f is None else bytes(f) for f in files] == datas
    buffers = [(chunk.buffers()[2].address, chunk.buffers()[2].size) for chunk in column.chunks]
    for f, tensor in zip([f for f in files if f], jpeg_tensors([f for f in files if f])):
        assert isinstance(f, memoryview) and bytes(tensor.numpy()) == bytes(f)
        # The file's memory lies inside one of the column's data buffers: nothing was copied.
        assert any(start <= tensor.data_ptr() < start + size for start, size in buffers)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    assert encoded_files(np.array(datas, dtype=object)) == datas  # a NumPy batch's bytes as they are
    # The views read as the bytes do: the same files go to the device (every JPEG but the null and the empty).
    decoder = TensorImageDecoder(TINY_MODEL, device="cpu")
    marks = decoder.mark({"image": column})[DEVICE_JPEG]
    assert [m > 0 for m in marks] == [d is not None and d != b"" for d in datas]
    assert decoder.device_inputs({"image": column}, range(len(files)))[1] == list(np.flatnonzero(marks))


@pytest.mark.parametrize("form", ["numpy", "arrow", "marked"])
def test_tensor_decoder_rejects_what_the_pil_decoder_rejects(form):
    jpeg = encode(random_images(1)[0], "JPEG")
    cases = {
        "empty": b"",
        "null": None,
        "garbage": b"this is not an image at all",
        "truncated-jpeg": jpeg[: len(jpeg) // 2],
        "broken-jpeg": jpeg[:200] + bytes(len(jpeg) - 200),
        "big-jpeg": encode(Image.new("RGB", (1500, 1500)), "JPEG"),
        "strip-jpeg": encode(Image.new("RGB", (1, 3000)), "JPEG"),
        "bomb": png_with_header(50_000, 50_000),
        "cmyk-jpeg": encode(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), "JPEG", quality=100),
        "rgba-png": encode(Image.new("RGBA", (5, 5), (10, 20, 30, 0))),
        "good-jpeg": jpeg,
    }
    batch = {"key": np.array(list(cases), dtype=object), "image": np.array(list(cases.values()), dtype=object),
             "error": np.array(["duplicate key" if k == "good-jpeg" else "" for k in cases])}
    pil = ImageDecoder(TINY_MODEL, max_pixels=2_000_000, pixel_dtype="uint8", jpeg_draft=False)(batch)
    decoder = TensorImageDecoder(TINY_MODEL, device="cpu", max_pixels=2_000_000)
    if form == "arrow":  # a scoring actor's Arrow batch: the same reasons and pixels
        batch = {**batch, "image": as_arrow(list(cases.values()))}
    if form == "marked":  # headers read by a CPU stage before the decoder: the same again
        batch = decoder.mark(batch)
        # The rest lack an end marker or fail a check; the good JPEG carries an earlier reason, so it is not read.
        assert not batch[DEVICE_JPEG].any()
        assert decoder.mark({k: v for k, v in batch.items() if k != "error"})[DEVICE_JPEG].tolist() == [
            np.prod(Image.open(io.BytesIO(jpeg)).size) if k == "good-jpeg" else 0 for k in cases]  # its pixels
    out = decoder(batch)
    assert DEVICE_JPEG not in out
    assert list(out["error"]) == list(pil["error"])
    assert sum(e == "" for e in out["error"]) == 2 and out["error"][-1] == "duplicate key"  # an earlier reason wins
    # What the tensor path does not take (CMYK, PNG) is the PIL path's pixels exactly; rejected rows are zeros.
    np.testing.assert_array_equal(out["pixels"].numpy(), np.where((pil["error"] == "")[:, None, None, None], pil["pixels"], 0))


def test_the_tensor_decoder_takes_the_marked_rows_as_read():
    batch = jpeg_batch()
    decoder = TensorImageDecoder(TINY_MODEL, device="cpu")
    marked = decoder.mark(batch)
    assert marked[DEVICE_JPEG].all()  # every file a whole RGB or grey JPEG
    np.testing.assert_array_equal(decoder(marked)["pixels"].numpy(), decoder(batch)["pixels"].numpy())
    # Marked for the PIL path, the same files give the PIL decoder's pixels exactly: the mark is what decides.
    pil = ImageDecoder(TINY_MODEL, pixel_dtype="uint8", jpeg_draft=False)(batch)["pixels"]
    out = decoder({**marked, DEVICE_JPEG: np.zeros(len(marked[DEVICE_JPEG]), bool)})
    np.testing.assert_array_equal(out["pixels"].numpy(), pil)


def test_the_device_decodes_a_batch_of_large_photos_a_part_at_a_time(monkeypatch):
    """A batch went to the device whole: 256 photos of 12 MP decode to some 9 GB and resize through float32
    copies several times that, past a GPU's memory. Parts of at most DEVICE_CHUNK_PIXELS give the same pixels."""
    from pipeline.score import scorer as scorer_module

    batch = jpeg_batch()
    decoder = TensorImageDecoder(TINY_MODEL, device="cpu")
    whole = decoder(batch)["pixels"].numpy()
    sizes = decoder.mark(batch)[DEVICE_JPEG]
    calls = []
    decode = decoder._decode_jpeg
    monkeypatch.setattr(decoder, "_decode_jpeg", lambda tensors, **kw: calls.append(len(tensors)) or decode(tensors, **kw))
    assert sizes.tolist() == [1600, 3072, 2387, 1024, 6000, 54000]
    monkeypatch.setattr(scorer_module, "DEVICE_CHUNK_PIXELS", 3500)
    np.testing.assert_array_equal(decoder(batch)["pixels"].numpy(), whole)
    assert calls == [1, 1, 2, 1, 1]  # 1600 | 3072 | 2387 + 1024 | 6000 alone | 54000 alone
    assert scorer_module._chunks([5, 5, 5, 20, 1], 10) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert scorer_module._chunks([], 10) == []


def test_captions_tokenised_upstream_score_the_same(scorer):
    batch = ImageDecoder(TINY_MODEL, pixel_dtype="uint8")(caption_batch())
    tokenised = tokenize_captions(batch, TINY_MODEL)
    np.testing.assert_array_equal(tokenised["tokens"], scorer.tokenizer(CAPTIONS).numpy())
    out = scorer(tokenised)
    np.testing.assert_array_equal(out["clip_score"], scorer(batch)["clip_score"])
    assert "tokens" not in out


def test_tensor_decoded_pixels_score_close_to_pil_decoded_ones(scorer):
    batch = jpeg_batch()
    on_tensors = scorer(TensorImageDecoder(TINY_MODEL, device="cpu")(batch))["clip_score"]
    via_pil = scorer(ImageDecoder(TINY_MODEL)(batch))["clip_score"]
    assert np.isfinite(on_tensors).all()
    np.testing.assert_allclose(on_tensors, via_pil, atol=0.02, rtol=0)


def direct_caption_scores(model, tokenizer, pixels: np.ndarray, captions) -> np.ndarray:
    """The textbook open_clip computation: encode both, normalise, dot."""
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
    return (img * txt).sum(-1).numpy()


def test_caption_scores_equal_direct_open_clip(scorer):
    decoded = ImageDecoder(TINY_MODEL)(caption_batch())
    out = scorer(decoded)
    expected = direct_caption_scores(scorer.model, scorer.tokenizer, decoded["pixels"], CAPTIONS)
    assert out["clip_score"].dtype == np.float32 and np.all(np.isnan(out["clip_margin"]))
    np.testing.assert_allclose(out["clip_score"], expected, atol=1e-5, rtol=0)
    assert len(np.unique(out["clip_score"])) == 6  # real, distinct scores
    assert "pixels" not in out and list(out["key"]) == [f"k{i}" for i in range(6)]
    # uint8 pixels (normalised inside the scorer) give the same scores.
    raw = scorer(ImageDecoder(TINY_MODEL, pixel_dtype="uint8")(caption_batch()))
    np.testing.assert_allclose(raw["clip_score"], expected, atol=1e-5, rtol=0)


def test_rows_that_cannot_be_scored_get_nan_and_a_reason(scorer):
    batch = caption_batch()
    batch["image"][1] = b"junk"
    batch["caption"][2] = "   "
    batch["caption"][3] = None
    out = scorer(ImageDecoder(TINY_MODEL)(batch))
    assert list(out["error"]) == ["", "undecodable image: unknown format", "empty caption", "empty caption", "", ""]
    assert np.isnan(out["clip_score"][1:4]).all() and not np.isnan(out["clip_score"][[0, 4, 5]]).any()
    clean_pixels = ImageDecoder(TINY_MODEL)(caption_batch())["pixels"]
    expected = direct_caption_scores(scorer.model, scorer.tokenizer, clean_pixels, CAPTIONS)
    np.testing.assert_allclose(out["clip_score"][[0, 4, 5]], expected[[0, 4, 5]], atol=1e-5, rtol=0)


def test_label_mode_builds_the_template_ensemble():
    classes = ["cat", "dog", "bird"]
    s = ClipScorer(TINY_MODEL, mode="label", classes=classes, device="cpu")
    with torch.no_grad():
        per_class = []
        for c in classes:
            e = F.normalize(s.model.encode_text(s.tokenizer([fill_template(t, c) for t in DEFAULT_TEMPLATES])), dim=-1)
            per_class.append(F.normalize(e.mean(0), dim=-1))
    np.testing.assert_allclose(s.class_emb.numpy(), torch.stack(per_class).numpy(), atol=1e-6)


def test_label_mode_margin_on_a_hand_made_case():
    s = ClipScorer(TINY_MODEL, mode="label", classes=["a", "b", "c"], device="cpu")
    decoded = ImageDecoder(TINY_MODEL)({"image": np.array([encode(random_images(1)[0])] * 5, dtype=object)})
    with torch.no_grad():
        e = F.normalize(s.model.encode_image(torch.from_numpy(decoded["pixels"][:1])), dim=-1)[0]
    ortho = torch.randn(e.shape[0], generator=torch.Generator().manual_seed(0))
    ortho = F.normalize(ortho - (ortho @ e) * e, dim=0)
    s.class_emb = torch.stack([e, -e, ortho])  # similarities to the image: +1, -1, 0
    decoded["label"] = np.array([0, 1, 2, None, 7], dtype=object)
    out = s(decoded)
    np.testing.assert_allclose(out["clip_score"][:3], [1.0, -1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(out["clip_margin"][:3], [1.0 - 0.0, -1.0 - 1.0, 0.0 - 1.0], atol=1e-5)
    assert list(out["error"]) == ["", "", "", "missing label", "label out of range: 7"]
    assert np.isnan(out["clip_score"][3:]).all() and np.isnan(out["clip_margin"][3:]).all()


def test_bad_scorer_arguments_are_refused():
    with pytest.raises(ValueError, match="two or more class names"):
        ClipScorer(TINY_MODEL, mode="label", classes=["only"])
    with pytest.raises(ValueError, match="mode must be"):
        ClipScorer(TINY_MODEL, mode="both")
    with pytest.raises(ValueError, match="unknown model config"):
        ClipScorer("no-such-model")


def test_checkpoint_from_a_path_scores_like_the_model_it_was_saved_from(scorer, tmp_path):
    path = str(tmp_path / "model.pt")
    save_checkpoint(scorer.model, path, TINY_MODEL)
    state = torch.load(path, weights_only=True)
    assert state["model_name"] == TINY_MODEL and "state_dict" in state
    decoded = ImageDecoder(TINY_MODEL)(caption_batch())
    loaded = ClipScorer(TINY_MODEL, pretrained=path, device="cpu")
    np.testing.assert_array_equal(loaded(dict(decoded))["clip_score"], scorer(dict(decoded))["clip_score"])
    fresh = ClipScorer(TINY_MODEL, device="cpu")  # another random init: the weights really came from the file
    assert not np.allclose(fresh(dict(decoded))["clip_score"], scorer(dict(decoded))["clip_score"])


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_clip(TINY_MODEL, pretrained=str(path))


def test_checkpoint_from_s3_scores_like_the_local_one(scorer, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MMDP_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/models/model.pt"
    save_checkpoint(scorer.model, url, TINY_MODEL)
    local = str(tmp_path / "model.pt")
    pio.write_bytes(pio.read_bytes(url), local)
    decoded = ImageDecoder(TINY_MODEL)(caption_batch())
    from_s3 = ClipScorer(TINY_MODEL, pretrained=url, device="cpu")(dict(decoded))["clip_score"]
    from_path = ClipScorer(TINY_MODEL, pretrained=local, device="cpu")(dict(decoded))["clip_score"]
    np.testing.assert_array_equal(from_s3, from_path)
    np.testing.assert_array_equal(from_s3, scorer(dict(decoded))["clip_score"])
    assert len(list((tmp_path / "cache").rglob("model.pt"))) == 1  # fetched once into the cache
    # What a job checks before it starts: weights that are there, or a tag open_clip has for the model.
    check_pretrained(TINY_MODEL, url)
    check_pretrained(TINY_MODEL, local)
    check_pretrained("ViT-B-32", "laion2b_s34b_b79k")  # a hub tag: listed by open_clip, nothing fetched
    check_pretrained(TINY_MODEL, None)
    with pytest.raises(ValueError, match="model.pt: no such object"):
        check_pretrained(TINY_MODEL, f"{s3_bucket}/modles/model.pt")
    # The pre-training output's folder, not its model.pt: a prefix exists too; every actor failed on it, in Ray.
    with pytest.raises(ValueError, match=f"--pretrained {s3_bucket}/models: a folder; name the checkpoint file"):
        check_pretrained(TINY_MODEL, f"{s3_bucket}/models")
    # A checkpoint in a folder its writer has not committed: a pre-training run that stopped over an earlier one.
    pio.write_bytes(b"", str(tmp_path / "_PENDING"))
    with pytest.raises(ValueError, match=f"--pretrained {local}: .*incomplete output"):
        check_pretrained(TINY_MODEL, local)
    pio.write_bytes(b"", url.rsplit("/", 1)[0] + "/_PENDING")
    with pytest.raises(ValueError, match="incomplete output"):
        check_pretrained(TINY_MODEL, url)
    with pytest.raises(ValueError, match="not an open_clip pretrained tag of ViT-B-32 .its tags: .*laion2b_s34b_b79k"):
        check_pretrained("ViT-B-32", "laion2b_s34b_b79")
