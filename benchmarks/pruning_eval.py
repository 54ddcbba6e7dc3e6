"""The pruning benchmark's evaluations: the clean oracle's scores, the shifted test copy, the final plan's noise.

No training here: everything reads what a run or the score job wrote.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import reference
from pipeline.data.contract import KEY

ORACLE_REASON = "oracle: excluded (noisy in ground truth)"
# The shifted test copy is a pure function of the test images and this seed.
SHIFT_SEED = 20240
SHIFT = {"rotate_deg": 12.0, "shift_px": 2, "blur_radius": (0.4, 1.0), "noise_std": 20.0}


# The trajectory policy's known-clean reference set, as a share of the pool (AlignPrune's ~1%).
REFERENCE_FRACTION = 0.01


def _corruption(data: str) -> pa.Table:
    """Each train row's key and what the dataset job did to it (its ground truth)."""
    return storage.read_table(storage.join(data, "ground_truth.parquet"), columns=[KEY, "corruption"])


def noisy_keys(data: str) -> pa.ChunkedArray:
    """Keys of the train rows the dataset job corrupted (its ground truth)."""
    gt = _corruption(data)
    return gt.filter(pc.not_equal(gt.column("corruption"), "none")).column(KEY)


def write_reference_keys(data: str, url: str, seed: int, fraction: float = REFERENCE_FRACTION) -> int:
    """A text file of ``fraction`` of the pool's keys drawn from its clean rows (the ground truth): the
    known-clean reference set the ``trajectory`` policy compares loss trajectories with. Returns its size."""
    gt = _corruption(data)
    clean = gt.filter(pc.equal(gt.column("corruption"), "none")).column(KEY).to_pylist()
    count = max(2, int(round(fraction * gt.num_rows)))
    keys = sorted(np.random.default_rng([seed, 0x7E7]).choice(clean, size=min(count, len(clean)), replace=False))
    storage.write_bytes(("\n".join(keys) + "\n").encode(), url)
    return len(keys)


def write_oracle_scores(data: str, scores: str, url: str) -> int:
    """A copy of ``scores`` where rows noisy in the ground truth are rejected; returns the clean count.

    Rejected rows go to ``rejects/`` and the trainer reads ``scores/``
    only, so the oracle needs no code path of its own: policy ``full`` on this
    folder trains on the clean rows. The score job's own rejects are copied
    too, so the copy accounts for every row of the split, as training checks.
    """
    from pipeline.score.commit import write_scores

    scored, rejects = (storage.read_table(storage.join(scores, folder)) for folder in ("scores", "rejects"))
    n = rejects.num_rows
    table = pa.concat_tables([scored, pa.table({
        KEY: rejects.column(KEY), "index": pa.nulls(n, pa.int64()), "clip_score": pa.nulls(n, pa.float32()),
        "clip_margin": pa.nulls(n, pa.float32()), "status": pa.array(["rejected"] * n, pa.string()),
        "error": rejects.column("reason")}, schema=scored.schema)])
    status = table.column("status").to_numpy(zero_copy_only=False).astype(object)
    error = table.column("error").to_numpy(zero_copy_only=False).astype(object)
    excluded = pc.is_in(table.column(KEY), value_set=noisy_keys(data)).to_numpy(zero_copy_only=False) & (status == "ok")
    status[excluded], error[excluded] = "rejected", ORACLE_REASON
    for name, values in (("status", status), ("error", error)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    with storage.output(url):
        summary = write_scores(table, url, oracle_excluded=int(excluded.sum()))
        storage.write_json({"derived_from": scores, "ground_truth": storage.join(data, "ground_truth.parquet")},
                           storage.join(url, "config.json"))
    return summary["scored"]


# ---------------------------------------------------------------- evaluation


def shift_image(png: bytes, rng: np.random.Generator) -> bytes:
    """A deterministic out-of-distribution copy of one image: rotation, shift, blur, Gaussian noise."""
    from PIL import Image, ImageFilter

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("L").resize((28, 28))
    dx, dy = (int(v) for v in rng.integers(-SHIFT["shift_px"], SHIFT["shift_px"] + 1, 2))
    angle = float(rng.uniform(-1, 1) * SHIFT["rotate_deg"])
    im = im.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=0)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*SHIFT["blur_radius"]))))
    pixels = np.asarray(im, np.float32) + rng.normal(0.0, SHIFT["noise_std"], (28, 28))
    return reference.encode_png(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=2)  # one dataset at a time: its clean and shifted copies
def test_inputs(data: str, shifted: bool) -> tuple:
    """(x, labels) of the test split, normalised by the train pipeline's own decode stage."""
    from pipeline.train.stages import decode_stage

    table = storage.read_table(storage.join(data, "test"), columns=[KEY, "image", "label"]).sort_by(KEY)
    images = table.column("image").to_pylist()
    if shifted:
        images = [shift_image(b, np.random.default_rng([SHIFT_SEED, i])) for i, b in enumerate(images)]
    labels = table.column("label").to_numpy()
    batch = {"index": np.arange(len(labels)), "image": np.array(images, dtype=object), "label": labels}
    out = decode_stage(batch, augment=False, seed=0)
    return out["x"], out["label"]


def evaluate_checkpoint(run_dir: str, data: str, cfg) -> dict:
    """Accuracy of a run's final checkpoint on the clean and the shifted test split."""
    import torch

    from pipeline.train.loop import TRAIN_STATE
    from pipeline.train.models import build_model

    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "checkpoint", TRAIN_STATE))),
                       map_location="cpu", weights_only=True)
    num_classes = len(storage.read_json(storage.join(data, "metadata.json"))["classes"])
    model = build_model(cfg.model, num_classes, cfg.width or None)
    model.load_state_dict(state["model"])
    model.eval()
    out = {}
    for name, shifted in (("driver_test_accuracy", False), ("shifted_test_accuracy", True)):
        x, y = test_inputs(data, shifted)
        with torch.inference_mode():
            pred = torch.cat([model(torch.from_numpy(x[i:i + 1024])).argmax(1) for i in range(0, len(x), 1024)])
        out[name] = float((pred.numpy() == y).mean())
    return out


def final_plan_noise(run_dir: str, data: str, scores: str) -> float | None:
    """Share of the rows noisy in the ground truth among those the last epoch's plan trains on.

    The plan is replayed from the pruner state in the run's final checkpoint
    (a plan is a pure function of state, epoch and seed). That state already
    holds the last epoch's own losses, so for loss-driven policies this is
    the plan a next epoch at the same step would get: close to, not exactly,
    the last one trained on. Probed rows (weight 0) are not trained on. None
    when the pool has no noisy row.
    """
    from pipeline.prune.pruner import Pruner, read_saved, saved_reference
    from pipeline.train.loop import PRUNER_STATE
    from pipeline.train.pruning import load_index

    noisy = noisy_keys(data)
    if not len(noisy):
        return None
    url = storage.read_json(storage.join(run_dir, "checkpoint", PRUNER_STATE))["state"]
    keys, consistency, _ = load_index(scores, "auto")
    # The config names the constructor's arguments; a loss-trajectory policy's known-clean rows are saved too.
    pruner = Pruner(**read_saved(url)["config"], consistency=consistency, reference=saved_reference(url))
    pruner.load(url)
    kept, weights = pruner.plan(pruner.epochs - 1)
    trained = np.char.decode(keys[kept[weights > 0]], "utf-8")
    return float(pc.is_in(pa.array(trained), value_set=noisy).to_numpy(zero_copy_only=False).mean()) if len(trained) else 0.0
