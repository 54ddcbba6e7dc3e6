import numpy as np
import pytest

from pipeline.score.quality import auroc


def test_auroc_known_values():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    # One of four positive/negative pairs out of order.
    assert auroc([0.1, 0.6, 0.5, 0.9], [False, False, True, True]) == 0.75


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=300).astype(float)
    pos = rng.random(300) < 0.3
    pairs = (scores[pos][:, None] > scores[~pos][None, :]).mean() + 0.5 * (scores[pos][:, None] == scores[~pos][None, :]).mean()
    assert auroc(scores, pos) == pytest.approx(pairs, abs=1e-12)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [True, True])


def test_noise_fraction_is_the_low_mode_of_a_two_mode_histogram():
    from pipeline.score.quality import estimate_noise_fraction

    rng = np.random.default_rng(0)
    clean, noisy = rng.normal(0.2, 0.1, 7000), rng.normal(-0.5, 0.15, 3000)
    assert estimate_noise_fraction(np.r_[clean, noisy]) == pytest.approx(0.3, abs=0.01)
    # One mode: no distinct noisy group, nothing is dropped as noise.
    assert estimate_noise_fraction(clean) == 0.0
    # A signal that calls most pairs noise is capped.
    assert estimate_noise_fraction(np.r_[clean[:2000], noisy, noisy]) == 0.5
    assert estimate_noise_fraction(np.array([np.nan, 1.0])) == 0.0


def test_noise_fraction_reads_a_narrow_consistent_group_beside_a_wide_low_one():
    """A caption score's shape: Otsu's cut alone lands inside the wide low group."""
    from pipeline.score.quality import estimate_noise_fraction, lower_tail_bound, otsu

    rng = np.random.default_rng(0)
    clean, noisy = rng.normal(0.77, 0.017, 7000), rng.normal(0.6, 0.06, 3000)
    values = np.r_[clean, noisy]
    cut, _ = otsu(values)
    assert np.mean(values < cut) < 0.28  # what Otsu's cut alone reads
    assert estimate_noise_fraction(values) == pytest.approx(0.3, abs=0.01)
    # The bound is the group's median less three of its low side's spreads.
    assert lower_tail_bound(clean) == pytest.approx(0.77 - 3 * 0.017, abs=0.003)
    # A skewed group: its low side's spread (0.04, not the high side's 0.01) places the bound.
    z = rng.normal(size=7000)
    assert lower_tail_bound(0.77 + np.where(z < 0, 0.04, 0.01) * z) == pytest.approx(0.77 - 3 * 0.04, abs=0.005)


def test_policy_params_parse_numbers_and_reject_malformed_pairs():
    from pipeline.train.config import parse_params

    assert parse_params(("loss_weight=0.3", "loss_ramp_epochs=2", "delta=-1")) == {
        "loss_weight": 0.3, "loss_ramp_epochs": 2, "delta": -1}
    for bad in (("loss_weight",), ("=1",), ("delta=high",)):
        with pytest.raises(ValueError, match="--policy-params"):
            parse_params(bad)
