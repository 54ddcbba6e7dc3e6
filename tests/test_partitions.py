"""The partitioned pruner on a real local Ray: several partition actors plan exactly like one pruner."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

N, EPOCHS = 1000, 8
BOUNDS = [0, 123, 700, N]  # three partition actors, uneven ranges
CONSISTENCY = np.random.default_rng(0).normal(0.25, 0.05, N)


def start(ray, policy, **partitioning):
    from pipeline.prune.actor import actor_name, create_pruner

    if policy == "trajectory":
        partitioning["reference"] = np.arange(5, N, 50)  # in every partition but the first's short range too
    return create_pruner(actor_name(uuid.uuid4().hex[:8]), N, policy=policy, keep_ratio=0.4, epochs=EPOCHS,
                         seed=7, consistency=CONSISTENCY, **partitioning)


def plan(ray, actor, epoch):
    """(kept, weights) of ``epoch``, read from the object store as workers do."""
    [ref] = ray.get(actor.plan_ref.remote(epoch))
    return ray.get(ref)


@pytest.mark.parametrize("policy", ["mmdp", "infobatch", "random", "clip_filter", "full", "trajectory"])
def test_partition_actors_give_the_single_actor_plans_with_updates(ray_local, policy):
    from pipeline.prune.actor import LossReporter

    single, split = start(ray_local, policy), start(ray_local, policy, bounds=BOUNDS)
    try:
        assert ray_local.get(split.info.remote())["partitions"] == 3
        assert ray_local.get(single.info.remote())["partitions"] == 1
        # Reporters send a split pruner's losses straight to the partition actors, not through it.
        assert ray_local.get(single.routes.remote()) is None
        bounds, parts = ray_local.get(split.routes.remote())
        assert bounds == BOUNDS and len(parts) == 3
        rng = np.random.default_rng(1)
        for epoch in [0, 1, 2, 3, 4, EPOCHS - 1]:  # the last one anneals
            plans = []
            for actor in (single, split):
                ray_local.get(actor.start_epoch.remote(epoch))
                plans.append(plan(ray_local, actor, epoch))
            (k1, w1), (k2, w2) = plans
            np.testing.assert_array_equal(k1, k2)
            np.testing.assert_array_equal(w1, w2)
            # Losses that depend on the sample (some hard, most learned), sent as workers do.
            losses = (np.sin(k1 * 0.37) ** 2 * 3 + rng.exponential(0.2, len(k1))).astype(np.float32)
            order = rng.permutation(len(k1))
            for actor in (single, split):
                reporter = LossReporter(actor, max_in_flight=2, chunk_size=97)
                for part in np.array_split(order, 9):
                    reporter.report(k1[part], losses[part], epoch)
                assert reporter.flush() == len(k1)
            s1, s2 = (ray_local.get(a.epoch_summary.remote(epoch)) for a in (single, split))
            assert s1 == s2 and s2["plan_missing"] == 0 and s2["plan_outside_plan"] == 0
            direct = [ray_local.get(p.direct_received.remote()).get(epoch, 0) for p in parts]
            assert sum(direct) == len(k1) and all(direct)  # every loss went to its partition directly
        log1, log2 = (ray_local.get(a.plan_log.remote()) for a in (single, split))
        assert log1 == log2
        for entry in log2:
            assert sum(entry["pruned_by_reason"].values()) == N - entry["kept"]
        st1, st2 = (ray_local.get(a.state_dict.remote()) for a in (single, split))
        for key in ("loss", "last_seen", "consistency", "received_epochs", "received_counts") + (
                ("history", "history_slot_epoch") if policy == "trajectory" else ()):
            np.testing.assert_array_equal(st1[key], st2[key])
    finally:
        ray_local.kill(single)
        ray_local.kill(split)


def test_a_split_pruner_needs_each_report_epoch(ray_local):
    from pipeline.prune.actor import LossReporter

    split = start(ray_local, "random", bounds=BOUNDS)
    try:
        reporter = LossReporter(split, chunk_size=1)
        with pytest.raises(ValueError, match="with their epoch"):
            reporter.report(np.array([3]), np.array([0.5]))
        with pytest.raises(IndexError, match="must lie in"):  # checked before it is sent
            reporter.report(np.array([N]), np.array([0.5]), epoch=0)
        with pytest.raises(TypeError, match="must be integers"):  # not rounded to another sample's
            reporter.report(np.array([3.0], np.float32), np.array([0.5]), epoch=0)
    finally:
        ray_local.kill(split)


def test_a_partitioned_checkpoint_restores_into_one_pruner_and_back(ray_local):
    from pipeline.prune.pruner import Pruner

    split = start(ray_local, "mmdp", num_partitions=4)
    try:
        assert ray_local.get(split.info.remote())["partitions"] == 4
        for epoch in range(3):
            kept, _ = plan(ray_local, split, epoch)
            ray_local.get(split.update.remote(kept, np.cos(kept * 0.1).astype(np.float32) + 1, epoch))
        state = ray_local.get(split.state_dict.remote())
        local = Pruner(N, "mmdp", keep_ratio=0.4, epochs=EPOCHS, seed=7, consistency=CONSISTENCY)
        local.load_state_dict(state)
        np.testing.assert_array_equal(plan(ray_local, split, 3)[0], local.plan(3)[0])
        ray_local.get(split.load_state_dict.remote(local.state_dict()))  # and back into partitions
        assert ray_local.get(split.losses_received.remote(2)) == local.losses_received(2)
    finally:
        ray_local.kill(split)


@pytest.mark.parametrize("policy", ["mmdp", "trajectory"])
def test_partition_actors_save_their_own_parts_and_a_saved_state_loads_into_any_layout(ray_local, policy, tmp_path):
    from pipeline.prune.actor import LossReporter

    split, single = start(ray_local, policy, bounds=BOUNDS), start(ray_local, policy)
    try:
        reporter = LossReporter(split)  # losses straight to the partitions (their counts are saved too)
        for epoch in range(3):
            ray_local.get(split.start_epoch.remote(epoch))
            kept, _ = plan(ray_local, split, epoch)
            reporter.report(kept, np.cos(kept * 0.1).astype(np.float32) + 1, epoch)
            reporter.flush()
        url = str(tmp_path / "state")
        ray_local.get(split.save_state.remote(url))
        # One file a partition actor, each written by it: sized by its own range, not the whole state.
        sizes = [(tmp_path / "state" / f"part-{i:05d}.npz").stat().st_size for i in range(3)]
        per_sample = sizes[1] / (BOUNDS[2] - BOUNDS[1])  # 12 B (+ the loss history for trajectory) and headers
        assert per_sample >= 12 and np.allclose(sizes, per_sample * np.diff(BOUNDS), atol=2048)
        ray_local.get(single.load_state.remote(url))  # three saved parts into one actor
        assert ray_local.get(single.losses_received.remote(2)) == ray_local.get(split.losses_received.remote(2))
        url_single = str(tmp_path / "single")
        ray_local.get(single.save_state.remote(url_single))
        other = start(ray_local, policy, num_partitions=2)  # one saved part into two partition actors
        try:
            ray_local.get(other.load_state.remote(url_single))
            for epoch in range(3, 5):
                plans = []
                for actor in (split, single, other):
                    ray_local.get(actor.start_epoch.remote(epoch))
                    plans.append(plan(ray_local, actor, epoch))
                for k, w in plans[1:]:
                    np.testing.assert_array_equal(plans[0][0], k)
                    np.testing.assert_array_equal(plans[0][1], w)
        finally:
            ray_local.kill(other)
    finally:
        ray_local.kill(split)
        ray_local.kill(single)


def test_a_restarted_partition_actor_of_a_trajectory_run_loads_its_history_back(ray_local, tmp_path):
    # A partition actor that Ray restarts comes back as it started: for a policy that reads loss
    # trajectories that start holds the (empty) history and the range's reference samples, so a
    # saved state loads back into it and plans as before the crash.
    import time

    from pipeline.prune.actor import LossReporter

    split, single = start(ray_local, "trajectory", bounds=BOUNDS), start(ray_local, "trajectory")
    try:
        for epoch in range(3):  # three epochs of losses: epoch 3 ranks by trajectories
            for actor in (split, single):
                ray_local.get(actor.start_epoch.remote(epoch))
                kept, _ = plan(ray_local, actor, epoch)
                reporter = LossReporter(actor)
                reporter.report(kept, (np.cos(kept * 0.1) + 1 + 0.1 * epoch).astype(np.float32), epoch)
                reporter.flush()
        url = str(tmp_path / "state")
        ray_local.get(split.save_state.remote(url))
        _, parts = ray_local.get(split.routes.remote())
        _, first = ray_local.get(parts[1].incarnation.remote())
        ray_local.kill(parts[1], no_restart=False)  # Ray restarts it with its creation arguments
        deadline, again = time.monotonic() + 30, first
        while again == first and time.monotonic() < deadline:
            try:
                _, again = ray_local.get(parts[1].incarnation.remote())
            except ray_local.exceptions.RayActorError:
                time.sleep(0.2)
        assert again != first
        assert ray_local.get(split.info.remote())["reconstructed"]
        ray_local.get(split.load_state.remote(url))
        for epoch in (3, 4):
            plans = []
            for actor in (split, single):
                ray_local.get(actor.start_epoch.remote(epoch))
                plans.append(plan(ray_local, actor, epoch))
            np.testing.assert_array_equal(plans[0][0], plans[1][0])
            np.testing.assert_array_equal(plans[0][1], plans[1][1])
        st_split, st_single = (ray_local.get(a.state_dict.remote()) for a in (split, single))
        np.testing.assert_array_equal(st_split["history"], st_single["history"])
    finally:
        ray_local.kill(split)
        ray_local.kill(single)
