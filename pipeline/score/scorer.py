"""Cross-modal consistency scoring: decode images, then score image-text agreement with open_clip.

Two stages, each a class that does its heavy set-up once in ``__init__`` and
maps a batch dict of NumPy arrays in ``__call__``, so they run on a plain dict
here and unchanged as Ray Data ``map_batches`` stages in the score job:

* :class:`ImageDecoder` (CPU): encoded bytes -> the model's preprocessed pixels,
  with a reason for every image it cannot decode safely; :class:`TensorImageDecoder`
  does the same for JPEGs on a GPU (nvJPEG), with the PIL path for the rest;
* :class:`ClipScorer` (CPU or GPU): pixels + text -> ``clip_score`` (cosine of the
  normalised image and text embeddings), and in label mode ``clip_margin``.

A row that cannot be scored keeps flowing with NaN scores and a non-empty
``error`` (``"<kind>: <detail>"``; group by the part before the colon), so
the job can send it to the rejects table instead of losing it.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
import open_clip
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.data.contract import DEFAULT_TEMPLATES, has_caption
from pipeline.score.clip_models import load_clip, preprocess_config, register_model_configs

# 8192 x 8192: above any real photo, far below what exhausts a worker's memory
# (a 50k x 50k PNG header would ask for 7.5 GB of RGB).
MAX_PIXELS = 8192 * 8192
# Caption tokens, when a stage before ClipScorer made them (see tokenize_captions).
TOKENS = "tokens"
# Which rows a device decoder takes, when a CPU stage before it read their headers (TensorImageDecoder.mark).
DEVICE_JPEG = "device_jpeg"
# Most pixels a device decodes and resizes at once (the resize works in float32: 16 bytes a pixel with its
# uint8 input): a batch of large photos goes through in parts, not whole (256 photos of 12 MP would need
# some 50 GB). One image of up to MAX_PIXELS always goes alone.
DEVICE_CHUNK_PIXELS = 1 << 26
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageRejected(ValueError):
    """An image that is not decoded; the message is the reject reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every PIL mode, with transparency composited on white (as web thumbnails show it)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert clips high-bit-depth values at 255; rescale them instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:  # float images keep [0, 1] by convention
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image, refusing what is unsafe or broken.

    Args:
        data: encoded image bytes (JPEG, PNG, WebP, ... anything PIL reads).
        max_pixels: largest width x height decoded; checked from the header, before decoding.
        draft_size: for JPEG, let the decoder downscale by 1/2..1/8 while keeping
            both sides >= this (much faster on large photos; slightly different pixels).

    Raises:
        ImageRejected: with a short reason (``empty image bytes``, ``image too large: ...``,
            ``extreme aspect ratio: ...``, ``undecodable image: ...``).
    """
    if data is None or len(data) == 0:
        raise ImageRejected("empty image bytes")
    try:
        with warnings.catch_warnings():
            # We apply our own, lower, pixel budget below; PIL's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRejected(f"image too large: {width}x{height} > {max_pixels} pixels")
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return _to_rgb(img)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:  # over PIL's own hard limit, refused by Image.open
        found = _BOMB_PIXELS.search(str(exc))
        raise ImageRejected(f"image too large: {found.group(1) if found else '?'} pixels > {max_pixels} pixels")
    except UnidentifiedImageError:
        raise ImageRejected("undecodable image: unknown format") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the row, not of the job
        raise ImageRejected(f"undecodable image: {type(exc).__name__}: {exc}"[:200]) from None


class ImageDecoder:
    """Stage: ``image`` bytes -> ``pixels`` preprocessed as open_clip would for the model.

    Output columns: ``pixels`` [n, 3, H, W] (float32 normalised, or uint8 before
    normalisation with ``pixel_dtype="uint8"``, a quarter of the bytes to ship
    to a GPU actor; :class:`ClipScorer` normalises those), ``error`` ("" when
    decoded), and every input column but ``image``. Rejected rows get zero pixels. An
    earlier ``error`` wins, and such rows are not decoded.

    Args:
        model: open_clip config name; fixes image size, mean, std, resize mode.
        pretrained: the weights the scorer will use (a hub tag may bring its own preprocessing).
        max_pixels: pixel budget per image, checked before decoding.
        pixel_dtype: ``"float32"`` or ``"uint8"``.
        jpeg_draft: let JPEG decoding downscale large photos on the fly.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        max_pixels: int = MAX_PIXELS,
        pixel_dtype: str = "float32",
        jpeg_draft: bool = True,
    ):
        if pixel_dtype not in ("float32", "uint8"):
            raise ValueError(f"pixel_dtype must be 'float32' or 'uint8', not {pixel_dtype!r}")
        cfg = preprocess_config(model, pretrained)
        transform = open_clip.image_transform(
            cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
            resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"], fill_color=cfg["fill_color"],
        )
        # open_clip's eval pipeline is [geometry on PIL..., ToTensor, Normalize]; the
        # geometry runs per image, the last two once per batch (same arithmetic).
        *self.geometry, to_tensor, normalize = transform.transforms
        if type(normalize).__name__ != "Normalize" or "ToTensor" not in type(to_tensor).__name__:
            raise RuntimeError(f"unexpected open_clip eval transform (open_clip changed?): {transform}")
        self.size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.max_pixels, self.pixel_dtype = max_pixels, pixel_dtype
        self.resize_shortest = cfg["resize_mode"] == "shortest"
        self.draft_size = max(self.size) if jpeg_draft else None

    def check_aspect(self, width: int, height: int) -> None:
        """Refuse a shape whose shortest-edge resize would blow up (a 1 x 60000 strip -> gigapixels)."""
        scale = max(self.size) / min(width, height)
        if self.resize_shortest and width * height * scale * scale > self.max_pixels:
            raise ImageRejected(f"extreme aspect ratio: {width}x{height}")

    def _geometry(self, img: Image.Image) -> np.ndarray:
        self.check_aspect(*img.size)
        for step in self.geometry:
            img = step(img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def pixels_of(self, data: bytes | None) -> tuple[np.ndarray | None, str]:
        """One image's HWC uint8 pixels and ``""``, or ``None`` and the reason it is rejected."""
        try:
            return self._geometry(decode_image(data, self.max_pixels, self.draft_size)), ""
        except ImageRejected as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a resize failure is the row's problem, not the job's
            return None, f"unprocessable image: {type(exc).__name__}: {exc}"[:200]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        earlier = _earlier_errors(batch, n)
        pixels = np.zeros((n, self.size[0], self.size[1], 3), dtype=np.uint8)
        errors = earlier.copy()  # a row an earlier stage rejected keeps its reason and is not decoded
        for i in np.flatnonzero(earlier == ""):
            hwc, errors[i] = self.pixels_of(images[i])
            if hwc is not None:
                pixels[i] = hwc
        chw = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
        if self.pixel_dtype == "float32":
            chw = normalize_pixels(torch.from_numpy(chw), self.mean, self.std).numpy()
            chw[errors != ""] = 0.0
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(pixels=chw, error=errors.astype(str))
        return out


def _earlier_errors(batch: dict[str, object], n: int) -> np.ndarray:
    """The reasons an earlier stage's ``error`` column gives (``""`` where none, or no such column), as objects."""
    if "error" not in batch:
        return np.full(n, "", dtype=object)
    return np.array(["" if e is None else str(e) for e in batch["error"]], dtype=object)


def _is_whole_jpeg(data: bytes | memoryview) -> bool:
    # Start and end markers both present: a truncated file goes to PIL, which names the problem
    # (device decoders differ in how much of a truncated file they accept). The end is looked for in
    # the last 64 bytes (a file padded with more takes the PIL path: slower, the same pixels).
    return data[:3] == b"\xff\xd8\xff" and bytes(data[-64:]).rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


def encoded_files(images) -> list[bytes | memoryview | None]:
    """Each row's encoded file: a NumPy batch's ``bytes`` as they are; for an Arrow binary column
    (a ``batch_format="pyarrow"`` batch) views of the column's own buffer, ``None`` for a null.

    Ray Data's conversion of a block to NumPy copies every file into a Python
    ``bytes`` (9-30 ms a batch of 1,024 of 54 KB JPEGs on one core, the more
    where each batch's copies land on fresh memory); the views copy nothing.
    """
    if not isinstance(images, (pa.Array, pa.ChunkedArray)):
        return list(images)
    files: list[bytes | memoryview | None] = []
    for chunk in images.chunks if isinstance(images, pa.ChunkedArray) else [images]:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)) or chunk.buffers()[2] is None:
            files.extend(chunk.to_pylist())  # any other type, or no bytes at all: the rows as Python objects
            continue
        _, offset_buffer, data_buffer = chunk.buffers()
        data = memoryview(data_buffer).cast("B")  # Arrow exports signed chars: as bytes compare, unsigned
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offset_buffer, width)[chunk.offset:chunk.offset + len(chunk) + 1].tolist()
        valid = chunk.is_valid().to_numpy(zero_copy_only=False).tolist()
        files.extend(data[a:b] if ok else None for a, b, ok in zip(offsets[:-1], offsets[1:], valid))
    return files


