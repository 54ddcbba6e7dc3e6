"""The Pruner: dense per-sample state, loss ingest, plans, and checkpoint round trips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.prune.policies import POLICIES
from pipeline.prune.pruner import Pruner, read_saved, saved_reference
from pipeline.storage import InputError

N, EPOCHS = 3000, 8


def make(policy="mmdp", n=N, seed=0, **kwargs):
    cons = np.random.default_rng(42).normal(0.25, 0.05, n)  # cosine-similarity-like scale
    if policy == "trajectory":  # 1% known-clean reference samples
        kwargs.setdefault("reference", np.arange(7, n, 100))
    return Pruner(n, policy, keep_ratio=0.5, epochs=EPOCHS, seed=seed, consistency=cons, **kwargs)


def train(pruner, epochs, seed=0):
    """Simulates training: every kept sample reports one loss per epoch."""
    rng = np.random.default_rng(seed)
    plans = []
    for epoch in epochs:
        kept, weights = pruner.plan(epoch)
        plans.append((kept.copy(), weights.copy()))
        order = rng.permutation(len(kept))  # workers report in any order, in batches
        for chunk in np.array_split(kept[order], 7):
            pruner.update(chunk, rng.exponential(1.0, len(chunk)), epoch)
    return plans


def test_update_keeps_a_moving_average_and_counts_losses_per_epoch():
    p = make(loss_momentum=0.75)
    p.update(np.array([3, 5]), np.array([2.0, 4.0]), epoch=0)
    p.update(np.array([3]), np.array([6.0]), epoch=1)
    state = p.state_dict()
    np.testing.assert_allclose(state["loss"][[3, 5]], [0.75 * 2 + 0.25 * 6, 4.0])
    assert state["last_seen"][[3, 5, 4]].tolist() == [1, 0, -1]
    assert (p.losses_received(0), p.losses_received(1), p.losses_received(2)) == (2, 1, 0)
    p.update(np.array([5]), np.array([1.0]), epoch=0)  # a late report never rewinds last seen
    assert p.state_dict()["last_seen"][5] == 0 and p.losses_received(0) == 3


def test_infobatch_and_the_rules_inside_it_read_each_sample_s_latest_loss_as_published():
    """InfoBatch keeps a sample's last loss: a sample learned this epoch is well-learned now, not after the
    average forgets its first, high loss; mmdp's loss is the average by default."""
    for policy, latest in (("infobatch", True), ("infobatch_exact", True), ("trajectory", True), ("mmdp", False),
                           ("random", False)):
        p = make(policy)
        assert p.config["loss_momentum"] == (0.0 if latest else 0.5), policy
        p.update(np.arange(N), np.ones(N, np.float32), epoch=0)
        p.update(np.array([3]), np.array([10.0]), epoch=1)
        p.update(np.array([3]), np.array([0.1]), epoch=2)
        assert p.state_dict()["loss"][3] == pytest.approx(0.1 if latest else 0.5 * 0.5 * 1 + 0.25 * 10 + 0.5 * 0.1)
    # Half the samples hard last epoch and learned now: InfoBatch prunes among them (their average would
    # still be above the others' loss, and those would be pruned instead).
    p, half = make("infobatch"), np.arange(N // 2)
    p.update(np.arange(N), np.ones(N, np.float32), epoch=0)
    p.update(half, np.full(len(half), 10.0, np.float32), epoch=1)
    p.update(half, np.full(len(half), 0.1, np.float32), epoch=2)
    kept, _ = p.plan(3)
    pruned = np.setdiff1d(np.arange(N), kept)
    assert len(pruned) > 0 and np.isin(pruned, half).all()
    assert make("infobatch", loss_momentum=0.5).config["loss_momentum"] == 0.5  # still the caller's to set


def test_update_rejects_bad_input_with_a_clear_message():
    p = make()
    with pytest.raises(IndexError, match=r"\[0, 3000\)"):
        p.update(np.array([0, 3000]), np.ones(2))
    with pytest.raises(IndexError):
        p.update(np.array([-1]), np.ones(1))
    with pytest.raises(ValueError, match="1 of 2 losses are not finite"):
        p.update(np.array([1, 2]), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="must be equal"):
        p.update(np.array([1, 2]), np.ones(3))
    with pytest.raises(TypeError):
        p.update(np.array([1.0]), np.ones(1))
    assert p.losses_received(0) == 0  # nothing half-applied


def test_kept_count_is_each_plan_as_it_was_made():
    for name in POLICIES:
        p = make(name)
        plans = train(p, range(EPOCHS))
        counts = [p.kept_count(e) for e in range(EPOCHS)]  # after later losses changed the state
        assert [len(kept) for kept, _ in plans] == counts
        for epoch in range(EPOCHS):
            assert p.losses_received(epoch) == counts[epoch]
        if name in ("random", "clip_filter", "infobatch_exact"):
            pruning = [c for e, c in enumerate(counts) if e < 0.875 * EPOCHS]
            assert pruning == [N // 2] * len(pruning)


@pytest.mark.parametrize("policy", ["full", "mmdp", "infobatch"])
def test_plans_for_several_workers_keep_a_multiple_of_them_and_say_why(policy, caplog):
    # Ray Train splits an epoch's rows into equal shares and drops the rest: a plan for 3 workers leaves out
    # kept % 3 of what its policy kept, drawn anew each epoch, under its own reason, and nothing else changes.
    from pipeline.prune.budget import EVEN_SPLIT

    one, three = make(policy, n=N + 1), make(policy, n=N + 1, workers=3)
    left_out = []
    for epoch in range(4):
        (k1, w1, r1), (k3, w3, r3) = one.plan_with_reasons(epoch), three.plan_with_reasons(epoch)
        extra = len(k1) % 3
        assert len(k3) == len(k1) - extra and len(k3) % 3 == 0 and three.kept_count(epoch) == len(k3)
        assert r3 == ({**r1, EVEN_SPLIT: extra} if extra else r1)
        assert np.all(np.diff(k3) > 0) and np.isin(k3, k1).all()
        np.testing.assert_array_equal(w3, w1[np.isin(k1, k3)])  # each kept sample's weight as before
        left_out.append(set(np.setdiff1d(k1, k3).tolist()))
        for p, kept in ((one, k1), (three, k1)):  # the same losses for both: the states stay equal
            p.update(kept, (kept % 13).astype(np.float32) / 13, epoch)
    assert sum(map(len, left_out)) >= 3 and len(set().union(*left_out)) == sum(map(len, left_out))  # not one row

    # Left out of the trained samples: never a trajectory's reference sample (never pruned) nor a probe (weight
    # 0, a re-check on its schedule); drawn by splitmix keys of (seed, epoch, index), as every draw of a plan.
    traj = make("trajectory", n=N + 1, workers=7)
    probes = make(n=N + 1, workers=7, policy_params={"loss_weight": 0.5, "probe_every": 2})
    for epoch in range(6):
        for p in (traj, probes):
            kept, w = p.plan(epoch)
            assert len(kept) % 7 == 0
            p.update(kept, (kept % 13).astype(np.float32) / 13, epoch)
        assert np.isin(traj.reference, traj.plan(epoch)[0]).all()
    full_one, full_seven = make("full", n=N + 1), make("full", n=N + 1, workers=7)
    dropped = np.setdiff1d(full_one.plan(0)[0], full_seven.plan(0)[0])
    from pipeline.prune.selection import mix64
    draws = list(dict.fromkeys(mix64(mix64(0, 0, 1), j) % (N + 1) for j in range(20)))
    assert dropped.tolist() == sorted(draws[:(N + 1) % 7])  # full keeps 0..N: positions are indices
    # Fewer kept than workers: none trained that epoch (Ray Train's equal split would give each none), and said.
    tiny = make("full", n=3, workers=4)
    with caplog.at_level("WARNING", logger="pipeline.prune.pruner"):
        assert len(tiny.plan(0)[0]) == 0
    assert "the plan keeps 3 samples, fewer than the 4 workers" in caplog.text
    # An earlier epoch's count stays as planned when it is planned again from a later state.
    counts = [three.kept_count(e) for e in range(4)]
    three.plan(1)
    assert [three.kept_count(e) for e in range(4)] == counts

    # The number can change (a resume on other workers): the memoised plan is made again.
    assert three.set_workers(1) and len(three.plan(3)[0]) == len(one.plan(3)[0])
    assert not three.set_workers(1)
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        three.set_workers(0)


def test_exactly_one_loss_per_kept_sample_is_checkable():
    p = make()
    kept, _ = p.plan(0)
    p.update(kept[:-1], np.ones(len(kept) - 1))  # default epoch: the one planned
    assert (p.losses_received(0), p.coverage(0)["missing"]) == (len(kept) - 1, 1)
    p.update(kept[:1], np.ones(1))  # a duplicate does not fill the gap
    assert (p.losses_received(0), p.coverage(0)["missing"]) == (len(kept), 1)
    p.update(kept[-1:], np.ones(1))
    assert p.coverage(0) == {"received": len(kept) + 1, "reported": len(kept), "outside_plan": 0, "missing": 0}


def test_state_is_at_most_16_bytes_a_sample():
    p = make(n=100_000)
    per_sample = [v for v in p.state_dict().values() if isinstance(v, np.ndarray) and len(v) == 100_000]
    assert sum(v.nbytes for v in per_sample) == 12 * 100_000  # what a checkpoint holds
    # Plus the consistency bin (uint8) derived once for mmdp's plans.
    assert p.nbytes == 13 * 100_000 <= 16 * 100_000


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_plans_are_deterministic_and_depend_on_the_seed(name):
    a, b, c = make(name), make(name), make(name, seed=1)
    plans_a, plans_b = train(a, range(EPOCHS)), train(b, range(EPOCHS))
    for (ka, wa), (kb, wb) in zip(plans_a, plans_b):
        np.testing.assert_array_equal(ka, kb)
        np.testing.assert_array_equal(wa, wb)
    if name in ("random", "infobatch", "infobatch_exact", "mmdp", "trajectory"):  # the others draw nothing at random
        d = make(name)
        train(c, range(1)), train(d, range(1))  # epoch 0 (every sample for some): the same losses
        assert not np.array_equal(c.plan(1)[0], d.plan(1)[0])


def to_torch_and_back(state: dict) -> dict:
    """What the trainer does: tensors in a weights_only-loadable checkpoint."""
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_dict_round_trip_through_a_torch_checkpoint_reproduces_later_plans(name):
    original = make(name)
    train(original, range(3))
    restored = make(name)
    restored.load_state_dict(to_torch_and_back(original.state_dict()))
    assert restored.losses_received(2) == original.losses_received(2)
    # Both continue identically, as a job restarted from the checkpoint would.
    for (ko, wo), (kr, wr) in zip(train(original, range(3, EPOCHS), seed=5),
                                  train(restored, range(3, EPOCHS), seed=5)):
        np.testing.assert_array_equal(ko, kr)
        np.testing.assert_array_equal(wo, wr)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_saved_state_loads_into_another_layout_of_partitions_and_plans_the_same(name, tmp_path):
    original = make(name, bounds=[0, 1000, 2000, N])  # saved by three ranges, one file each
    train(original, range(3))
    url = str(tmp_path / "state")
    original.save(url)
    parts = sorted(p.name for p in (tmp_path / "state").glob("part-*.npz"))
    assert parts == ["part-00000.npz", "part-00001.npz", "part-00002.npz"]
    meta = read_saved(url)
    assert meta["config"] == original.config and meta["bounds"] == [0, 1000, 2000, N]
    received, saved = original.losses_received(2), original.state_dict()
    expected = train(original, range(3, EPOCHS), seed=5)  # how the saved run continues
    # Loaded whole, and split at other bounds: every range reads the slices of the saved files it covers.
    for bounds in (None, [0, 1500, N]):
        restored = Pruner(**meta["config"], consistency=np.random.default_rng(42).normal(0.25, 0.05, N),
                          reference=saved_reference(url), bounds=bounds)
        restored.load(url)
        assert restored.losses_received(2) == received and restored.current_epoch == 2
        for key in ("loss", "last_seen", "consistency"):
            np.testing.assert_array_equal(restored.state_dict()[key], saved[key])
        for (ke, we), (kr, wr) in zip(expected, train(restored, range(3, EPOCHS), seed=5)):
            np.testing.assert_array_equal(ke, kr)
            np.testing.assert_array_equal(we, wr)


def test_a_reset_pruner_plans_as_a_fresh_one():
    used, fresh = make("trajectory"), make("trajectory")
    train(used, range(3))
    used.reset()
    assert used.losses_received(0) == 0 and used.current_epoch == 0
    for (ku, wu), (kf, wf) in zip(train(used, range(EPOCHS)), train(fresh, range(EPOCHS))):
        np.testing.assert_array_equal(ku, kf)
        np.testing.assert_array_equal(wu, wf)


def test_load_refuses_an_unfinished_or_mismatched_saved_state(tmp_path):
    url = str(tmp_path / "state")
    with pytest.raises(InputError, match="no saved pruner state"):
        make().load(url)
    make().save(url)
    with pytest.raises(ValueError, match="keep_ratio=0.5 \\(now 0.3\\)"):
        Pruner(N, "mmdp", keep_ratio=0.3, epochs=EPOCHS, consistency=np.ones(N)).load(url)
    with pytest.raises(ValueError, match="other reference samples"):
        other = make("trajectory", reference=np.arange(3, N, 100))
        make("trajectory").save(str(tmp_path / "traj"))
        other.load(str(tmp_path / "traj"))
    (tmp_path / "state" / "_PENDING").write_bytes(b"")  # a save that stopped half-way
    with pytest.raises(InputError, match="incomplete output"):
        make().load(url)


def test_load_state_dict_refuses_a_state_from_another_config():
    state = make().state_dict()
    with pytest.raises(ValueError, match="keep_ratio=0.5 \\(now 0.3\\)"):
        Pruner(N, "mmdp", keep_ratio=0.3, epochs=EPOCHS, consistency=np.ones(N)).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        make(n=N + 1).load_state_dict(state)


def test_the_latest_plan_is_memoised_while_its_losses_arrive():
    p = make("infobatch")
    train(p, range(2))
    kept, weights = p.plan(2)
    p.update(kept, np.full(len(kept), 50.0))
    again, _ = p.plan(2)
    assert again is kept and not kept.flags.writeable


def test_policies_that_need_scores_say_so():
    with pytest.raises(ValueError, match="needs consistency"):
        Pruner(10, "mmdp")
    with pytest.raises(ValueError, match="keep_ratio"):
        Pruner(10, "random", keep_ratio=0)
    assert len(Pruner(10, "infobatch_exact", keep_ratio=0.3).plan(0)[0]) == 3


def test_a_million_losses_arrive_in_one_vectorised_update():
    """Ingest and plan at scale, checked for what they compute; their speed is benchmarks.pruner_scale's."""
    n = 1_000_000
    p = Pruner(n, "mmdp", keep_ratio=0.5, epochs=EPOCHS, consistency=np.random.default_rng(0).random(n))
    rng = np.random.default_rng(1)
    idx, losses = rng.permutation(n)[: n // 2], rng.random(n // 2, dtype=np.float32)
    assert p.update(idx, losses, 0) == n // 2 and p.losses_received(0) == n // 2
    state = p.state_dict()
    np.testing.assert_array_equal(state["loss"][idx], losses)
    assert (state["last_seen"][idx] == 0).sum() == n // 2 and (state["last_seen"] == -1).sum() == n - n // 2
    kept, weights, reasons = p.plan_with_reasons(3)
    assert (np.diff(kept) > 0).all() and sum(reasons.values()) == n - len(kept) and (weights >= 0).all()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_split_state_plans_like_one_pruner_whatever_the_partition_bounds(name):
    """Partitions only change where the arrays live: same kept indices, weights and reasons."""
    pruners = [make(name), make(name, bounds=[0, 1, 1000, 1001, 2999, N]), make(name, bounds=[0, 1500, N])]
    rng = np.random.default_rng(3)
    for epoch in range(EPOCHS):
        plans = [p.plan_with_reasons(epoch) for p in pruners]
        for kept, weights, reasons in plans[1:]:
            np.testing.assert_array_equal(kept, plans[0][0])
            np.testing.assert_array_equal(weights, plans[0][1])
            assert reasons == plans[0][2]
        kept = plans[0][0]
        losses = rng.exponential(1.0, len(kept))
        for p in pruners:
            p.update(kept, losses, epoch)
    assert all(p.nbytes == pruners[0].nbytes for p in pruners)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_pruned_by_reason_counts_every_pruned_sample(name):
    p = make(name)
    expected_reasons = {"full": set(), "random": {"random"}, "clip_filter": {"low consistency"},
                        "clip_cut": {"low consistency"}, "infobatch": {"well learned (low loss)"},
                        "infobatch_exact": {"random", "well learned (low loss)"},
                        "mmdp": {"low consistency", "well learned (low loss)"},
                        "trajectory": {"well learned (low loss)"}}[name]
    rng = np.random.default_rng(0)
    for epoch in range(EPOCHS):
        kept, _, reasons = p.plan_with_reasons(epoch)
        assert sum(reasons.values()) == N - len(kept)
        annealing = epoch >= 0.875 * EPOCHS
        if name in ("infobatch", "infobatch_exact", "trajectory") and (annealing or epoch == 0 and name == "trajectory"):
            assert reasons == {}
        elif name == "trajectory" and epoch >= 3:  # three epochs of losses: trajectories score samples
            assert set(reasons) == {"loss trajectory unlike the clean reference's"}
        else:
            assert set(reasons) == expected_reasons
        p.update(kept, rng.exponential(1.0, len(kept)), epoch)


def test_mmdp_reasons_follow_noise_then_loss():
    p = make("mmdp", policy_params={"probe_every": 8, "loss_weight": 0.5})
    _, _, first = p.plan_with_reasons(0)
    # Epoch 0: no loss seen, every eligible sample is "hard" and trained on; only the noise is out.
    assert first == {"low consistency": int(0.2 * N), "well learned (low loss)": 0}
    train(p, range(1))
    kept, weights, later = p.plan_with_reasons(1)
    probes = int((weights == 0).sum())  # excluded samples seen again with weight 0
    assert abs(probes - int(0.2 * N) / 8) < 0.05 * int(0.2 * N)  # an eighth of them (probe_every 8)
    assert later["low consistency"] == int(0.2 * N) - probes and later["well learned (low loss)"] > 0
