import numpy as np
import pytest

from pipeline.metrics import auroc


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
