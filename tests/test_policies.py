"""The pruning policies, planned by a Pruner holding synthetic per-sample state (no Ray)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.prune import budget
from pipeline.prune import policies as P
from pipeline.prune.pruner import Pruner

N, EPOCHS = 2000, 10


@dataclass
class State:
    """Per-sample state to plan from: losses (meaningful where seen) and raw consistency scores."""

    loss: np.ndarray
    seen: np.ndarray
    consistency: np.ndarray
    keep_ratio: float = 0.5


def make_state(n=N, keep_ratio=0.5, seen_frac=1.0, seed=0):
    """Skewed losses (most samples learned, a tail of hard ones), uniform consistency scores."""
    rng = np.random.default_rng(seed)
    loss = rng.exponential(0.5, n).astype(np.float32)
    seen = rng.random(n) < seen_frac
    return State(loss, seen, rng.random(n), keep_ratio)


def pruner(policy, state, seed=0):
    """A Pruner whose seen samples each reported their loss once (taken as is)."""
    p = Pruner(len(state.loss), policy, keep_ratio=state.keep_ratio, epochs=EPOCHS, seed=seed,
               consistency=state.consistency)
    seen = np.flatnonzero(state.seen)
    p.update(seen, state.loss[seen], epoch=0)
    return p


def select(policy, state, epoch, seed=0):
    return pruner(policy, state, seed).plan(epoch)


def eligible(state, epoch, **mmdp_params):
    """mmdp's samples not dropped as noise at ``epoch``: all that an annealing epoch keeps (delta=0)."""
    kept, weights = select(P.make_policy("mmdp", **mmdp_params, delta=0.0), state, epoch)
    assert (weights == 1).all()
    mask = np.zeros(len(state.loss), dtype=bool)
    mask[kept] = True
    return mask


def test_registry_has_the_policies_and_rejects_unknown_names_and_knobs_that_cannot_work():
    assert sorted(P.POLICIES) == ["clip_cut", "clip_filter", "full", "infobatch", "infobatch_exact", "mmdp", "random",
                                  "trajectory"]
    assert P.make_policy("mmdp", noise_fraction=0.3).noise_fraction == 0.3
    with pytest.raises(ValueError, match="clip_filter"):
        P.make_policy("nope")
    with pytest.raises(ValueError, match="delta"):
        P.make_policy("infobatch", delta=1.5)
    # Counts are whole numbers (a float window would fail inside the pruner, at its first plan).
    assert P.make_policy("trajectory", window=np.int64(8)).window == 8
    for knob, value in (("window", 10.0), ("window", 10.5), ("min_points", True)):
        with pytest.raises(ValueError, match=f"{knob} takes a whole number"):
            P.make_policy("trajectory", **{knob: value})
    with pytest.raises(ValueError, match="probe_every takes a whole number"):
        P.make_policy("mmdp", loss_weight=0.5, probe_every=2.0)
    # Probes show excluded samples' losses; a noise decision from the consistency alone never reads them.
    with pytest.raises(ValueError, match="probe_every needs loss_weight > 0"):
        P.make_policy("mmdp", probe_every=8)
    assert P.make_policy("mmdp", probe_every=8, loss_weight=0.5).probe_every == 8


def test_target_count_rounds_half_up_and_stays_in_range():
    assert budget.target_count(10, 0.25) == 3  # 2.5 -> 3
    assert budget.target_count(1000, 0.3) == 300
    assert budget.target_count(5, 0.01) == 1
    assert budget.target_count(7, 1.0) == 7


def test_rank_normalise_ignores_score_scale_and_ranks_nan_lowest():
    scores = np.array([0.31, -0.2, 0.9, np.nan, 0.05])
    ranks = P.rank_normalise(scores)
    np.testing.assert_allclose(ranks, [0.7, 0.3, 0.9, 0.1, 0.5])
    np.testing.assert_array_equal(P.rank_normalise(np.exp(5 * np.nan_to_num(scores, nan=-9))), ranks)


@pytest.mark.parametrize("n_hard,n_well,k", [(300, 700, 500), (600, 400, 500), (900, 100, 500),
                                             (100, 900, 150), (0, 50, 10), (50, 0, 10), (10, 990, 1000)])
