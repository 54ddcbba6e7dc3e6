"""Pre-training the offline reference CLIP model: contrastive training on a dataset's clean ``reference`` split.

What ``jobs.pretrain_reference_clip`` runs (its flags are the config the
functions here take). A small open_clip model (config ``mmdp-ref``) trained
with open_clip's own ``ClipLoss`` on pairs disjoint from the pool being
pruned, then evaluated zero-shot on the ``test`` split; it stands in for a
foundation model that cannot be downloaded where mmdp is built.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.data.contract import CAPTION, DEFAULT_TEMPLATES, IMAGE, LABEL
from pipeline.data.shards import class_names, dataset_metadata, in_file_order, read_shards
from pipeline.score.clip_models import load_clip, save_checkpoint
from pipeline.score.scorer import ImageDecoder, normalize_pixels
from pipeline.train.clip import (caption_or_prompt, clamp_logit_scale, clip_optimizer, label_of, pair_metrics,
                                 tokenize_distinct)
from pipeline.train.loop import cosine_lr

if TYPE_CHECKING:  # the job's config; the job imports this module only when it runs
    from jobs.pretrain_reference_clip import PretrainConfig


def _decode_split(cfg: PretrainConfig, split: str, decoder: ImageDecoder, classes: list[str], templates):
    """Decoded uint8 pixels, captions and labels (-1: none) of a split's usable rows, plus how many were not.

    A row without a caption takes its label's first prompt; a row with
    neither, or whose image does not decode, is counted and left out.
    """
    fields = [IMAGE, CAPTION, LABEL]
    pixels, captions, labels, dropped = [], [], [], 0
    with in_file_order():  # rows as they are stored: the run must not depend on Ray's read order
        rows = read_shards(storage.join(cfg.data, split), cfg.columns, tuple(fields)).select_columns(fields)
        for batch in rows.iter_batches(batch_size=2048, batch_format="numpy"):
            out = decoder({IMAGE: batch[IMAGE]})
            for i, err in enumerate(out["error"]):
                label = label_of(batch[LABEL][i])
                caption = caption_or_prompt(batch[CAPTION][i], label, classes, templates)
                if err or caption is None:
                    dropped += 1
                    continue
                pixels.append(out["pixels"][i])
                captions.append(caption)
                labels.append(label)
    pix = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros((0, 3, *decoder.size), dtype=torch.uint8)
    return pix, captions, torch.tensor(labels, dtype=torch.long), dropped


def _augment(batch: torch.Tensor, max_shift: int, flip: float, gen: torch.Generator) -> torch.Tensor:
    """Flip each uint8 image with probability ``flip`` and translate it by up to ``max_shift``
    pixels, filling with black (the Fashion-MNIST background)."""
    n, _, h, w = batch.shape
    if flip > 0:
        flipped = torch.rand(n, generator=gen) < flip
        batch = torch.where(flipped[:, None, None, None], batch.flip(-1), batch)
    if max_shift <= 0:
        return batch
    padded = F.pad(batch, (max_shift,) * 4)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _lr_at(step: int, total: int, cfg: PretrainConfig) -> float:
    return cfg.lr * cosine_lr(step, total, cfg.warmup_steps)


@torch.inference_mode()
def evaluate(model, tokenizer, decoder, pixels, captions, labels, classes, templates) -> dict:
    """Recall@1/5 both ways and, with class names and labels, zero-shot accuracy (:func:`pipeline.train.clip.pair_metrics`)."""
    model.eval()
    image_emb = torch.cat([F.normalize(model.encode_image(normalize_pixels(pixels[s:s + 1024], decoder.mean, decoder.std)),
                                       dim=-1) for s in range(0, len(pixels), 1024)])
    return pair_metrics(model, tokenizer, image_emb, captions, labels, classes, templates)


def train(cfg: PretrainConfig, checkpoint: str) -> dict:
    """Train as ``cfg`` (the job's config) says, evaluate zero-shot, save the model to ``checkpoint`` and
    ``metrics.json`` beside it. Returns the metrics."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    storage.check_not_pending(cfg.data)
    classes = class_names(cfg.data, cfg.classes, required=False)
    templates = list(dataset_metadata(cfg.data).get("templates") or DEFAULT_TEMPLATES)
    model, _, tokenizer = load_clip(cfg.model)
    decoder = ImageDecoder(cfg.model, pixel_dtype="uint8")
    pixels, captions, _, dropped = _decode_split(cfg, "reference", decoder, classes, templates)
    if len(pixels) < 2:
        raise ValueError(f"{cfg.data}/reference has {len(pixels)} usable rows; contrastive training needs 2+")
    tokens = tokenize_distinct(tokenizer, captions)
    print(f"reference: {len(pixels)} pairs ({dropped} unusable rows skipped), {len(set(captions))} distinct captions, "
          f"decoded in {time.perf_counter() - t0:.1f}s", flush=True)

    opt = clip_optimizer(model, cfg.lr, cfg.weight_decay)
    loss_fn = open_clip.ClipLoss()
    batch = min(cfg.batch_size, len(pixels))
    steps_per_epoch = len(pixels) // batch  # drop the ragged tail: tiny last batches give noisy contrastive steps
    total, step, losses = cfg.epochs * steps_per_epoch, 0, []
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(pixels), generator=gen)
        epoch_loss, t_epoch = 0.0, time.perf_counter()
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            x = normalize_pixels(_augment(pixels[idx], cfg.shift, cfg.flip, gen), decoder.mean, decoder.std)
            loss = loss_fn(model.encode_image(x, normalize=True), model.encode_text(tokens[idx], normalize=True),
                           model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_logit_scale(model)
            epoch_loss += loss.item()
            step += 1
        losses.append(epoch_loss / steps_per_epoch)
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {losses[-1]:.4f}  "
              f"lr {_lr_at(step - 1, total, cfg):.2e}  {time.perf_counter() - t_epoch:.1f}s", flush=True)
    train_seconds = time.perf_counter() - t_train

    test_pixels, test_captions, test_labels, test_dropped = _decode_split(cfg, "test", decoder, classes, templates)
    if not len(test_pixels):
        raise ValueError(f"{storage.join(cfg.data, 'test')} has no usable rows to evaluate on")
    quality = evaluate(model, tokenizer, decoder, test_pixels, test_captions, test_labels, classes, templates)
    accuracy = quality["zero_shot_accuracy"]
    save_checkpoint(model.eval(), checkpoint, cfg.model, epochs=cfg.epochs, zero_shot_accuracy=accuracy)
    metrics = {
        "model": cfg.model,
        "checkpoint": checkpoint,
        "zero_shot_accuracy": accuracy,
        "test_rows": quality["zero_shot_rows"],  # the rows zero-shot accuracy is over
        "test_rows_skipped": test_dropped,
        "recall": {k: v for k, v in quality.items() if "recall" in k},
        "test_pairs": quality["test_rows"],
        "train_pairs": len(pixels),
        "train_rows_skipped": dropped,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "loss_per_epoch": [round(v, 5) for v in losses],
        "torch_threads": torch.get_num_threads(),
        "classes": classes,
        "templates": templates,
        "config": asdict(cfg),
    }
    storage.write_json(metrics, storage.join(cfg.out, "metrics.json"))
    shown = "n/a (no class names or labels)" if accuracy is None else f"{accuracy:.4f} ({metrics['test_rows']} rows)"
    print(f"zero-shot accuracy on test: {shown}; image-to-text recall@1 {quality['i2t_recall@1']:.4f}; "
          f"trained in {train_seconds:.1f}s; checkpoint {checkpoint}", flush=True)
    return metrics
