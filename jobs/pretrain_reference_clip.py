"""Pre-train the offline reference CLIP model on a dataset's clean ``reference`` split.

No pretrained CLIP weights can be downloaded where mmdp is built, so this job
trains a small open_clip model (config ``mmdp-ref``, open_clip's own
``ClipLoss``) on image-caption pairs that are disjoint from the pool being
pruned. It stands in for a foundation model: its zero-shot accuracy on the
``test`` split is printed and saved next to the checkpoint, so every result
that uses it can say how good it is. Users with internet name a hub model
instead (``--model ViT-B-32 --pretrained laion2b_s34b_b79k`` in the score job).

Local (about 3-5 minutes on 2 CPU cores)::

    python -m jobs.pretrain_reference_clip --data /tmp/fmnist --out /tmp/ref-clip

On a Ray cluster (runs on the head node; the paths may be object-store URLs)::

    ray job submit --working-dir . -- python -m jobs.pretrain_reference_clip \\
        --data s3://bucket/fmnist --out s3://bucket/ref-clip

Writes the folder ``OUT``: ``model.pt``, the checkpoint (what
``load_clip("mmdp-ref", pretrained="OUT/model.pt")`` and the score job's
``--pretrained OUT/model.pt`` load), ``metrics.json`` (zero-shot accuracy,
timings, losses) and ``config.json`` (the resolved config, also logged),
committed last. Argument errors, and a missing or unusable dataset, exit
with code 2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import open_clip
import ray.data
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.cli import HELP, option, run_job
from pipeline.score.clip_models import REFERENCE_MODEL, load_clip, register_model_configs, save_checkpoint
from pipeline.data.contract import CAPTION, IMAGE, LABEL, ColumnMapping
from pipeline.data.shards import class_names, dataset_metadata, read_shards
from pipeline.train.clip import (caption_or_prompt, clamp_logit_scale, clip_optimizer, label_of, pair_metrics,
                                 tokenize_distinct)
from pipeline.train.loop import cosine_lr
from pipeline.score.scorer import DEFAULT_TEMPLATES, ImageDecoder, normalize_pixels


MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class PretrainConfig:
    """What the job trains and how; one field per command-line flag (``--batch-size`` for ``batch_size``)."""

    OUTPUT: ClassVar[str] = "out"
    RAY: ClassVar[bool] = True  # the splits are read with Ray Data (parquet or webdataset shards, any store)

    data: str = field(metadata={HELP: "dataset URL: reference/ and test/ shard folders (and metadata.json)"})
    out: str = field(metadata={HELP: "output folder URL: model.pt (the checkpoint), metrics.json, config.json"})
    columns: str = option("mmdp", "column mapping of the shards: mmdp, img2dataset, or pairs like image=jpg,caption=txt")
    classes: tuple[str, ...] | None = option(
        None, "class names (label i is the i-th), for zero-shot accuracy; default: the dataset's metadata.json, "
              "else none (recall only)")
    model: str = option(REFERENCE_MODEL, "open_clip config name")
    # The reference model underfits at this size, so more steps pay (BENCHMARKS.md has the runs).
    epochs: int = option(20, "passes over the reference split")
    # Twice the steps of 256 per epoch; ~13 positives of each class per batch.
    batch_size: int = option(128, "pairs per contrastive batch")
    # AdamW peak; tiny ViTs from scratch want a larger lr than CLIP's 5e-4.
    lr: float = option(2e-3, "peak AdamW learning rate (cosine decay)")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only")  # open_clip's default
    warmup_steps: int = option(100, "linear lr warm-up steps")  # ~1 epoch; stabilises attention early on
    # Kept mild since the model underfits at this budget.
    shift: int = option(2, "max random translation, pixels")
    # Off: Fashion-MNIST's shoes all face one way.
    flip: float = option(0.0, "horizontal flip probability")
    seed: int = option(0, "seed for init, order and augmentation")
    threads: int | None = option(None, "torch CPU threads; none: torch's default (all cores)")
    s3_endpoint: str | None = option(None, "endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL or AWS)")

    def __post_init__(self):
        # A ValueError here is a usage error: parse_config turns it into exit code 2.
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (a contrastive batch needs negatives)"),
            (self.lr > 0, "--lr must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.shift >= 0, "--shift must be >= 0"),
            (0 <= self.flip <= 1, "--flip must be in [0, 1]"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (not self.out.endswith(".pt"), f"--out is a folder (the checkpoint goes to OUT/{MODEL_FILE}), got {self.out}"),
        ]
        ColumnMapping.parse(self.columns)  # a SchemaError (a ValueError) names a bad mapping
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def checkpoint_url(out: str) -> str:
    """The checkpoint in the job's output folder: what ``--pretrained`` of the score job takes."""
    return storage.join(out, MODEL_FILE)


def _decode_split(cfg: PretrainConfig, split: str, decoder: ImageDecoder, classes: list[str], templates):
    """Decoded uint8 pixels, captions and labels (-1: none) of a split's usable rows, plus how many were not.

    A row without a caption takes its label's first prompt; a row with
    neither, or whose image does not decode, is counted and left out.
    """
    # Rows in file order, as they are stored: the run must not depend on Ray's read order.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    fields = [IMAGE, CAPTION, LABEL]
    rows = read_shards(storage.join(cfg.data, split), cfg.columns, tuple(fields)).select_columns(fields)
    pixels, captions, labels, dropped = [], [], [], 0
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


def train(cfg: PretrainConfig) -> dict:
    """Train, evaluate zero-shot, save checkpoint and metrics. Returns the metrics."""
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
    save_checkpoint(model.eval(), checkpoint_url(cfg.out), cfg.model, epochs=cfg.epochs, zero_shot_accuracy=accuracy)
    metrics = {
        "model": cfg.model,
        "checkpoint": checkpoint_url(cfg.out),
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
          f"trained in {train_seconds:.1f}s; checkpoint {checkpoint_url(cfg.out)}", flush=True)
    return metrics


def _check_model(cfg: PretrainConfig) -> None:
    register_model_configs()
    if open_clip.get_model_config(cfg.model) is None:
        raise ValueError(f"unknown --model {cfg.model!r}; known: {', '.join(open_clip.list_models())}")


def main(argv: list[str] | None = None) -> int:
    return run_job(PretrainConfig, argv, _run, doc=__doc__, prog="python -m jobs.pretrain_reference_clip",
                   check=_check_model)


def _run(cfg: PretrainConfig) -> None:
    train(cfg)  # prints its progress and result


if __name__ == "__main__":
    sys.exit(main())