def jpeg_tensors(datas: Sequence[bytes | memoryview]) -> list[torch.Tensor]:
    """uint8 tensors over the encoded files' own bytes, for ``decode_jpeg``: views, not copies.

    The decoder only reads its input, so the read-only ``bytes`` (or views of
    an Arrow buffer: :func:`encoded_files`) are not copied into writable
    buffers first (a copy of every file, 55 MB a batch of 1,024 web photos,
    on the scoring actor's one CPU while its GPU waits). Each tensor holds a
    reference to its file's memory.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return [torch.frombuffer(d, dtype=torch.uint8) for d in datas]


def device_jpeg_decoder():
    """``torchvision.io.decode_jpeg`` as :class:`TensorImageDecoder` calls it (RGB output), or an ImportError
    that names the way out: torchvision deprecated its image decoding in 0.29, for removal later."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        raise ImportError("this torchvision has no torchvision.io.decode_jpeg (deprecated since 0.29): decode "
                          "with PIL in the CPU tasks (--decode tasks), or install a torchvision that has it") from exc
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


class TensorImageDecoder:
    """Stage: ``image`` bytes -> ``pixels`` as a uint8 tensor [n, 3, H, W] on ``device``, for :class:`ClipScorer`.

    Whole baseline or progressive RGB/grey JPEGs (nearly all web photos) are
    decoded in one batch by ``torchvision.io.decode_jpeg`` on ``device``
    (nvJPEG on a GPU), then resized and cropped there by the model's own
    open_clip eval transform, so a GPU scoring actor decodes its own input
    and the CPUs only read and check rows. Every other image (PNG, WebP,
    CMYK, truncated or broken files) takes :class:`ImageDecoder`'s PIL path,
    with its reasons for what it rejects. The headers are read first, so the
    pixel budget and aspect-ratio checks hold before anything is decoded:
    here, or by :meth:`mark` in a CPU stage before it (its ``DEVICE_JPEG``
    column is then taken as read, so a GPU actor's own CPU does not read
    them; about 22 ms a batch of 1,024 on one core).

    Pixels differ from :class:`ImageDecoder`'s by resampling arithmetic only
    (mean absolute difference about 0.2 of 255 against its full-size decode;
    its JPEG draft mode, on by default, differs more on large photos).

    Output columns: ``pixels`` (a tensor; zeros for rejected rows), ``error``,
    and every input column but ``image``. An earlier ``error`` wins, and such
    rows are not decoded.
    """

    def __init__(self, model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                 max_pixels: int = MAX_PIXELS):
        self.pil = ImageDecoder(model, pretrained, max_pixels=max_pixels, pixel_dtype="uint8", jpeg_draft=False)
        self.device = torch.device(device)
        self._decode_jpeg = device_jpeg_decoder()

    def _device_pixels(self, data) -> int:
        """The pixels of a whole RGB/grey JPEG within the checks, which the device decodes; 0 for anything
        else, which goes to the PIL path."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or not _is_whole_jpeg(data):
            return 0
        try:
            img = Image.open(io.BytesIO(data))  # the header only
            width, height = img.size
            self.pil.check_aspect(width, height)
        except Exception:  # noqa: BLE001 - the PIL path gives the reason
            return 0
        ok = img.format == "JPEG" and img.mode in ("RGB", "L") and width * height <= self.pil.max_pixels
        return width * height if ok else 0

    def mark(self, batch: dict[str, object]) -> dict[str, object]:
        """The header reads as a stage of their own, for a CPU task before the device's actor: adds
        ``DEVICE_JPEG``, each row's pixels where it goes to the device (a whole RGB/grey JPEG within the
        checks), else 0. Rows an earlier stage rejected (an ``error``) are not read: the decoder skips them."""
        files = encoded_files(batch["image"])
        rejected = _earlier_errors(batch, len(files)) != ""
        return {**batch, DEVICE_JPEG: np.array([0 if r else self._device_pixels(f) for f, r in zip(files, rejected)],
                                               np.int64)}

    def device_inputs(self, batch: dict[str, object], rows) -> tuple[list, list[int], list[torch.Tensor], list[int]]:
        """The host's share before the device decodes: the batch's files (:func:`encoded_files`), which of
        ``rows`` go to the device (``DEVICE_JPEG`` from :meth:`mark`, else their headers read here), those
        files as tensors (:func:`jpeg_tensors`), and their pixels."""
        files = encoded_files(batch["image"])
        marked = batch.get(DEVICE_JPEG)
        pixels = [int(marked[i]) if marked is not None else self._device_pixels(files[i]) for i in rows]
        jpegs = [i for i, p in zip(rows, pixels) if p]
        return files, jpegs, jpeg_tensors([files[i] for i in jpegs]), [p for p in pixels if p]

    def _decode_jpegs(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(self._decode_jpeg(tensors, device=self.device))
        except Exception:  # noqa: BLE001 - one bad file fails the batch: find it
            decoded = []
            for t in tensors:
                try:
                    decoded.append(self._decode_jpeg(t, device=self.device))
                except Exception:  # noqa: BLE001 - the PIL path gives the reason
                    decoded.append(None)
            return decoded

    def _resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        # Images of one shape (img2dataset's fixed-size output, say) go through the transform as one stack.
        out = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for rows in by_shape.values():
            x = torch.stack([images[i] for i in rows])
            for step in self.pil.geometry:
                x = step(x)
            for i, img in zip(rows, x):
                out[i] = img
        return torch.stack(out)

    def __call__(self, batch: dict[str, object]) -> dict[str, object]:
        """``batch["image"]``: a NumPy array of ``bytes``, or an Arrow binary column (viewed, not copied)."""
        n = len(batch["image"])
        earlier = _earlier_errors(batch, n)
        pixels = torch.zeros((n, 3, *self.pil.size), dtype=torch.uint8, device=self.device)
        errors = earlier.copy()
        todo = [i for i in range(n) if earlier[i] == ""]
        images, jpegs, tensors, sizes = self.device_inputs(batch, todo)
        fine = []
        for part in _chunks(sizes, DEVICE_CHUNK_PIXELS):  # decoded and resized a part at a time
            rows = [jpegs[k] for k in part]
            decoded = dict(zip(rows, self._decode_jpegs([tensors[k] for k in part])))
            done = [i for i in rows if decoded[i] is not None]
            if done:
                pixels[done] = self._resize([decoded[i] for i in done])
            fine += done
        for i in sorted(set(todo) - set(fine)):
            hwc, errors[i] = self.pil.pixels_of(images[i])
            if hwc is not None:
                pixels[i] = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))).to(self.device)
        out = {k: v for k, v in batch.items() if k not in ("image", DEVICE_JPEG)}
        out.update(pixels=pixels, error=errors.astype(str))
        return out


def _chunks(sizes: list[int], budget: int) -> list[range]:
    """Consecutive positions of ``sizes`` in parts whose sizes sum to at most ``budget`` (an item larger than it
    alone)."""
    parts, start, total = [], 0, 0
    for k, size in enumerate(sizes):
        if k > start and total + size > budget:
            parts.append(range(start, k))
            start, total = k, 0
        total += size
    if start < len(sizes):
        parts.append(range(start, len(sizes)))
    return parts


def normalize_pixels(uint8_chw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [n,3,H,W] -> float32 normalised, with torchvision's ToTensor + Normalize arithmetic."""
    return uint8_chw.to(torch.float32).div(255).sub_(mean.to(uint8_chw.device)).div_(std.to(uint8_chw.device))


