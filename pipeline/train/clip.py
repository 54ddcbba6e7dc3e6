"""The contrastive task (``jobs.train --task clip``): an open_clip model trained on image-caption pairs.

Data per epoch, as for the classifier (:mod:`pipeline.train.driver`)::

    read shards (key, image, caption, label) -> index stage -> keep stage (the plan)
      -> pair_stage (decode to the model's size, shift, caption) -> Train workers

A pair's loss is its own term of open_clip's symmetric contrastive loss
(:class:`open_clip.ClipLoss`): the cross entropy of its image against every
caption of its batch, plus that of its caption against every image, halved.
The mean of the batch's terms is exactly ``ClipLoss``'s value, so weighting
and reporting them works as a classifier's per-sample losses do. Each
worker's batch is one contrastive batch (its own negatives; features are not
gathered across workers, whose pruned batches differ).

A pair's loss therefore depends on its batch, not only on the pair:

* size: the more pairs, the more negatives and the higher the loss of the
  same model (chance is ``log(batch)``). ``--step-schedule full`` shrinks a
  pruned epoch's batches, so loss values of different epochs are not on one
  scale; within an epoch every batch has the plan's size (the last one
  aside), and the plans compare losses only within an epoch (ranks and the
  epoch's mean);
* composition: pairs whose captions say the same thing (the same template
  and class) are negatives of each other that cannot be told apart, so a
  pair's loss rises with the number of look-alike captions in its batch.
  Rows are reshuffled every epoch, so this averages out over epochs rather
  than marking the same pairs each time.

Probes (rows the plan excluded, weight 0) are embedded without gradient and
take part in the batch as the other rows do, so their loss is their term of
the same batch's loss.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.data.contract import DEFAULT_TEMPLATES, has_caption
from pipeline.score.clip_models import load_clip
from pipeline.score.scorer import ImageDecoder, class_text_embeddings, fill_template, normalize_pixels
from pipeline.train.pruning import step_loss
from pipeline.train.stages import UNDECODABLE, key_hash, row_draws, shift_images

# Recall is reported at these ranks.
RECALL_AT = (1, 5)


@functools.lru_cache(maxsize=4)
def _decoder(model: str) -> ImageDecoder:
    return ImageDecoder(model, pixel_dtype="uint8")


def label_of(value) -> int:
    """A label cell as an int, -1 when absent (Ray hands nulls over as None or NaN)."""
    return -1 if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def caption_or_prompt(caption, label: int, classes, templates) -> str | None:
    """The row's caption, or when it has none its label's first prompt; None when it has neither."""
    if has_caption(caption):
        return caption
    if 0 <= label < len(classes):
        return fill_template(templates[0], classes[label])
    return None


# What to do about a row the stages cannot use, by split: the score job rejects such train rows; the test split
# is not scored, and its metrics count every row.
_FIX = {**UNDECODABLE, "test": "the test metrics count every test row: fix the test split"}


def captions_for(batch: dict, classes: tuple[str, ...], templates: tuple[str, ...],
                 split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(captions, labels) of a batch: an empty caption becomes its label's first prompt; a missing label is -1.

    Raises:
        ValueError: a row with neither a caption nor a known label (the score job rejects those), naming
            the ``split``.
    """
    n = len(batch["key"])
    raw_captions = batch.get("caption", np.full(n, None, dtype=object))
    labels = np.array([label_of(v) for v in batch.get("label", np.full(n, None, dtype=object))], np.int64)
    captions = np.empty(n, dtype=object)
    for i, caption in enumerate(raw_captions):
        captions[i] = caption_or_prompt(caption, labels[i], classes, templates)
        if captions[i] is None:
            raise ValueError(f"{split} row {batch['key'][i]!r} has no caption and no known label; {_FIX[split]}")
    return captions, labels


