"""benchmarks.hostload: the host's CPU steal and busy time, from /proc/stat."""
from __future__ import annotations

import json
import os

from benchmarks import hostload
from benchmarks.hostload import cpu_ticks, shares


def test_shares_split_the_cpu_time_between_two_readings():
    # user nice system idle iowait irq softirq steal, in ticks (as /proc/stat's first line holds them)
    before, after = [100, 0, 20, 500, 5, 0, 1, 10], [160, 10, 40, 540, 15, 0, 1, 70]  # 200 ticks pass
    ticks = os.sysconf("SC_CLK_TCK")
    assert shares(before, after) == {"steal_pct": 30.0, "busy_pct": 45.0, "cpu_seconds": round(90 / ticks, 2)}
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


def test_bad_flags_are_usage_errors(capsys):
    for flags in (["--seconds", "0"], ["--processes", "0"]):
        try:
            rc = hostload.main(flags)
        except SystemExit as exc:
            rc = exc.code
        assert rc == 2 and "--seconds must be > 0" in capsys.readouterr().err
