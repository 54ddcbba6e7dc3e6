"""How much of the host's CPU time went to others while a benchmark ran, read from /proc/stat (Linux).

On a virtual machine, *steal* is the time a virtual CPU was ready to run but
the hypervisor ran another tenant instead. It shows in no process of ours,
yet it slows every timed phase. The pruning benchmark records it per run,
so a run that other load disturbed is found from a measurement, not
guessed from a slow epoch. /proc/stat is the kernel's: in a container
that does not virtualise it, the figures are the whole host's.

Run as a command, it asks: is this host quiet enough to benchmark on now?
It keeps ``--processes`` processes busy for ``--seconds`` and prints the
steal they met and each one's rate (a quiet host: steal near 0%, every
process at a single one's rate), then times :func:`probe`, the fixed torch
workload the pruning benchmark times around every fit. Local::

    python -m benchmarks.hostload --seconds 20

On a cluster (it measures the node the job's driver runs on)::

    ray job submit --working-dir . -- python -m benchmarks.hostload --seconds 20
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from benchmarks.procmem import TICKS_PER_SECOND
from pipeline.cli import option, run_job

# /proc/stat's first line: cpu user nice system idle iowait irq softirq steal guest guest_nice, in ticks.
# guest and guest_nice are already counted in user and nice, so the total is the first eight.
_FIELDS = 8
_USER, _STEAL, _IDLE, _IOWAIT = 0, 7, 3, 4


def cpu_ticks() -> list[int] | None:
    """The machine's cumulative CPU ticks, all CPUs summed; None where /proc/stat is not readable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 1 + _FIELDS:
        return None
    return [int(v) for v in fields[1:1 + _FIELDS]]


def shares(before: list[int] | None, after: list[int] | None) -> dict:
    """The CPU time between two :func:`cpu_ticks` readings: the percent stolen by other tenants
    (``steal_pct``), the percent busy (``busy_pct``: neither idle, nor waiting on I/O, nor stolen),
    the percent spent in user code at plain priority (``plain_pct``: processes at nice <= 0; Ray
    starts its worker processes at nice 15, whose time the kernel counts apart, so during a fit this
    is the driver's, Ray's daemons' and any other plain process's, which the scheduler serves first),
    and the busy CPU seconds (``cpu_seconds``, all CPUs summed: the work done, which steal does not
    inflate as it does wall time); empty where either reading is missing or no tick passed."""
    if before is None or after is None:
        return {}
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0:
        return {}
    busy = total - delta[_IDLE] - delta[_IOWAIT] - delta[_STEAL]
    return {"steal_pct": round(100.0 * delta[_STEAL] / total, 1), "busy_pct": round(100.0 * busy / total, 1),
            "plain_pct": round(100.0 * delta[_USER] / total, 1),
            "cpu_seconds": round(busy / TICKS_PER_SECOND, 2)}


PROBE_STEPS = 20  # forward and backward passes the probe times (about 1 s on one core here)


def probe() -> float:
    """Seconds a fixed workload takes now on one torch thread: a small conv net's forward and backward
    on a fixed batch, :data:`PROBE_STEPS` times (after one untimed pass).

    The host's speed, measured. Steal catches a tenant taking our virtual
    CPU; it misses one sharing the physical core or the memory bandwidth,
    which slows the same code as surely. The pruning benchmark times this
    before and after every fit, so that a fit on a slowed host shows as one.
    Restores torch's thread count.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(16 * 28 * 28, 10))

        def step():
            net.zero_grad()
            net(x).square().mean().backward()

        step()
        start = time.perf_counter()
        for _ in range(PROBE_STEPS):
            step()
        return round(time.perf_counter() - start, 3)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class HostLoadConfig:
    """The check's knobs; one field per command-line flag."""

    seconds: float = option(20.0, "how long each process stays busy")
    processes: int = option(os.cpu_count() or 1, "busy processes, one a core of this machine by default")

    def __post_init__(self):
        if self.seconds <= 0 or self.processes < 1:
            raise ValueError("--seconds must be > 0 and --processes >= 1")


def _spin(seconds: float) -> float:
    """Loop iterations a second, counted for ``seconds`` of wall time."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    return n / seconds


def check(cfg: HostLoadConfig) -> dict:
    """Steal and busy shares while ``cfg.processes`` processes spin, each one's rate (M iterations/s),
    and the :func:`probe`'s seconds on the quiet machine after them."""
    with ProcessPoolExecutor(cfg.processes) as pool:
        list(pool.map(_spin, [0.05] * cfg.processes))  # every worker started before the clock does
        before = cpu_ticks()
        rates = list(pool.map(_spin, [cfg.seconds] * cfg.processes))
        host = shares(before, cpu_ticks())
    return {**host, "processes": cfg.processes, "seconds": cfg.seconds,
            "m_iterations_per_s": [round(r / 1e6, 3) for r in rates], "probe_seconds": probe()}


def main(argv=None) -> int:
    return run_job(HostLoadConfig, argv, check, doc=__doc__, prog="python -m benchmarks.hostload")


if __name__ == "__main__":
    sys.exit(main())
