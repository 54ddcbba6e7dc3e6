"""The train loop's step on a plan's batch, without Ray: weights, probes, the epoch's batch size;
and the training stages' per-sample augmentation."""

from __future__ import annotations

import copy
import io
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.train.loop import ClassifyTask, PhaseClock, epoch_batch_size, exact_batches, weighted_step
from pipeline.train.models import build_model
from pipeline.train.stages import MEAN, STD, decode_stage, row_draws, shift_images


def _setup(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet", 10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_probes_get_their_loss_without_touching_the_gradient_or_batchnorm():
    torch.manual_seed(1)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    w = torch.tensor([1.5] * 8 + [0.0] * 4)  # the last four rows are probes
    model, opt, sched = _setup()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    probe_losses_before = F.cross_entropy(copy.deepcopy(model).eval()(x[8:]), y[8:], reduction="none")

    losses = weighted_step(model, {"x": x, "label": y, "weight": w}, weight_mean=1.0, opt=opt, sched=sched)
    assert model.training  # back in training mode after the probes' eval-mode forward

    # The twin takes the same step from the trained rows alone, normalised by the whole batch.
    trained = F.cross_entropy(twin(x[:8]), y[:8], reduction="none")
    twin_opt.zero_grad()
    ((trained * w[:8]).sum() / 12).backward()
    twin_opt.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b)  # parameters and BatchNorm statistics alike
    torch.testing.assert_close(losses[:8], trained.detach())
    # A probe's loss is the model's eval-mode loss, taken after the step.
    torch.testing.assert_close(losses[8:], F.cross_entropy(model.eval()(x[8:]), y[8:], reduction="none"))
    assert not torch.allclose(losses[8:], probe_losses_before)


def test_a_batch_of_probes_only_still_steps_with_zero_gradient():
    model, opt, sched = _setup()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    losses = weighted_step(model, {"x": x, "label": y, "weight": torch.zeros(4)}, 1.0, opt, sched)
    assert losses.shape == (4,) and sched.last_epoch == 1
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(value, before[name])  # no gradient: weights unchanged