def pair_stage(batch: dict, model: str, classes: tuple[str, ...], templates: tuple[str, ...],
               augment: bool, seed: int, shift: int = 2, split: str = "train") -> dict:
    """Ray Data stage: image bytes -> uint8 ``pixels`` [n, 3, H, W] at ``model``'s size, with its ``caption`` and ``label``.

    With ``augment``, each image moves by up to ``shift`` pixels (black fill),
    seeded by (seed, epoch, sample) so a restarted run sees the same shifts.
    ``index``, ``weight`` and ``epoch`` pass through.

    Raises:
        ValueError: an image that does not decode, or a row with neither caption nor label, naming the
            ``split`` and the row (in the train split the score job rejected such rows, so the scores and
            the data disagree).
    """
    out = _decoder(model)({"image": batch["image"]})
    bad = np.flatnonzero(out["error"] != "")
    if len(bad):
        raise ValueError(f"{split} row {batch['key'][bad[0]]!r}: {out['error'][bad[0]]}; {_FIX[split]}")
    pixels = out["pixels"]
    if augment and shift > 0:
        pixels = shift_images(pixels, row_draws(seed, batch["epoch"], batch["index"]), shift)
    captions, labels = captions_for(batch, classes, templates, split)
    result = {"pixels": pixels, "caption": captions, "label": labels, "index": batch["index"].astype(np.int64)}
    if "weight" in batch:
        result["weight"] = batch["weight"].astype(np.float32)
    return result


def test_pair_stage(batch: dict, model: str, classes: tuple[str, ...], templates: tuple[str, ...]) -> dict:
    """The test split's stage: :func:`pair_stage` without augmentation, ``index`` the key hash (it splits evaluation)."""
    return pair_stage({**batch, "index": key_hash(batch["key"])}, model, classes, templates, augment=False, seed=0,
                      split="test")


