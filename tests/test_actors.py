"""The pruning actor on a real local Ray: named lookup, loss delivery, shared plans, restarts."""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from pipeline.prune.pruner import Pruner

N, EPOCHS = 4000, 6
ARGS = dict(policy="mmdp", keep_ratio=0.5, epochs=EPOCHS, seed=3,
            consistency=np.random.default_rng(0).random(N))


def plan(ray, actor, epoch):
    """(kept, weights) of ``epoch``, read from the object store as workers do."""
    [ref] = ray.get(actor.plan_ref.remote(epoch))
    return ray.get(ref)


@pytest.fixture
def pruner(ray_local):
    from pipeline.prune.actor import actor_name, create_pruner

    name = actor_name(uuid.uuid4().hex[:8])
    actor = create_pruner(name, N, **ARGS)
    yield name, actor
    ray_local.kill(actor)


def test_workers_find_the_named_actor_and_deliver_every_loss_exactly_once(ray_local, pruner):
    name, actor = pruner
    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker(name: str, part: int, parts: int, epoch: int) -> int:
        """A training worker: finds the actor by name, reads the plan, reports its share."""
        from pipeline.prune.actor import LossReporter, get_pruner

        actor = get_pruner(name)
        plan_epoch, [ref] = ray.get(actor.published_plan.remote())
        assert plan_epoch == epoch
        kept, _ = ray.get(ref)
        mine = kept[part::parts]
        reporter = LossReporter(actor, max_in_flight=2, chunk_size=50)
        for start in range(0, len(mine), 32):  # batches of 32; loss = a function of the index
            batch = mine[start:start + 32]
            reporter.report(batch, (batch % 97).astype(np.float32) + epoch)
        return reporter.flush()

    local = Pruner(N, **ARGS)
    for epoch in range(2):
        assert ray.get(actor.start_epoch.remote(epoch)) == local.kept_count(epoch)
        sent = ray.get([worker.remote(name, part, 3, epoch) for part in range(3)])
        kept, _ = local.plan(epoch)
        assert sum(sent) == len(kept)
        summary = ray.get(actor.epoch_summary.remote(epoch))
        assert summary["plan_losses_received"] == summary["plan_kept"] == len(kept)
        assert summary["plan_missing"] == 0
        local.update(kept, (kept % 97).astype(np.float32) + epoch, epoch)
    state = ray.get(actor.state_dict.remote())
    np.testing.assert_array_equal(state["loss"], local.state_dict()["loss"])
    np.testing.assert_array_equal(state["last_seen"], local.state_dict()["last_seen"])


def test_plan_ref_equals_the_plain_pruner_plan_and_is_shared(ray_local, pruner):
    _, actor = pruner
    local = Pruner(N, **ARGS)
    [ref] = ray_local.get(actor.plan_ref.remote(0))
    [again] = ray_local.get(actor.plan_ref.remote(0))
    assert isinstance(ref, ray_local.ObjectRef) and ref == again  # one object, not a copy per call
    kept, weights = ray_local.get(ref)
    np.testing.assert_array_equal(kept, local.plan(0)[0])
    np.testing.assert_array_equal(weights, local.plan(0)[1])
    kept_count, weight_mean = ray_local.get(actor.plan_size.remote(0))
    assert kept_count == len(kept) and weight_mean == pytest.approx(float(weights.mean(dtype=np.float64)))


def test_plan_lookups_answer_while_losses_queue(ray_local, pruner):
    _, actor = pruner
    assert ray_local.get(actor.published_plan.remote()) is None  # no epoch started yet
    ray_local.get(actor.start_epoch.remote(0))
    [ref] = ray_local.get(actor.plan_ref.remote(0))
    # Loss ingest runs one call at a time: four calls of 2M losses queue up before the look-up.
    many = np.tile(np.arange(N), 500)
    updates = [actor.update.remote(many, np.ones(len(many), np.float32), 0) for _ in range(4)]
    lookup = actor.published_plan.remote()
    ready, _ = ray_local.wait([updates[-1], lookup], num_returns=1)
    assert ready == [lookup]  # answered beside the queue, not behind it
    assert ray_local.get(lookup) == (0, [ref])
    assert ray_local.get(updates) == [len(many)] * 4
    # A loaded state unpublishes the plan (it came from the old state); the stage then asks current_plan.
    ray_local.get(actor.load_state_dict.remote(ray_local.get(actor.state_dict.remote())))
    assert ray_local.get(actor.published_plan.remote()) is None
    epoch, [again] = ray_local.get(actor.current_plan.remote())
    assert epoch == 0 and ray_local.get(actor.published_plan.remote()) == (0, [again])


def test_create_pruner_with_the_same_name_returns_the_running_actor(ray_local, pruner):
    from pipeline.prune.actor import create_pruner, get_pruner

    name, actor = pruner
    ray_local.get(actor.update.remote(np.array([1, 2]), np.array([0.5, 0.5]), 0))
    twin = create_pruner(name, N, **ARGS)
    assert ray_local.get(twin.losses_received.remote(0)) == 2
    assert ray_local.get(get_pruner(name).losses_received.remote(0)) == 2
    with pytest.raises(ValueError):
        get_pruner(name + "-missing", timeout_s=0.5)


def test_reporter_surfaces_actor_errors_at_flush(ray_local, pruner):
    from pipeline.prune.actor import LossReporter

    _, actor = pruner
    reporter = LossReporter(actor, chunk_size=1)
    reporter.report(np.array([N + 5]), np.array([1.0]))
    with pytest.raises(ray_local.exceptions.RayTaskError, match="indices must lie in"):
        reporter.flush()


