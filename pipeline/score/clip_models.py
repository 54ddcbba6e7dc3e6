"""open_clip models for mmdp: the configs it ships, loading from anywhere, saving checkpoints.

A model is named by an open_clip config name (``ViT-B-32``, or one of the
configs in ``pipeline/score/model_configs/``: ``mmdp-tiny`` for tests,
``mmdp-ref`` for the offline reference model, a 4-layer, width-128 ViT on
28 px images cut into 7 px patches) plus where its weights come from:

* ``None``: random initialisation;
* an open_clip hub tag such as ``laion2b_s34b_b79k`` (downloaded by open_clip);
* a local checkpoint path;
* an object-store URL (``s3://``, ``gs://``), fetched once into a local cache.

open_clip's config registry is per process, so every process that names an
mmdp config (each Ray actor and worker) must call :func:`register_model_configs`
first; :func:`load_clip` and :func:`preprocess_config` do it for you.
"""

from __future__ import annotations

import io as _io
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from pipeline import storage

CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> list[str]:
    """Make the configs shipped in ``pipeline/score/model_configs`` known to open_clip in this process.

    Idempotent and cheap after the first call, so call it at the top of every
    process (Ray actors and workers start with a fresh open_clip registry).

    Returns:
        The names of the shipped configs.
    """
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
    return names


def model_config(model: str) -> dict:
    """open_clip's config of ``model`` (mmdp's own configs registered first).

    Raises:
        ValueError: an unknown name, with the known ones.
    """
    register_model_configs()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown model config {model!r}; known: {', '.join(open_clip.list_models())}")
    return cfg


def contrastive_config(model: str, flag: str = "--model") -> dict:
    """:func:`model_config` of a model mmdp can train: a CLIP, whose forward gives (image features, text
    features, temperature) for open_clip's softmax contrastive loss (``ClipLoss``). SigLIP's configs (a
    logit bias, a sigmoid loss) and CoCa's (a captioning decoder) train with other losses: refused here,
    before a run, not at its first step. (Any of them scores: scoring reads the features alone.)

    Raises:
        ValueError: an unknown name, or one of those, naming ``flag``.
    """
    cfg = model_config(model)
    other = ("a SigLIP config (sigmoid loss, a logit bias)" if "init_logit_bias" in cfg else
             "a CoCa config (a captioning decoder)" if "multimodal_cfg" in cfg else None)
    if other:
        raise ValueError(f"{flag} {model}: {other}; mmdp trains CLIP models with the softmax contrastive loss "
                         "(score with it, train a CLIP config)")
    return cfg


def check_pretrained(model: str, pretrained: str | None) -> None:
    """Refuse a ``--model`` open_clip does not know, or a ``--pretrained`` that names no weights: neither an
    object that exists (not a folder: a prefix exists too), nor a file on this machine, nor one of open_clip's
    tags for ``model``; or a checkpoint in a folder its writer has not committed (``_PENDING``: a pre-training that stopped or
    still runs, over an earlier checkpoint of the same name).

    What :func:`load_clip` would otherwise find only in the actors, after a job has taken over its output.

    Raises:
        ValueError: naming the flag, the value and what was looked for.
    """
    model_config(model)
    if not pretrained:
        return
    if _is_url(pretrained):
        if not storage.exists(pretrained):
            raise ValueError(f"--pretrained {pretrained}: no such object")
        if storage.is_folder(pretrained):  # a prefix with objects under it: exists() is true of it too
            raise ValueError(f"--pretrained {pretrained}: a folder; name the checkpoint file in it")
        folder = storage.parent(pretrained)
        if folder:
            _check_committed(pretrained, folder)
        return
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        raise ValueError(f"--pretrained {pretrained}: a folder; name the checkpoint file in it")
    if os.path.exists(path):
        _check_committed(pretrained, os.path.dirname(os.path.abspath(path)))
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ValueError(f"--pretrained {pretrained}: no such file here, and not an open_clip pretrained tag of "
                         f"{model} (its tags: {', '.join(tags) or 'none'})")


def _check_committed(pretrained: str, folder: str) -> None:
    try:
        storage.check_not_pending(folder)
    except storage.InputError as e:
        raise ValueError(f"--pretrained {pretrained}: {e}") from None


def _is_url(pretrained: str) -> bool:
    return urlparse(pretrained).scheme not in ("",) and "://" in pretrained


def resolve_pretrained(pretrained: str | None) -> str | None:
    """Turn ``pretrained`` into what open_clip takes: ``None``, a hub tag, or a local file path.

    Object-store URLs are downloaded into the local cache (``$MMDP_CACHE``,
    default ``~/.cache/mmdp``); a later call, or another process on the same
    machine, reuses the cached file while the object is unchanged
    (:func:`pipeline.storage.fetch_to_cache`).
    """
    if not pretrained:
        return None
    if _is_url(pretrained):
        return storage.fetch_to_cache(pretrained)
    if os.path.exists(os.path.expanduser(pretrained)):
        return os.path.abspath(os.path.expanduser(pretrained))
    return pretrained  # a hub tag; open_clip says clearly if it is not one


def preprocess_config(model: str, pretrained: str | None = None) -> dict[str, Any]:
    """The eval preprocessing open_clip uses for ``model`` (size, mean, std, interpolation, ...).

    Computed without building the model, the way ``open_clip.create_model``
    computes it: open_clip's defaults, the config's image size, then the hub
    tag's own preprocessing when ``pretrained`` names a tag. Covers built-in
    and registered configs (not ``hf-hub:``/``local-dir:`` names).
    """
    cfg = model_config(model)
    out = asdict(PreprocessCfg())
    if pretrained and not _is_url(pretrained) and not os.path.exists(os.path.expanduser(pretrained)):
        out = merge_preprocess_dict(out, open_clip.get_pretrained_cfg(model, pretrained))
    out["size"] = cfg["vision_cfg"].get("image_size", out["size"])
    return out


def load_clip(
    model: str, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Build an open_clip model in eval mode with its eval preprocessing and tokenizer.

    Checkpoints are read with ``torch.load(weights_only=True)`` (open_clip's
    ``load_checkpoint`` with ``weights_only=True``), so a checkpoint cannot run
    code when loaded.

    Args:
        model: open_clip config name (``ViT-B-32``, ``mmdp-ref``, ``mmdp-tiny``, ...).
        pretrained: ``None`` (random init), hub tag, local path, or object-store URL.
        device: where the model lives.

    Returns:
        ``(model, preprocess, tokenizer)``: preprocess maps a PIL image to a
        normalised float tensor [3, H, W]; tokenizer maps a list of strings to
        token ids [n, context_length].
    """
    model_config(model)  # registers mmdp configs; clear error for an unknown name
    net, _, preprocess = open_clip.create_model_and_transforms(
        model, pretrained=resolve_pretrained(pretrained), device=device, weights_only=True
    )
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


def save_checkpoint(model: torch.nn.Module, url: str, model_name: str, **extra: Any) -> None:
    """Write ``model``'s weights to ``url`` (local or object store), atomically.

    The file is what ``load_clip(model_name, pretrained=url)`` loads: a dict with
    ``state_dict`` (open_clip's checkpoint layout) and plain metadata values
    only, so ``torch.load(weights_only=True)`` accepts it.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = _io.BytesIO()
    torch.save({"state_dict": state, "model_name": model_name, **extra}, buf)
    storage.write_bytes(buf.getvalue(), url)