def pair_losses(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Every pair's own term of open_clip's symmetric contrastive loss over its batch (``reduction="none"``).

    Row ``i``'s image against every caption, and its caption against every
    image, the pair itself the positive; their mean equals
    ``open_clip.ClipLoss()(image_features, text_features, logit_scale)``.
    """
    logits_per_image, logits_per_text = open_clip.ClipLoss().get_logits(image_features, text_features, logit_scale)
    labels = torch.arange(len(image_features), device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels, reduction="none")
            + F.cross_entropy(logits_per_text, labels, reduction="none")) / 2


def clip_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as open_clip's trainer sets it up: weight decay on matrices only (not gains, biases or the temperature)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr)


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep the temperature no lower than 1/100, as open_clip's trainer does after each step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


class ClipTask:
    """The worker side of the contrastive task, for :func:`pipeline.train.loop.train_loop_per_worker`.

    ``cfg`` is the loop's config: ``model`` (an open_clip config name), ``lr``,
    ``weight_decay``, ``warmup_steps``, ``seed``, ``threads``, ``classes`` and
    ``templates`` (for zero-shot accuracy; may be empty).
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.classes = tuple(cfg.get("class_names") or ())
        self.templates = tuple(cfg.get("templates") or DEFAULT_TEMPLATES)
        self.device = torch.device("cpu")  # the model's, once :meth:`setup` has placed it

    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The seeded open_clip model (random init, train mode) and its AdamW; sets the tokenizer and pixel statistics."""
        torch.manual_seed(self.cfg["seed"])
        torch.set_num_threads(self.cfg["threads"])
        model, _, self.tokenizer = load_clip(self.cfg["model"])
        preprocess = model.visual.preprocess_cfg
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1)
        return model.train(), clip_optimizer(model, self.cfg["lr"], self.cfg["weight_decay"])

    def setup(self, total_steps: int):
        """:meth:`build`, the model prepared for DDP (:func:`~pipeline.train.loop.prepare_ddp`), and the warm-up + cosine schedule."""
        from pipeline.train.loop import cosine_lr, prepare_ddp

        model, opt = self.build()
        model = prepare_ddp(model)  # on the worker's GPU, where it has one
        self.device = next(model.parameters()).device
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total_steps, self.cfg["warmup_steps"]))
        return model, opt, sched

    def tokens(self, captions) -> torch.Tensor:
        """Token ids [n, context] of ``captions``, each distinct caption of the call tokenised once.

        Nothing is kept across calls: web captions are mostly distinct, so a
        cache would grow with the dataset.
        """
        return tokenize_distinct(self.tokenizer, captions)

    def batches(self, shard, batch_size: int, shuffle: dict):
        """The shard's rows as training batches: normalised ``x``, ``tokens``, ``index``, ``weight``.

        A last batch of fewer than half ``batch_size`` rows joins the one before: a pair's contrastive loss
        falls with the batch (exactly 0 in a batch of one), and the pruner would take a short batch's pairs
        for well learned.
        """
        from pipeline.train.loop import exact_batches

        for b in exact_batches(shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                                  **shuffle), batch_size, min_last=batch_size // 2):
            pixels = normalize_pixels(torch.from_numpy(np.ascontiguousarray(b["pixels"])), self.mean, self.std)
            yield {"x": pixels.to(self.device), "tokens": self.tokens(list(b["caption"])).to(self.device),
                   "index": torch.from_numpy(b["index"]), "weight": torch.from_numpy(b["weight"]).to(self.device)}

    def step(self, model, batch: dict, weight_mean: float, opt, sched) -> torch.Tensor:
        """One optimiser step on a batch of the plan; returns every pair's loss (detached).

        Probes (weight 0) are embedded by the bare model without gradient and
        stay in the batch as negatives of the others and with their own term,
        which the step weights by 0. An all-probe batch still steps (every DDP
        rank must).
        """
        from pipeline.train.loop import take_step, unwrap

        x, tokens, w = batch["x"], batch["tokens"], batch["weight"]
        probe = w == 0
        if not probe.any() or probe.all():
            img, txt, scale = model(x, tokens)
            per_sample = pair_losses(img, txt, scale)
        else:
            trained, probes = (~probe).nonzero(as_tuple=True)[0], probe.nonzero(as_tuple=True)[0]
            img_t, txt_t, scale = model(x[trained], tokens[trained])
            bare = unwrap(model)
            bare.eval()
            with torch.no_grad():
                img_p, txt_p = bare.encode_image(x[probes], normalize=True), bare.encode_text(tokens[probes], normalize=True)
            bare.train()
            order = torch.cat([trained, probes])
            losses = pair_losses(torch.cat([img_t, img_p]), torch.cat([txt_t, txt_p]), scale)
            per_sample = losses.new_empty(len(w)).index_copy(0, order, losses)
        take_step(step_loss(per_sample, w, weight_mean), opt, sched)
        clamp_logit_scale(unwrap(model))
        return per_sample.detach()

    def evaluate(self, model, shard, cache, batch_size: int, rank: int, world: int) -> tuple[dict, list]:
        """Retrieval recall and, with class names and labels, zero-shot accuracy on the test split.

        Each worker embeds its part of the split (by key hash, as the
        classifier's evaluation splits it); rank 0 gathers the embeddings and
        computes the figures over the whole split (:func:`retrieval_metrics`),
        and every rank returns them. Call on every rank with the bare model;
        every rank embeds with rank 0's buffers (:func:`~pipeline.train.loop.broadcast_buffers`).
        """
        from pipeline.train.loop import broadcast_buffers

        broadcast_buffers(model)
        if cache is None:
            cache = []
            for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                mine = b["index"] % world == rank
                cache.append((torch.from_numpy(np.ascontiguousarray(b["pixels"][mine])),
                              list(b["caption"][mine]), b["label"][mine], b["index"][mine]))
        model.eval()
        with torch.inference_mode():
            images = [F.normalize(model.encode_image(normalize_pixels(x, self.mean, self.std).to(self.device)),
                                  dim=-1).cpu() for x, _, _, _ in cache if len(x)]
        part = (torch.cat(images).numpy() if images else np.zeros((0, 0), np.float32),
                [c for _, caps, _, _ in cache for c in caps],
                np.concatenate([y for _, _, y, _ in cache]) if cache else np.zeros(0, np.int64),
                np.concatenate([h for _, _, _, h in cache]) if cache else np.zeros(0, np.int64))
        parts = [part]
        if dist.is_available() and dist.is_initialized() and world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, part)
        metrics = [None]
        if rank == 0:
            metrics[0] = self._metrics(model, parts)
        if dist.is_available() and dist.is_initialized() and world > 1:
            dist.broadcast_object_list(metrics, src=0)
        model.train()
        return metrics[0], cache

    def _metrics(self, model, parts) -> dict:
        parts = [p for p in parts if len(p[1])]
        if not parts:
            return {"test_rows": 0}
        order = np.argsort(np.concatenate([p[3] for p in parts]), kind="stable")  # key-hash order: any split alike
        captions = [c for p in parts for c in p[1]]
        return pair_metrics(model, self.tokenizer, torch.from_numpy(np.concatenate([p[0] for p in parts])[order]),
                            [captions[i] for i in order], torch.from_numpy(np.concatenate([p[2] for p in parts])[order]),
                            self.classes, self.templates)


def tokenize_distinct(tokenizer, captions) -> torch.Tensor:
    """``tokenizer(captions)`` with each distinct caption tokenised once (templated captions repeat a lot)."""
    distinct, index = np.unique(np.asarray(list(captions), dtype=object), return_inverse=True)
    return tokenizer(list(distinct))[torch.from_numpy(index.reshape(-1))]


@torch.inference_mode()
def pair_metrics(model, tokenizer, image_emb: torch.Tensor, captions: list[str], labels: torch.Tensor,
                 classes, templates) -> dict:
    """Test figures of a CLIP model from its normalised image embeddings and the rows' captions and labels.

    Recall (:func:`retrieval_metrics`) over the distinct captions, and
    zero-shot accuracy (the nearest class prompt ensemble) over the rows with
    a label among ``classes`` (None when there are none, or no class names).
    """
    device = next(model.parameters()).device  # the figures are computed on the CPU, beside ``image_emb``
    distinct = list(dict.fromkeys(captions))
    text_emb = torch.cat([F.normalize(model.encode_text(tokenizer(distinct[s:s + 1024]).to(device)), dim=-1).cpu()
                          for s in range(0, len(distinct), 1024)])
    where = {c: i for i, c in enumerate(distinct)}
    metrics = retrieval_metrics(image_emb, text_emb, torch.tensor([where[c] for c in captions]))
    known = (labels >= 0) & (labels < len(classes))
    accuracy = None
    if len(classes) >= 2 and bool(known.any()):
        class_emb = class_text_embeddings(model, tokenizer, list(classes), list(templates), device).cpu()
        accuracy = float(((image_emb[known] @ class_emb.T).argmax(1) == labels[known]).float().mean())
    return {"test_accuracy": accuracy, "zero_shot_accuracy": accuracy, "zero_shot_rows": int(known.sum()),
            "test_rows": len(captions), **metrics}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_of: torch.Tensor,
                      ks: tuple[int, ...] = RECALL_AT, chunk: int = 1024) -> dict:
    """Image-to-text and text-to-image recall@k, with captions compared as text.

    ``text_emb`` holds one embedding per *distinct* caption and
    ``caption_of[i]`` is image ``i``'s caption among them, so a caption that
    several images share (templated captions) is one candidate, not several
    indistinguishable ones. Image-to-text: an image's hit is its caption among
    the ``k`` nearest distinct captions. Text-to-image: each distinct caption
    queries the images; a hit is any of the ``k`` nearest images carrying it.
    With unique captions both are the usual recall@k.
    """
    n, m = len(image_emb), len(text_emb)
    i2t = {k: 0 for k in ks}
    for s in range(0, n, chunk):
        top = (image_emb[s:s + chunk] @ text_emb.T).topk(min(max(ks), m), dim=1).indices
        hit = top == caption_of[s:s + chunk, None]
        for k in ks:
            i2t[k] += int(hit[:, :k].any(1).sum())
    t2i = {k: 0 for k in ks}
    for s in range(0, m, chunk):
        top = (text_emb[s:s + chunk] @ image_emb.T).topk(min(max(ks), n), dim=1).indices
        hit = caption_of[top] == torch.arange(s, min(s + chunk, m))[:, None]
        for k in ks:
            t2i[k] += int(hit[:, :k].any(1).sum())
    return {**{f"i2t_recall@{k}": i2t[k] / n for k in ks}, **{f"t2i_recall@{k}": t2i[k] / m for k in ks},
            "test_captions": m}
