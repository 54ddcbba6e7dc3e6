"""benchmarks.hostload: the host's CPU steal and busy time, from /proc/stat."""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

from benchmarks import hostload
from benchmarks.hostload import cpu_ticks, shares


def test_shares_split_the_cpu_time_between_two_readings():
    # user nice system idle iowait irq softirq steal, in ticks (as /proc/stat's first line holds them)
    before, after = [100, 0, 20, 500, 5, 0, 1, 10], [160, 10, 40, 540, 15, 0, 1, 70]  # 200 ticks pass
    ticks = os.sysconf("SC_CLK_TCK")
    assert shares(before, after) == {"steal_pct": 30.0, "busy_pct": 45.0, "plain_pct": 30.0,
                                     "cpu_seconds": round(90 / ticks, 2)}
    assert shares(before, before) == {} and shares(None, after) == {}
    now = cpu_ticks()  # this machine's own counters: eight fields that only grow
    assert now is not None and len(now) == 8 and all(b >= a for a, b in zip(now, cpu_ticks()))


def test_the_check_keeps_its_processes_busy_and_says_what_the_host_took(capsys):
    assert hostload.main(["--seconds", "1", "--processes", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["processes"], out["seconds"]) == (1, 1.0) and len(out["m_iterations_per_s"]) == 1
    assert out["m_iterations_per_s"][0] > 0
    # One process kept busy for 1 s: the machine was busy at least that long, less what was stolen from it.
    assert 0.0 <= out["steal_pct"] < 100.0 and 0.0 < out["busy_pct"] <= 100.0 and out["cpu_seconds"] > 0.25
    assert out["probe_seconds"] > 0


def test_the_probe_leaves_torch_as_it_found_it_and_flags_the_fits_it_found_slowed():
    import torch

    from benchmarks.pruning_tables import _probe_line

    threads = torch.get_num_threads()
    assert hostload.probe() > 0 and torch.get_num_threads() == threads
    runs = [{"noise": "n", "seed": s, "policy": p, "host_probe_seconds": t}
            for s, p, t in ((0, "full", [1.0, 1.0]), (0, "mmdp", [0.98, 1.3]), (1, "full", [1.0, 1.02]))]
    assert _probe_line(runs) == ["A fixed torch workload (one thread) timed before and after each fit took 1.00 s at "
                                 "the median, 0.98 to 1.30 s; fits with a time above 1.25x the median: "
                                 "n seed 0 mmdp (1.30x)."]
    assert _probe_line(runs[:1] + runs[2:])[0].endswith("the median: none.") and _probe_line([{}]) == []


def _spin_niced(cpu_seconds: float) -> None:
    """Busy for ``cpu_seconds`` of this process's own CPU time at nice 15, as Ray runs its workers."""
    os.nice(15)
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:  # (the clock is a system call: read it between runs of user code)
        sum(range(100_000))


def test_niced_work_is_not_plain_and_the_table_says_what_was():
    from benchmarks.pruning_tables import _plain_line

    # A process at nice 15 (as Ray's workers run) spends 0.5 s of CPU: the kernel counts it as nice time,
    # the column after user, so plain_pct (user time alone) does not hold it.
    before = cpu_ticks()
    with ProcessPoolExecutor(1) as pool:
        pool.submit(_spin_niced, 0.5).result()
    after = cpu_ticks()
    assert (after[1] - before[1]) / os.sysconf("SC_CLK_TCK") >= 0.4
    runs = [{"noise": "n", "seed": s, "policy": p, "host_plain_pct": v}
            for s, p, v in ((0, "full", 2.0), (0, "mmdp", 9.5), (1, "full", 1.0))]
    assert _plain_line(runs)[0].endswith("mean 4.2%, 1.0% to 9.5% of the machine's time (highest: n seed 0 mmdp).")
    assert _plain_line([{}]) == []


def test_bad_flags_are_usage_errors(capsys):
    for flags in (["--seconds", "0"], ["--processes", "0"]):
        try:
            rc = hostload.main(flags)
        except SystemExit as exc:
            rc = exc.code
        assert rc == 2 and "--seconds must be > 0" in capsys.readouterr().err
