"""Benchmark plan delivery and loss reporting through Ray, with the real PruningActor.

At each size, a :class:`~pipeline.prune.actor.PruningActor` (policy ``mmdp``
on synthetic consistency scores; its state in one actor, or split over
``--partitions`` partition actors) and ``--workers`` worker actors that do
what Ray Train workers and the training data's keep stage do. Each epoch:

1. the driver calls ``start_epoch`` (the plan made and published): *plan s*;
2. every worker looks the plan up as the keep stage does once per block
   (``published_plan``, then the one object read from the object store):
   *delivery s* runs from ``start_epoch``'s return to the last worker holding
   the arrays;
3. every worker reports a loss for each sample of its share of the plan
   through a :class:`~pipeline.prune.actor.LossReporter` (chunks of 4,096, as
   training sends them; straight to the partitions when split): *losses/s*;
4. while 3 runs, the driver times plan look-ups, one after the other, the
   new way (``published_plan``, which never waits) and the old way
   (``current_plan``, behind the loss ingest): median and worst latency.

Then the memory (PSS) of the driver and of the pruner's actor processes.
Epoch 0 has no losses before it; later epochs plan on the reported losses.

Local::

    python -m benchmarks.plan_delivery --sizes 1e6,1e7 --partitions 1,2

On a cluster, where Ray places the partition actors across its nodes::

    ray job submit --working-dir . -- python -m benchmarks.plan_delivery --sizes 1e7,1e8 --partitions 1,4

Prints one JSON line per size and partitioning, then a markdown table.
Target (issue 15): the plan of 10M samples reaches every worker in <= 2 s.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from pipeline.cli import option, run_job


@dataclass(frozen=True)
class BenchPlanDeliveryConfig:
    """The benchmark's knobs; one field per command-line flag."""

    sizes: str = option("1e6,1e7", "comma-separated sample counts (1e7 = 10,000,000)")
    partitions: str = option("1,2", "comma-separated partition counts (1 = the state in the pruning actor)")
    workers: int = option(2, "worker actors (Ray Train workers' stand-ins)")
    epochs: int = option(3, "epochs per setting (epoch 0 has no losses)")

    def __post_init__(self):
        if min(self.counts) < 1 or min(self.partition_counts) < 1 or self.workers < 1 or self.epochs < 1:
            raise ValueError("--sizes, --partitions, --workers and --epochs must be >= 1")

    @property
    def counts(self) -> list[int]:
        return [int(float(s)) for s in self.sizes.split(",")]

    @property
    def partition_counts(self) -> list[int]:
        return [int(s) for s in self.partitions.split(",")]


def _worker_class():
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        """Looks the plan up as the keep stage does, and reports losses as a training worker does."""

        def __init__(self, name: str, rank: int, world: int):
            from pipeline.prune.actor import get_pruner

            self.actor, self.rank, self.world = get_pruner(name), rank, world
            self.kept = None

        def fetch(self) -> tuple[int, int]:
            epoch, [ref] = ray.get(self.actor.published_plan.remote())
            self.kept, _ = ray.get(ref)
            return epoch, len(self.kept)

        def report(self, epoch: int) -> int:
            from pipeline.prune.actor import LossReporter

            mine = self.kept[self.rank::self.world]
            losses = np.random.default_rng([epoch, self.rank]).exponential(1.0, len(mine)).astype(np.float32)
            reporter = LossReporter(self.actor)
            for start in range(0, len(mine), 256):  # a training batch at a time
                reporter.report(mine[start:start + 256], losses[start:start + 256], epoch)
            return reporter.flush()

    return Worker