def test_epoch_batch_size_keeps_the_unpruned_step_count():
    # 20,000 rows, 2 workers of 128: 79 steps an epoch.
    assert epoch_batch_size(20_000, 20_000, 128, 2, "full") == 128
    assert epoch_batch_size(12_000, 20_000, 128, 2, "full") == 76  # ceil(12000 / (2 * 79))
    # A plan takes an unpruned epoch's steps: a worker's share in batches of that size (a plan of a few
    # batches' rows takes fewer, never more; the loop's schedule then catches up after the epoch).
    for kept in (20_000, 19_998, 12_000, 9_876, 5_000, 3_000):
        assert -(-(kept // 2) // epoch_batch_size(kept, 20_000, 128, 2, "full")) == 79, kept
    for kept in (1_000, 158, 2):
        assert -(-(kept // 2) // epoch_batch_size(kept, 20_000, 128, 2, "full")) <= 79, kept
    assert epoch_batch_size(12_000, 20_000, 128, 2, "batch") == 128
    assert epoch_batch_size(1, 20_000, 128, 2, "full") == 1


def _png_batch(n: int, epoch: int = 0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = []
    for pixels in rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8):
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        images.append(buf.getvalue())
    return {"image": np.array(images, dtype=object), "label": np.arange(n) % 10, "index": np.arange(100, 100 + n),
            "epoch": np.full(n, epoch)}


def _moves(plain: np.ndarray, shift: int = 2) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) that turns ``plain`` [H, W] (0 = black) into a candidate image."""
    h, w = plain.shape
    out = {}
    for flipped in (False, True):
        source = plain[:, ::-1] if flipped else plain
        for dy in range(-shift, shift + 1):
            for dx in range(-shift, shift + 1):
                moved = np.zeros_like(plain)
                moved[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                    source[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
                out[(dy, dx, flipped)] = moved
    return out


def test_each_row_is_augmented_by_a_move_of_its_own_whatever_batch_it_arrives_in():
    batch = _png_batch(300)
    plain = decode_stage(batch, augment=False, seed=0)["x"][:, 0] * STD + MEAN  # back to [0, 1], black 0
    augmented = decode_stage(batch, augment=True, seed=0)["x"][:, 0] * STD + MEAN
    seen = set()
    for i in range(len(plain)):
        matches = [m for m, img in _moves(plain[i]).items() if np.allclose(img, augmented[i], atol=1e-5)]
        assert len(matches) == 1  # a shift of at most 2 pixels, black fill, maybe mirrored: one move
        seen.add(matches[0])
    assert len(seen) == 50  # every move occurs: 25 shifts, each plain and mirrored

    # The same row decodes alike in another batch, at another position; another epoch or seed moves it anew.
    subset = {k: v[[250, 3, 17]] for k, v in batch.items()}
    again = decode_stage(subset, augment=True, seed=0)["x"][:, 0] * STD + MEAN
    np.testing.assert_array_equal(again, augmented[[250, 3, 17]])
    other_epoch = decode_stage(_png_batch(300, epoch=1), augment=True, seed=0)["x"][:, 0] * STD + MEAN
    other_seed = decode_stage(batch, augment=True, seed=1)["x"][:, 0] * STD + MEAN
    for other in (other_epoch, other_seed):
        assert 0.8 < np.mean([not np.array_equal(a, b) for a, b in zip(augmented, other)]) < 1.0


def test_row_draws_are_a_function_of_seed_epoch_and_index_alone():
    index = np.arange(20_000)
    draws = row_draws(7, 3, index)
    np.testing.assert_array_equal(draws[[5, 19_999]], row_draws(7, np.array([3, 3]), np.array([5, 19_999])))
    assert len(np.unique(draws)) == len(index)
    offsets = np.bincount((draws % np.uint64(5)).astype(int), minlength=5) / len(index)
    assert np.all(np.abs(offsets - 0.2) < 0.02)  # uniform over the five offsets


def test_shift_images_moves_every_channel_of_a_colour_image_alike():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(40, 3, 12, 10), dtype=np.uint8)  # no zero pixels: the fill shows
    moved = shift_images(images, row_draws(0, 0, np.arange(40)), shift=3)
    assert moved.dtype == np.uint8 and moved.shape == images.shape
    for img, out in zip(images, moved):
        candidates = [m for m in _moves(img[0], shift=3) if not m[2]]
        found = [m for m in candidates if np.array_equal(_moves(img[0], shift=3)[m], out[0])]
        assert len(found) == 1
        dy, dx, _ = found[0]
        for c in range(3):  # the other channels moved by the same (dy, dx)
            np.testing.assert_array_equal(_moves(img[c], shift=3)[(dy, dx, False)], out[c])


def test_phase_clock_sums_each_phase_over_its_entries():
    clock = PhaseClock()
    for _ in range(3):
        with clock("step"):
            time.sleep(0.01)
    with clock("input"):
        time.sleep(0.02)
    seconds = clock.seconds()
    assert set(seconds) == {"plan_seconds", "input_seconds", "step_seconds", "report_seconds"}
    assert 0.03 <= seconds["step_seconds"] < 0.5 and 0.02 <= seconds["input_seconds"] < 0.5
    assert seconds["plan_seconds"] == seconds["report_seconds"] == 0


@pytest.mark.parametrize("make", [torch.arange, np.arange])
def test_exact_batches_recut_any_stream_into_full_batches_in_order(make):
    sizes = [8, 6, 8, 2, 1, 13, 8, 0, 5]  # what a shuffle buffer can yield at block boundaries
    starts = np.cumsum([0, *sizes])
    stream = [{"index": make(a, b), "x": make(a, b) * 10} for a, b in zip(starts[:-1], starts[1:])]
    out = list(exact_batches(iter(stream), 8))
    assert [len(b["index"]) for b in out] == [8] * 6 + [3]  # ceil(51 / 8) batches, only the last short
    for key, scale in (("index", 1), ("x", 10)):
        assert list(np.concatenate([np.asarray(b[key]) for b in out])) == [scale * i for i in range(51)]
    assert list(exact_batches(iter([]), 8)) == []
    # With min_last (the contrastive task's half batch), a last batch shorter than it joins the one before.
    joined = list(exact_batches(iter(stream), 8, min_last=4))
    assert [len(b["index"]) for b in joined] == [8] * 5 + [11]
    assert list(np.concatenate([np.asarray(b["index"]) for b in joined])) == list(range(51))
    assert [len(b["index"]) for b in exact_batches(iter(stream), 8, min_last=3)] == [8] * 6 + [3]  # not shorter
    assert [len(b["index"]) for b in exact_batches(iter(stream[:1]), 8, min_last=4)] == [8]
    assert [len(b["index"]) for b in exact_batches(iter([{"index": make(0, 2)}]), 8, min_last=4)] == [2]  # alone


def test_equal_shards_in_other_block_layouts_give_every_rank_as_many_steps(ray_session):
    """Two ranks' shards of 40 rows each, cut into blocks differently, under a shuffle buffer the size of a batch:
    each gives ceil(40 / 8) batches, so DDP ranks take as many steps (ray-project/ray#66085)."""
    def shard(blocks):
        tables, start = [], 0
        for rows in blocks:
            ids = np.arange(start, start + rows)
            tables.append(pa.table({"x": ids.astype(np.float32), "label": ids % 3, "index": ids,
                                    "weight": np.ones(rows, np.float32)}))
            start += rows
        return ray_session.data.from_arrow(tables)

    shuffle = {"local_shuffle_buffer_size": 8, "local_shuffle_seed": 0}
    for blocks in ([30, 10], [20, 20], [3, 17, 9, 11]):
        batches = list(ClassifyTask({}).batches(shard(blocks), 8, shuffle))
        assert [len(b["index"]) for b in batches] == [8] * 5
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(40))



def test_a_run_resumed_into_its_own_folder_keeps_the_pruner_state_its_resume_checkpoint_names(tmp_path):
    # The resume source (OUT/checkpoint) names OUT/pruner/epoch-0001; the resumed run, writing into OUT,
    # saves epochs 2 and 3, and Ray Train lets epoch 1's checkpoint go: its state must stay while
    # OUT/checkpoint is the only way back should the resumed run die.
    from pipeline import storage
    from pipeline.train.loop import _drop_old_pruner_state, pruner_state_url

    out = str(tmp_path / "run")
    for epoch in (1, 2, 3):
        storage.write_bytes(b"state", storage.join(pruner_state_url(out, epoch), "part-00000.npz"))
    history = [{"epoch": e, "checkpoint": e >= 1} for e in range(4)]
    _drop_old_pruner_state(out, history, keep=pruner_state_url(out, 1))
    assert storage.exists(pruner_state_url(out, 1))
    _drop_old_pruner_state(out, history)  # not a resume source: Ray Train let it go, so it goes too
    assert not storage.exists(pruner_state_url(out, 1)) and storage.exists(pruner_state_url(out, 2))
