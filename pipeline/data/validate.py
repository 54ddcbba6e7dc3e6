"""Row checks that run before decoding: every failed row carries a reason.

A stage in the datatrove sense: ``RowValidator(...)(batch) -> batch`` with an
``error`` column ("" for a good row), callable on a plain dict without Ray.
Duplicate keys are a property of the whole dataset, not of a batch, so they
are found after scoring, in the cluster (:mod:`pipeline.score.commit`).
"""

from __future__ import annotations

import numpy as np

from pipeline.data.contract import BAD_LABEL, CAPTION, IMAGE, KEY, LABEL, has_caption

MISSING_KEY = "missing key"
NOT_AN_INTEGER_LABEL = "label not an integer"
EMPTY_TEXT = "empty caption and no label"
MISSING_LABEL = "missing label (label mode)"
DUPLICATE_KEY = "duplicate key"


class RowValidator:
    """Flags rows that cannot be scored, and fills a caption from the label where empty.

    Args:
        mode: ``caption`` scores against the row's caption (a label prompt
            when the caption is empty); ``label`` scores against class prompts.
        classes: class names, indexed by label; needed to turn labels into text.
        template: how a label becomes a caption in caption mode.
    """

    def __init__(self, mode: str = "caption", classes: list[str] | None = None, template: str = "a photo of a {}."):
        if mode not in ("caption", "label"):
            raise ValueError(f"mode must be 'caption' or 'label', not {mode!r}")
        self.mode, self.classes, self.template = mode, list(classes or []), template

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[KEY])
        keys, captions = batch[KEY], batch.get(CAPTION, np.full(n, None, object))
        labels = batch.get(LABEL, np.full(n, None, object))
        images = batch.get(IMAGE, np.full(n, None, object))
        bad_labels = batch.get(BAD_LABEL, np.full(n, None, object))
        errors = np.full(n, "", dtype=object)
        texts = np.empty(n, dtype=object)
        for i in range(n):
            label = _as_label(labels[i])
            caption = captions[i] if has_caption(captions[i]) else None  # as training reads it
            errors[i] = self._check(keys[i], images[i], caption, label, bad_labels[i])
            texts[i] = caption or (self._prompt(label) if label is not None else "")
        out = {k: v for k, v in batch.items() if k != BAD_LABEL}  # now in the reasons
        out[CAPTION], out["error"] = texts, errors
        return out

    def _check(self, key, image, caption, label, bad_label=None) -> str:
        if key is None or key == "":
            return MISSING_KEY
        if image is None or len(image) == 0:
            return "empty image bytes"
        if isinstance(bad_label, str):  # the reader's text of a label that is not an integer (contract.BAD_LABEL)
            return f"{NOT_AN_INTEGER_LABEL}: {bad_label[:40]!r}"
        in_range = label is not None and 0 <= label < len(self.classes)
        if self.mode == "label":
            if label is None:
                return MISSING_LABEL
            if not in_range:
                return f"label {label} out of range for {len(self.classes)} classes"
        elif not caption:
            if label is None:
                return EMPTY_TEXT
            if not in_range:
                return f"empty caption and label {label} has no class name"
        return ""

    def _prompt(self, label: int) -> str:
        return self.template.format(self.classes[label]) if 0 <= label < len(self.classes) else ""


def _as_label(value) -> int | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return int(value)