def test_allocate_fills_k_exactly_and_favours_hard_samples(n_hard, n_well, k):
    keep_hard, keep_well = budget.allocate(n_hard, n_well, k, max_prune_prob=0.75)
    assert keep_hard + keep_well == k
    assert 0 <= keep_hard <= n_hard and 0 <= keep_well <= n_well
    if n_hard and n_well:
        assert keep_well >= 1 and keep_hard / n_hard >= keep_well / n_well - 1e-9
    if n_hard + (1 - 0.75) * n_well <= k:
        assert keep_hard == n_hard  # the budget allows every hard sample


@pytest.mark.parametrize("name", ["random", "infobatch_exact", "clip_filter"])
@pytest.mark.parametrize("keep_ratio", [0.1, 0.3, 0.5, 0.77])
def test_fixed_ratio_policies_keep_exactly_round_keep_ratio_n(name, keep_ratio):
    policy = P.make_policy(name)
    for seen_frac in (0.0, 0.6, 1.0):
        p = pruner(policy, make_state(keep_ratio=keep_ratio, seen_frac=seen_frac))
        for epoch in range(EPOCHS):
            kept, weights = p.plan(epoch)
            assert len(kept) == len(weights) == p.kept_count(epoch)
            annealing = P.is_annealing(epoch, EPOCHS, getattr(policy, "delta", 1.0))
            assert len(kept) == (N if annealing else round(keep_ratio * N))
            assert kept.dtype == np.int64 and weights.dtype == np.float32
            assert (np.diff(kept) > 0).all() and (weights > 0).all()


@pytest.mark.parametrize("keep_ratio", [0.3, 0.6, 0.65, 0.9])
def test_mmdp_budget_is_a_share_of_full_and_the_excluded_noise_is_its_first_saving(keep_ratio):
    """A pruning epoch trains on round(keep_ratio * n) samples: the excluded 30% count as saved, so
    only what they did not save is pruned from the well-learned (at most max_prune_prob of them:
    then it trains on more); with the budget at or above the eligible share, nothing clean is pruned.
    Probes (weight 0; they go with the loss mixed into the noise decision) come on top."""
    noise = dict(noise_fraction=0.3, loss_weight=0.5)
    policy = P.make_policy("mmdp", **noise, max_prune_prob=0.9, probe_every=8)
    state = make_state(keep_ratio=keep_ratio, seen_frac=1.0)
    for epoch in (1, 5):
        clean = eligible(state, epoch, **noise)
        well = int((clean & (state.loss < state.loss[clean].mean(dtype=np.float64))).sum())
        target = int(np.floor(keep_ratio * N + 0.5))
        kept, weights = select(policy, state, epoch)
        trained = weights > 0
        assert trained.sum() == min(clean.sum(), max(target, clean.sum() - int(np.floor(0.9 * well + 0.5))))
        if keep_ratio >= 0.7:
            assert trained.sum() == clean.sum() and (weights[trained] == 1).all()
        probed = ~clean & (np.arange(N) % policy.probe_every == epoch % policy.probe_every)
        np.testing.assert_array_equal(kept[~trained], np.flatnonzero(probed))


def test_mmdp_and_infobatch_train_on_every_eligible_sample_before_any_loss():
    state = make_state(keep_ratio=0.5, seen_frac=0.0)
    kept, weights = select(P.make_policy("mmdp", noise_fraction=0.3), state, 0)
    np.testing.assert_array_equal(kept, np.flatnonzero(eligible(state, 0, noise_fraction=0.3)))
    assert (weights == 1).all()
    kept, weights = select(P.make_policy("infobatch"), state, 0)
    assert len(kept) == N and (weights == 1).all()


def test_infobatch_prunes_its_share_of_the_well_learned_and_the_count_follows_the_losses():
    state = make_state(seen_frac=1.0)
    well = state.loss < state.loss.mean(dtype=np.float64)
    for r in (0.3, 0.5):
        kept, weights = select(P.make_policy("infobatch", prune_prob=r), state, 1)
        cut = int(np.floor(r * well.sum() + 0.5))
        assert len(kept) == N - cut
        assert np.isin(np.flatnonzero(~well), kept).all()  # hard samples are never pruned
        assert weights[well[kept]] == pytest.approx(well.sum() / (well.sum() - cut))


