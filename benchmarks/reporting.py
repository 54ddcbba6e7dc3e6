"""Benchmark the cost of loss reporting: training step time with it on vs off.

The same model, batches and optimiser train in one process; with reporting
on, every step hands its per-sample losses to a real pruning actor through
the real :class:`pipeline.prune.actor.LossReporter` (fire-and-forget, flushed at
the end of each trial, as the train loop flushes at the end of an epoch).
Trials alternate on/off/off/on so drift (other load, thermal, caches) hits
both alike; the ratio is mean on-time over mean off-time.

Local (Ray starts on this machine)::

    python -m benchmarks.reporting --steps 200 --repeats 3

On a cluster (the training loop runs on the node the job's driver runs on,
the pruning actor wherever Ray places it)::

    ray job submit --working-dir . -- python -m benchmarks.reporting --steps 200 --repeats 3

Prints the result as JSON, with the resolved config (also logged) under
``config``. Target (issue 7): ratio <= 1.03.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.cli import connect_ray, option, run_job
from pipeline.prune.policies import POLICIES


@dataclass(frozen=True)
class BenchReportingConfig:
    """The benchmark's knobs; one field per command-line flag."""

    steps: int = option(200, "training steps per trial")
    repeats: int = option(3, "on/off/off/on blocks")
    batch_size: int = option(128, "samples per step")
    num_samples: int = option(60_000, "the pruner's sample count")
    threads: int = option(1, "torch threads of the training loop")
    policy: str = option("mmdp", "the pruning actor's policy", choices=tuple(POLICIES))

    def __post_init__(self):
        if min(self.steps, self.repeats, self.batch_size, self.threads) < 1 or self.num_samples < self.batch_size:
            raise ValueError("--steps, --repeats, --batch-size, --threads must be >= 1 "
                             "and --num-samples >= --batch-size")


def run(steps: int, repeats: int, batch_size: int, num_samples: int, threads: int, policy: str) -> dict:
    import ray
    import torch
    import torch.nn.functional as F

    from pipeline.prune.actor import LossReporter, actor_name, create_pruner
    from pipeline.train.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    connect_ray(dashboard=False, log_to_driver=False)  # local by default, the cluster under ray job submit
    rng = np.random.default_rng(0)
    actor = create_pruner(actor_name("bench-" + uuid.uuid4().hex[:8]), num_samples, policy=policy,
                          consistency=rng.random(num_samples, dtype=np.float32))
    ray.get(actor.start_epoch.remote(0))
    model = build_model("resnet", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # A fixed pool of batches: both arms do exactly the same arithmetic.
    batches = [(torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,)),
                torch.from_numpy(rng.choice(num_samples, batch_size, replace=False)))
               for _ in range(16)]

    def trial(report: bool) -> float:
        reporter = LossReporter(actor) if report else None
        started = time.perf_counter()
        for step in range(steps):
            x, y, index = batches[step % len(batches)]
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if reporter is not None:
                reporter.report(index.numpy(), per_sample.detach().numpy())
        if reporter is not None:
            reporter.flush()
        return (time.perf_counter() - started) / steps

    trial(True), trial(False)  # warm-up: allocator, actor's first calls
    times = {"on": [], "off": []}
    for arm in ["on", "off", "off", "on"] * repeats:
        times[arm].append(trial(arm == "on"))
    received = ray.get(actor.losses_received.remote(0))
    ray.kill(actor)
    ratio = float(np.mean(times["on"]) / np.mean(times["off"]))
    return {"ratio": round(ratio, 4), "step_ms_on": round(1e3 * float(np.mean(times["on"])), 2),
            "step_ms_off": round(1e3 * float(np.mean(times["off"])), 2),
            "trials_on_ms": [round(1e3 * t, 2) for t in times["on"]],
            "trials_off_ms": [round(1e3 * t, 2) for t in times["off"]],
            "losses_received": int(received), "steps": steps, "repeats": repeats, "batch_size": batch_size,
            "num_samples": num_samples, "threads": threads, "policy": policy, "loadavg": os.getloadavg()[0]}


def main(argv=None) -> int:
    return run_job(BenchReportingConfig, argv, report, doc=__doc__, prog="python -m benchmarks.reporting")


def report(cfg: BenchReportingConfig) -> None:
    result = run(cfg.steps, cfg.repeats, cfg.batch_size, cfg.num_samples, cfg.threads, cfg.policy)
    print(json.dumps({**result, "config": asdict(cfg)}))
    print(f"reporting overhead ratio (on / off step time): {result['ratio']}  "
          f"({result['step_ms_on']} ms vs {result['step_ms_off']} ms a step)")


if __name__ == "__main__":
    sys.exit(main())