def test_a_killed_actor_restarts_and_reloads_its_checkpoint_to_the_same_plans(ray_local, pruner):
    _, actor = pruner

    def run(epochs):
        plans = []
        for epoch in epochs:
            kept, weights = plan(ray_local, actor, epoch)
            ray_local.get(actor.update.remote(kept, np.sqrt(kept.astype(np.float32)), epoch))
            plans.append((kept, weights))
        return plans

    run(range(2))
    checkpoint = ray_local.get(actor.state_dict.remote())  # end of epoch 1
    expected = run(range(2, 4))
    ray_local.kill(actor, no_restart=False)  # Ray restarts it with its creation arguments
    # ray.kill is asynchronous: a call sent right after it may still reach the old
    # instance, so poll until the restarted one answers (or the deadline passes).
    deadline = time.monotonic() + 30
    info = {"reconstructed": False}
    while not info["reconstructed"] and time.monotonic() < deadline:
        try:
            info = ray_local.get(actor.info.remote())
        except ray_local.exceptions.RayActorError:
            pass
        if not info["reconstructed"]:
            time.sleep(0.2)
    assert info["reconstructed"] and info["current_epoch"] == 0
    ray_local.get(actor.load_state_dict.remote(checkpoint))
    for (kept, weights), (again, again_weights) in zip(expected, run(range(2, 4))):
        np.testing.assert_array_equal(again, kept)
        np.testing.assert_array_equal(again_weights, weights)


def test_a_retry_before_the_first_checkpoint_drops_a_restarted_actors_later_epoch_losses(ray_local, pruner):
    # An actor that Ray restarted mid-run holds no epoch-0 losses but may hold later ones (reports
    # retried on it); the retried run, which has no checkpoint, starts it afresh and counts a restart.
    from pipeline.train.loop import start_afresh

    _, actor = pruner
    assert start_afresh(actor) == 0  # a fresh actor: nothing to undo
    fresh = plan(ray_local, actor, 0)
    kept, _ = plan(ray_local, actor, 1)
    ray_local.get(actor.update.remote(kept, np.sqrt(kept.astype(np.float32)), 1))
    assert ray_local.get(actor.losses_received.remote(0)) == 0
    assert ray_local.get(actor.losses_received.remote()) == len(kept)
    assert start_afresh(actor) == 1
    assert ray_local.get(actor.losses_received.remote()) == 0
    again = plan(ray_local, actor, 0)
    np.testing.assert_array_equal(again[0], fresh[0])
    np.testing.assert_array_equal(again[1], fresh[1])
    assert start_afresh(actor) == 0  # nothing to undo
    # Restarted by Ray and still empty: another incarnation than the workers were handed, made the one to take.
    ray_local.kill(actor, no_restart=False)
    deadline, info = time.monotonic() + 30, {"reconstructed": False}
    while not info["reconstructed"] and time.monotonic() < deadline:
        try:
            info = ray_local.get(actor.info.remote())
        except ray_local.exceptions.RayActorError:
            pass
        time.sleep(0.2)
    assert info["reconstructed"] and info["restored_incarnation"] is None
    assert start_afresh(actor) == 1
    assert ray_local.get(actor.info.remote())["restored_incarnation"] == info["incarnation"]


def test_a_reporter_takes_the_losses_of_a_model_cast_to_bfloat16(ray_local, pruner):
    import torch

    from pipeline.prune.actor import LossReporter

    _, actor = pruner
    kept, _ = plan(ray_local, actor, 0)
    reporter = LossReporter(actor)
    reporter.report(torch.from_numpy(kept[:3]), torch.tensor([0.5, 0.25, 2.0], dtype=torch.bfloat16))
    assert reporter.flush() == 3 and ray_local.get(actor.losses_received.remote(0)) == 3


def test_an_epoch_past_the_run_the_pruner_plans_for_is_refused(ray_local, pruner):
    # A loop of more epochs than the pruner was made for (from_scores' default 20) planned them with another
    # run's schedule: annealing at the wrong epochs, the remaining share past its end.
    _, actor = pruner
    with pytest.raises(ValueError, match=f"epoch {EPOCHS}: the pruner plans a run of {EPOCHS} epochs"):
        ray_local.get(actor.start_epoch.remote(EPOCHS))
    assert ray_local.get(actor.start_epoch.remote(EPOCHS - 1)) > 0


def test_plan_log_records_each_epoch_and_its_kept_samples(ray_local, pruner):
    _, actor = pruner
    for epoch in range(2):
        ray_local.get(actor.start_epoch.remote(epoch))
    log = ray_local.get(actor.plan_log.remote(include_indices=True))
    assert ray_local.get(actor.plan_log.remote(include_indices=True, epoch=1)) == log[1:]
    assert ray_local.get(actor.plan_log.remote(epoch=5)) == []
    local = Pruner(N, **ARGS)
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert log[0]["kept_indices"] == local.plan(0)[0].tolist()
    assert log[0]["kept"] == N - 0.2 * N and log[0]["weight_sum"] == pytest.approx(N - 0.2 * N)
    # Every pruned sample has a reason; at epoch 0 (no loss yet) mmdp excludes its noise
    # share and trains on every other sample.
    for entry in log:
        assert sum(entry["pruned_by_reason"].values()) == N - entry["kept"]
    assert log[0]["pruned_by_reason"] == {"low consistency": 800, "well learned (low loss)": 0}