def test_clip_cut_drops_exactly_the_estimated_noise_share_by_consistency():
    raw = np.random.default_rng(4).normal(size=N)
    state = State(loss=np.zeros(N, np.float32), seen=np.zeros(N, bool), consistency=raw)
    kept, weights = select(P.make_policy("clip_cut", noise_fraction=0.25), state, 3)
    np.testing.assert_array_equal(kept, np.sort(np.argsort(raw)[N // 4:]))
    assert (weights == 1).all()


def test_full_keeps_everything_with_weight_one():
    kept, weights = select(P.make_policy("full"), make_state(), 3)
    np.testing.assert_array_equal(kept, np.arange(N))
    assert (weights == 1).all()


def test_random_draws_a_new_subset_each_epoch_and_the_same_one_for_the_same_seed():
    policy, state = P.make_policy("random"), make_state()
    a, wa = select(policy, state, 1)
    b, _ = select(policy, state, 2)
    np.testing.assert_array_equal(a, select(policy, state, 1)[0])
    assert len(np.intersect1d(a, b)) < 0.6 * len(a) and (wa == 1).all()


def test_clip_filter_keeps_exactly_the_top_fraction_every_epoch():
    raw = np.random.default_rng(3).normal(size=N)
    state = State(loss=np.zeros(N, np.float32), seen=np.zeros(N, bool), consistency=raw, keep_ratio=0.3)
    top = np.sort(np.argsort(raw)[-600:])
    for epoch in (0, 5, 9):
        kept, weights = select(P.make_policy("clip_filter"), state, epoch, seed=epoch)
        np.testing.assert_array_equal(kept, top)
        assert (weights == 1).all()


def weighted_sums(policy, state, epoch, eligible, seeds=400):
    """Mean over seeds of sum(w * loss) over kept, and the eligible set's loss sum."""
    total = np.mean([np.dot(*_gather(select(policy, state, epoch, seed), state.loss))
                     for seed in range(seeds)])
    return total, float(state.loss[eligible].sum(dtype=np.float64))


def _gather(plan, loss):
    kept, weights = plan
    return weights.astype(np.float64), loss[kept].astype(np.float64)


@pytest.mark.parametrize("keep_ratio", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("name", ["infobatch", "infobatch_exact"])
def test_infobatch_weights_keep_the_weighted_loss_sum_unbiased(keep_ratio, name):
    state = make_state(keep_ratio=keep_ratio, seen_frac=0.9)
    estimate, truth = weighted_sums(P.make_policy(name), state, 2, np.ones(N, bool))
    assert estimate == pytest.approx(truth, rel=0.01)


@pytest.mark.parametrize("keep_ratio", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("epoch", [0, 4])
def test_mmdp_weights_keep_the_eligible_loss_sum_unbiased(keep_ratio, epoch):
    policy = P.make_policy("mmdp")
    state = make_state(keep_ratio=keep_ratio, seen_frac=0.0 if epoch == 0 else 0.9)
    clean = eligible(state, epoch)
    assert clean.sum() == N - P.noise_count(policy.noise_fraction, N)
    estimate, truth = weighted_sums(policy, state, epoch, clean)
    assert estimate == pytest.approx(truth, rel=0.01)
    kept, weights = select(policy, state, epoch)
    assert clean[kept[weights > 0]].all()  # never trains on what it dropped as noise (probes weigh 0)


@pytest.mark.parametrize("name, params", [("infobatch", {"prune_prob": 0.5}), ("infobatch", {"prune_prob": 0.9}),
                                          ("mmdp", {"noise_fraction": 0.0, "max_prune_prob": 0.9})])
def test_a_small_well_learned_stratum_keeps_a_survivor_so_its_loss_stays_in_the_sum(name, params):
    # Three hard samples and one or three well-learned: round(p * n_well) is n_well here, and
    # pruning them all would drop their loss from the weighted sum instead of weighting it up.
    for loss in ([3.0, 3.0, 3.0, 0.1], [3.0, 3.0, 3.0, 3.0, 0.1, 0.2, 0.3]):
        loss = np.asarray(loss, np.float32)
        state = State(loss=loss, seen=np.ones(len(loss), bool), consistency=np.arange(len(loss), dtype=np.float32),
                      keep_ratio=0.1)
        well = loss < loss.mean(dtype=np.float64)
        for seed in range(20):
            kept, weights = select(P.make_policy(name, **params), state, 1, seed=seed)
            survivors = well[kept]
            assert survivors.any()
            assert weights[survivors].sum() == pytest.approx(well.sum())


def test_infobatch_exact_prunes_only_well_learned_samples_when_the_budget_allows():
    state = make_state(keep_ratio=0.7, seen_frac=1.0)
    kept, weights = select(P.make_policy("infobatch_exact"), state, 1)
    hard = state.loss >= state.loss.mean(dtype=np.float64)
    assert np.isin(np.flatnonzero(hard), kept).all()
    assert (weights[hard[kept]] == 1).all() and (weights[~hard[kept]] > 1).all()


@pytest.mark.parametrize("name", ["infobatch", "infobatch_exact", "mmdp"])
def test_annealing_epochs_train_every_consistent_sample_with_weight_one(name):
    policy = P.make_policy(name, delta=0.8)  # epochs 8 and 9 of 10 anneal
    state = make_state(seen_frac=1.0)
    for epoch in (8, 9):
        kept, weights = select(policy, state, epoch)
        clean = eligible(state, epoch) if name == "mmdp" else np.ones(N, bool)
        assert clean.sum() == N - (P.noise_count(policy.noise_fraction, N) if name == "mmdp" else 0)
        np.testing.assert_array_equal(kept, np.flatnonzero(clean))
        assert (weights == 1).all()
    kept, weights = select(policy, state, 7)
    assert (weights > 0).sum() < clean.sum()  # still pruning


def synthetic_noise(n=5000, noisy_share=0.3, separation=0.2, seed=0):
    """A noisy flag and consistency scores where noisy samples score lower on average."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < noisy_share
    raw = np.where(noisy, rng.normal(0.5 - separation / 2, 0.15, n), rng.normal(0.5 + separation / 2, 0.15, n))
    return noisy, raw


def test_mmdp_noise_decision_is_the_consistency_cut_by_default():
    """By default the excluded samples are the noise_fraction least consistent, every epoch, whatever the losses."""
    noisy, cons = synthetic_noise(separation=0.2)
    n, rng = len(noisy), np.random.default_rng(3)
    policy = P.make_policy("mmdp", noise_fraction=0.3)
    cut = np.zeros(n, bool)
    cut[np.argsort(cons, kind="stable")[:P.noise_count(0.3, n)]] = True
    loss, seen = np.zeros(n, np.float32), np.zeros(n, bool)
    for epoch in range(6):
        state = State(loss=loss, seen=seen, consistency=cons, keep_ratio=0.5)
        np.testing.assert_array_equal(~eligible(state, epoch, noise_fraction=0.3), cut)
        kept, weights = select(policy, state, epoch)
        assert (weights > 0).all() and not cut[kept].any()  # no probes: nothing excluded is forwarded
        loss[kept] = rng.exponential(1.0, len(kept))  # losses that would move a loss-mixed cut
        seen[kept] = True


def test_mmdp_drops_low_consistency_noise_from_epoch_zero_on():
    noisy, cons = synthetic_noise(separation=2.0)  # the scorer separates the noise
    n = len(noisy)
    state = State(loss=np.zeros(n, np.float32), seen=np.zeros(n, bool), consistency=cons, keep_ratio=0.5)
    policy = P.make_policy("mmdp", noise_fraction=noisy.mean())
    kept, _ = select(policy, state, 0)
    np.testing.assert_array_equal(kept, np.flatnonzero(~noisy))  # no probes at epoch 0
    kept, weights = select(policy, state, EPOCHS - 1)
    assert noisy[kept[weights > 0]].sum() == 0 and (weights[noisy[kept]] == 0).all()


def test_mmdp_with_the_loss_mixed_in_finds_noise_consistency_misses():
    """An option (``loss_weight`` > 0, off by default): high loss with low consistency flags noise."""
    noisy, cons = synthetic_noise(separation=0.2)  # a weak scorer: noise overlaps clean
    n, rng = len(noisy), np.random.default_rng(1)
    mixed = dict(noise_fraction=0.3, loss_weight=0.5, probe_every=8)
    policy = P.make_policy("mmdp", **mixed)
    loss, seen = np.zeros(n, np.float32), np.zeros(n, bool)
    precision = []
    for epoch in range(8):
        state = State(loss=loss, seen=seen, consistency=cons, keep_ratio=0.5)
        precision.append(noisy[~eligible(state, epoch, **mixed)].mean())
        kept, _ = select(policy, state, epoch)
        # Trained (and probed) samples report losses: wrong labels stay hard to fit.
        loss[kept] = np.where(noisy[kept], 1.0 + rng.exponential(1.0, len(kept)),
                              rng.exponential(0.5, len(kept)))
        seen[kept] = True
    assert precision[0] < 0.7 and precision[-1] > precision[0] + 0.1


def test_mmdp_probes_let_a_clean_sample_excluded_by_mistake_return():
    """Clean samples that the scorer got wrong (lowest consistency) are excluded at epoch 0; a probe
    sees their low loss, and they come back, while the noise, whose probed loss is high, stays out."""
    n, rng = 2000, np.random.default_rng(5)
    noisy = np.zeros(n, bool)
    noisy[rng.choice(n, 400, replace=False)] = True
    cons = np.where(noisy, rng.normal(0.0, 0.1, n), rng.normal(1.0, 0.1, n))
    mistaken = np.flatnonzero(~noisy)[:100]
    cons[mistaken] = -1.0  # below every noisy sample: excluded first
    policy = P.make_policy("mmdp", noise_fraction=0.2, probe_every=2, loss_weight=0.8, loss_ramp_epochs=1)
    p = Pruner(n, policy, keep_ratio=1.0, epochs=EPOCHS, seed=0, consistency=cons)
    excluded_at = []
    for epoch in range(6):
        kept, weights = p.plan(epoch)
        excluded = np.ones(n, bool)
        excluded[kept[weights > 0]] = False
        excluded_at.append(excluded)
        p.update(kept, np.where(noisy[kept], 3.0, 0.1).astype(np.float32), epoch)
    assert excluded_at[0][mistaken].all()
    assert not excluded_at[-1][mistaken].any()  # every mistaken sample returned
    assert excluded_at[-1][noisy].mean() > 0.9  # and the noise took their place


def test_trajectory_prunes_the_samples_whose_losses_move_unlike_the_clean_reference():
    """Clean losses fall together (each at its own level); mislabelled ones stay high and wander. Once
    three epochs of losses exist, the pruned are the misaligned (mostly noise); the reference never is."""
    n, epochs, rng = 3000, 12, np.random.default_rng(2)
    noisy = np.zeros(n, bool)
    noisy[rng.choice(n, 900, replace=False)] = True
    reference = np.flatnonzero(~noisy)[::70]  # ~1% of the pool, known clean
    level = rng.uniform(0.5, 2.0, n)
    p = Pruner(n, "trajectory", keep_ratio=0.5, epochs=epochs, seed=0, reference=reference)
    pruned_noisy, kept_counts = [], []
    for epoch in range(epochs):
        kept, weights, reasons = p.plan_with_reasons(epoch)
        kept_counts.append(len(kept))
        assert np.isin(reference, kept).all()  # the reference reports every epoch
        if epoch >= 3 and not P.is_annealing(epoch, epochs, 0.875):
            pruned = np.setdiff1d(np.arange(n), kept)
            assert (weights == 1).all() and set(reasons) == {budget.MISALIGNED}
            pruned_noisy.append(noisy[pruned].mean())
        clean_loss = level * np.exp(-0.3 * epoch) * rng.uniform(0.9, 1.1, n)
        noisy_loss = 2.0 + rng.uniform(-0.8, 0.8, n)
        p.update(kept, np.where(noisy, noisy_loss, clean_loss)[kept].astype(np.float32), epoch)
    assert kept_counts[0] == n and kept_counts[-1] == n  # every sample first and in the annealing epochs
    assert min(pruned_noisy) > 0.9  # the pool holds 30% noise


def test_the_full_data_epochs_start_where_infobatchs_code_starts_them():
    """InfoBatch's sampler counts one ahead of the epoch (its constructor already drew once), so it trains on
    everything from the first epoch e with e + 1 > delta * epochs: with 20 epochs and delta 0.875, epochs
    17-19 (three, where e >= 17.5 gave two); where delta * epochs is whole, the two rules agree."""
    assert [e for e in range(20) if P.is_annealing(e, 20, 0.875)] == [17, 18, 19]
    assert [e for e in range(8) if P.is_annealing(e, 8, 0.875)] == [7]
    assert not any(P.is_annealing(e, 20, 1.0) for e in range(20))  # mmdp's default: no annealing
    p = Pruner(500, "infobatch", epochs=20, seed=0)
    for epoch in range(18):
        kept, _ = p.plan(epoch)
        p.update(kept, np.linspace(0.1, 2.0, len(kept), dtype=np.float32), epoch)
    assert p.kept_count(16) < 500 and p.kept_count(17) == 500


def test_trajectory_needs_its_reference_and_checkpoints_its_history():
    with pytest.raises(ValueError, match="needs reference samples"):
        Pruner(100, "trajectory", epochs=5)
    with pytest.raises(ValueError, match="takes no reference"):
        Pruner(100, "infobatch", epochs=5, reference=np.arange(3))
    p = Pruner(500, "trajectory", epochs=10, reference=np.arange(0, 500, 50))
    for epoch in range(4):
        kept, _ = p.plan(epoch)
        p.update(kept, np.linspace(0.1, 2.0, len(kept), dtype=np.float32), epoch)
    state = p.state_dict()
    assert state["history"].shape == (500, 10) and state["history"].dtype == np.float16
    assert state["history_slot_epoch"][:4].tolist() == [0, 1, 2, 3]
    other = Pruner(500, "trajectory", epochs=10, reference=np.arange(0, 500, 25))
    with pytest.raises(ValueError, match="other reference samples"):
        other.load_state_dict(state)


def test_each_policy_declares_whether_its_plans_follow_the_keep_ratio():
    """``uses_keep_ratio`` (the report groups runs by the settings a policy reads) is what the plans do."""
    from pipeline.prune.policies import POLICIES

    rng = np.random.default_rng(0)
    n = 400
    consistency, losses = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    for name, cls in POLICIES.items():
        kept = []
        for keep in (0.5, 0.8):
            p = Pruner(n, name, keep_ratio=keep, epochs=10, consistency=consistency,
                       reference=np.arange(0, n, 40) if cls.history_epochs else None)
            for epoch in range(4):
                p.plan(epoch)
                p.update(np.arange(n), losses * (1 + epoch), epoch)
            kept.append(len(p.plan(4)[0]))
        assert (kept[0] != kept[1]) == cls.uses_keep_ratio, (name, kept)


def test_selecting_the_smallest_keys_takes_a_key_of_zero_at_the_threshold():
    """A threshold of 0 (the k-th smallest key is 0) was read as "select none", so a plan chose fewer than
    asked and the pruner's reason check failed (about k * 2**-32 a plan)."""
    from pipeline.prune.partitions import LocalPartitions
    from pipeline.prune.selection import select_smallest

    for bounds in ([0, 6], [0, 2, 6]):
        cluster = LocalPartitions(bounds, None, 0.5)
        cluster.begin_plan()
        for part, keys in zip(cluster.parts, np.split(np.array([5, 0, 7, 0, 9, 3], np.uint32), bounds[1:-1])):
            part.scratch.update(key=keys, group=np.ones(len(keys), np.uint8))
        select_smallest(cluster, [1])
        assert np.concatenate([p.scratch["chosen"] for p in cluster.parts]).tolist() == [
            False, True, False, False, False, False]  # one of the two zeros: the lower index
        select_smallest(cluster, [0])
        assert not np.concatenate([p.scratch["chosen"] for p in cluster.parts]).any()
