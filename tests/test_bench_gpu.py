"""The GPU check's two modes, run on the CPU (``--allow-cpu``) with the tiny model: the script works before a GPU is lent."""

from __future__ import annotations

from benchmarks.gpu import BenchGpuConfig, run, synthetic_table


def test_synthetic_pairs_reuse_their_images_under_distinct_keys():
    table = synthetic_table(600)
    images = table.column("image").to_pylist()
    assert table.num_rows == 600 and len(set(table.column("key").to_pylist())) == 600
    assert len(set(images)) == 512 and images[512] == images[0] and all(b[:2] == b"\xff\xd8" for b in images[:3])


def test_the_score_job_mode_scores_every_pair_and_reports_both_rates(ray_session):
    result = run(BenchGpuConfig(rows=64, model="mmdp-tiny", batch_size=16, allow_cpu=True, decode="actors"))
    assert (result["rows"], result["scored"], result["card"], result["gpus"]) == (64, 64, "cpu", 0)
    assert 0 < result["first_row_seconds"] < result["seconds"]
    assert result["steady_pairs_per_second"] > result["pairs_per_second"] > 0


def test_the_parts_mode_times_each_part_and_compares_the_decoders_pixels():
    result = run(BenchGpuConfig(model="mmdp-tiny", batch_size=32, allow_cpu=True, parts=True))
    rates = [v for k, v in result.items() if k.endswith("_per_second") or k.endswith("_per_second_one_core")]
    assert len(rates) == 6 and min(rates) > 0, result
    # On the CPU both decoders are libjpeg-turbo: at full size the pixels differ by resampling arithmetic only;
    # --decode tasks decodes a 256 px JPEG for a 32 px model at a fraction of its size (draft mode), further off.
    assert 0 < result["pixel_difference_mean"] < 1.0 < result["pixel_difference_mean_vs_tasks"] and result["jpeg_kb"] > 10