def measure(n: int, partitions: int, cfg: BenchPlanDeliveryConfig) -> dict:
    import ray

    from benchmarks.procmem import pss, rss
    from pipeline.prune.actor import actor_name, create_pruner

    name = actor_name(f"bench-{n}-{partitions}")
    base = rss()
    consistency = np.random.default_rng(0).random(n, dtype=np.float32)
    actor = create_pruner(name, n, policy="mmdp", keep_ratio=0.5, epochs=max(20, cfg.epochs), seed=0,
                          consistency=consistency,
                          num_partitions=partitions)
    del consistency
    Worker = _worker_class()
    workers = [Worker.remote(name, r, cfg.workers) for r in range(cfg.workers)]
    ray.get(actor.info.remote())
    out = {"n": n, "partitions": partitions, "workers": cfg.workers, "loadavg_start": os.getloadavg()[0],
           "plan_s": [], "delivery_s": [], "losses_per_s": [], "published_ms": [], "current_ms": []}
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        kept = ray.get(actor.start_epoch.remote(epoch))
        out["plan_s"].append(round(time.perf_counter() - t, 3))
        t = time.perf_counter()
        got = ray.get([w.fetch.remote() for w in workers])
        out["delivery_s"].append(round(time.perf_counter() - t, 3))
        assert all(g == (epoch, kept) for g in got), (got, epoch, kept)
        t = time.perf_counter()
        reports = [w.report.remote(epoch) for w in workers]
        while ray.wait(reports, num_returns=len(reports), timeout=0)[1]:  # look-ups while losses stream in
            for key, method in (("published_ms", actor.published_plan), ("current_ms", actor.current_plan)):
                started = time.perf_counter()
                ray.get(method.remote())
                out[key].append((time.perf_counter() - started) * 1e3)
        sent = sum(ray.get(reports))
        out["losses_per_s"].append(round(sent / (time.perf_counter() - t)))
        assert sent == kept == ray.get(actor.losses_received.remote(epoch)), (sent, kept)
    for key in ("published_ms", "current_ms"):
        values = out.pop(key)
        out[key.replace("_ms", "_lookups")] = len(values)
        out[key.replace("_ms", "_median_ms")] = round(statistics.median(values), 2)
        out[key.replace("_ms", "_max_ms")] = round(max(values), 1)
    titles = {int(pid): _title(int(pid)) for pid in os.listdir("/proc") if pid.isdigit()}
    out["pruner_pss_mb"] = round(sum(pss(p) for p, t in titles.items() if t.startswith("ray::PruningActor")) / 2**20, 1)
    out["partition_pss_mb"] = round(sum(pss(p) for p, t in titles.items() if t.startswith("ray::PartitionActor")) / 2**20, 1)
    out["driver_rss_growth_mb"] = round((rss() - base) / 2**20, 1)
    out["loadavg_end"] = os.getloadavg()[0]
    for handle in workers + [actor]:
        ray.kill(handle)
    return out


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def table(rows: list[dict]) -> str:
    from pipeline.report.page import markdown_table

    header = ("samples", "partitions", "plan s (each epoch)", "delivery to every worker s (each epoch)",
              "losses/s through Ray (each epoch)", "look-up ms, published_plan (median / max)",
              "look-up ms, current_plan behind ingest (median / max)", "pruner actor PSS MB",
              "partition actors PSS MB", "driver RSS growth MB", "load avg")
    return markdown_table(header, [
        (f"{r['n']:,}", r["partitions"], " / ".join(map(str, r["plan_s"])), " / ".join(map(str, r["delivery_s"])),
         " / ".join(f"{v / 1e6:.2f}M" for v in r["losses_per_s"]),
         f"{r['published_median_ms']} / {r['published_max_ms']}", f"{r['current_median_ms']} / {r['current_max_ms']}",
         r["pruner_pss_mb"], r["partition_pss_mb"], r["driver_rss_growth_mb"], f"{r['loadavg_start']:.2f}")
        for r in rows])


def run(cfg: BenchPlanDeliveryConfig) -> None:
    from pipeline.cli import connect_ray

    connect_ray()
    rows = []
    for n in cfg.counts:
        for partitions in cfg.partition_counts:
            rows.append(measure(n, partitions, cfg))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


def main(argv=None) -> int:
    return run_job(BenchPlanDeliveryConfig, argv, run, doc=__doc__, prog="python -m benchmarks.plan_delivery")


if __name__ == "__main__":
    raise SystemExit(main())
