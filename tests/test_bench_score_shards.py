"""benchmarks.score_shards: which layouts it measures."""
from __future__ import annotations

import pytest

from benchmarks.score_shards import BenchScoreShardsConfig


def test_shard_rows_keeps_the_shards_size_and_scales_their_count_with_the_rows():
    cfg = BenchScoreShardsConfig(rows=(500_000, 2_000_000), shard_rows=5_000)
    assert cfg.layouts() == [(500_000, 100), (2_000_000, 400)]
    # Without it, every row count goes into every shard count.
    cfg = BenchScoreShardsConfig(rows=(1_000, 2_000), shards=(10, 100))
    assert cfg.layouts() == [(1_000, 10), (1_000, 100), (2_000, 10), (2_000, 100)]


@pytest.mark.parametrize("kwargs", [{"rows": (1_000, 2_500), "shard_rows": 1_000}, {"rows": (1_000,), "shard_rows": 0},
                                    {"rows": (1_000,), "shards": (300,)}])
def test_layouts_that_do_not_divide_the_rows_are_refused(kwargs):
    with pytest.raises(ValueError):
        BenchScoreShardsConfig(**kwargs)