def fill_template(template: str, name: str) -> str:
    """``"a photo of a {}."`` (or ``{class}``) with the class name put in."""
    return template.replace("{class}", name).replace("{}", name)


@torch.inference_mode()
def class_text_embeddings(
    model: torch.nn.Module, tokenizer, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One normalised text embedding per class: the mean of its normalised template embeddings.

    Returns:
        float32 tensor [len(classes), embed_dim] on ``device``.
    """
    prompts = [fill_template(t, c) for c in classes for t in templates]
    emb = F.normalize(model.encode_text(tokenizer(prompts).to(device)).float(), dim=-1)
    emb = emb.view(len(classes), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    register_model_configs()
    return open_clip.get_tokenizer(model)


def tokenize_captions(batch: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
    """Stage: add ``tokens``, every row's ``caption`` tokenised for ``model``, as :class:`ClipScorer` would.

    The score job runs it in its CPU tasks, so a GPU scoring actor spends no
    time on text processing.
    """
    captions = [str(c) for c in np.asarray(batch["caption"], dtype=object)]
    return {**batch, TOKENS: _tokenizer(model)(captions).numpy()}


class ClipScorer:
    """Stage: preprocessed ``pixels`` + text -> ``clip_score`` (and ``clip_margin`` in label mode).

    Caption mode compares each image with its own ``caption``. Label mode
    compares it with its ``label``'s class embedding (a template ensemble, built
    once here) and also returns ``clip_margin``: that score minus the best
    other class's, negative when the image looks more like another class.

    Output: the input columns except ``pixels`` (consumed; shipping them back
    would cost as much as shipping them in), plus ``clip_score`` and
    ``clip_margin`` (float32; margin NaN in caption mode), ``error`` (input
    errors kept, plus ``empty caption`` / ``missing label`` / ``label out of
    range: k`` for rows this mode cannot score; those rows get NaN scores).

    Args:
        model: open_clip config name.
        pretrained: ``None``, hub tag, local checkpoint path or object-store URL.
        mode: ``"caption"`` or ``"label"``.
        classes: class names, index = label (label mode).
        templates: prompt templates with ``{}`` for the class name (label mode).
        device: ``None`` picks CUDA when available (then fp16 autocast), else CPU.
        num_threads: CPU threads for torch (the cores Ray gave this actor); ``None`` leaves torch's default.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        mode: str = "caption",
        classes: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        device: str | None = None,
        num_threads: int | None = None,
    ):
        if mode not in ("caption", "label"):
            raise ValueError(f"mode must be 'caption' or 'label', not {mode!r}")
        if mode == "label" and len(classes or []) < 2:
            raise ValueError("label mode needs two or more class names (classes=[...])")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mode = mode
        self.model, _, self.tokenizer = load_clip(model, pretrained, device=self.device)
        cfg = self.model.visual.preprocess_cfg
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.classes = list(classes or [])
        self.class_emb = None
        if mode == "label":
            with self._autocast():
                self.class_emb = class_text_embeddings(
                    self.model, self.tokenizer, self.classes, list(templates or DEFAULT_TEMPLATES), self.device
                )

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def _row_errors(self, batch: dict[str, np.ndarray], n: int) -> np.ndarray:
        errors = _earlier_errors(batch, n)
        if self.mode == "caption":
            captions = batch.get("caption", np.full(n, None, dtype=object))
            bad = np.array([not has_caption(c) for c in captions], dtype=bool)
            errors[(errors == "") & bad] = "empty caption"
            return errors
        for i, label in enumerate(batch.get("label", np.full(n, None, dtype=object))):
            if errors[i]:
                continue
            if label is None or (isinstance(label, float) and np.isnan(label)):
                errors[i] = "missing label"
            elif not 0 <= int(label) < len(self.classes):
                errors[i] = f"label out of range: {int(label)}"
        return errors

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]
        if not isinstance(pixels, torch.Tensor) and pixels.dtype == object:  # Ray hands ragged tensor columns over as an object array
            pixels = np.stack(list(pixels))
        n = len(pixels)
        errors = self._row_errors(batch, n)
        ok = np.flatnonzero(errors == "")
        score = np.full(n, np.nan, dtype=np.float32)
        margin = np.full(n, np.nan, dtype=np.float32)
        if len(ok):
            x = self._rows(pixels, ok, n)
            if x.dtype == torch.uint8:
                x = normalize_pixels(x, self.mean, self.std)
            # Encoders in fp16 on a GPU; the cosines themselves in fp32 (outside autocast).
            with self._autocast():
                img = self.model.encode_image(x)
                if self.mode == "caption":
                    txt = self.model.encode_text(self._caption_tokens(batch, ok, n))
            img = F.normalize(img.float(), dim=-1)
            if self.mode == "caption":
                score[ok] = (img * F.normalize(txt.float(), dim=-1)).sum(dim=-1).cpu().numpy()
            else:
                labels = torch.as_tensor([int(batch["label"][i]) for i in ok], device=self.device)
                sims = img @ self.class_emb.T
                own = sims.gather(1, labels[:, None]).squeeze(1)
                others = sims.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
                score[ok] = own.cpu().numpy()
                margin[ok] = (own - others).cpu().numpy()
        out = {k: v for k, v in batch.items() if k not in ("pixels", TOKENS)}
        out.update(clip_score=score, clip_margin=margin, error=errors.astype(str))
        return out

    def _rows(self, values, ok: np.ndarray, n: int) -> torch.Tensor:
        """The scorable rows of a NumPy array or tensor, on this scorer's device (no copy when all are)."""
        if isinstance(values, torch.Tensor):
            return (values if len(ok) == n else values[torch.as_tensor(ok, device=values.device)]).to(self.device)
        return torch.from_numpy(np.ascontiguousarray(values if len(ok) == n else values[ok])).to(self.device)

    def _caption_tokens(self, batch: dict[str, np.ndarray], ok: np.ndarray, n: int) -> torch.Tensor:
        """The scorable rows' caption tokens on this scorer's device: made upstream, else here."""
        if TOKENS in batch:  # the score job makes them in its CPU tasks
            tokens = batch[TOKENS]
            return self._rows(np.stack(list(tokens)) if tokens.dtype == object else tokens, ok, n)
        return self.tokenizer([str(c) for c in np.asarray(batch["caption"], dtype=object)[ok]]).to(self.device)
