"""Memory of a process tree, read from /proc (Linux), for the benchmarks.

A local Ray cluster is a tree: the driver starts the GCS, the raylet and the
dashboard, and the raylet starts the workers. :class:`PeakSampler` samples
the whole tree of a root process every ``interval`` seconds and keeps the
peak of the summed RSS and of the summed PSS (proportional set size: a page
shared by k processes, such as Ray's object store, counts 1/k in each, so
PSS sums do not double count), and what the PSS at that peak is made of:
by kind of memory (the processes' own, mapped files, shared memory: the
object store) and by group of process.

No psutil needed: it is not part of the pinned environment.
"""
from __future__ import annotations

import os
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int | None = None) -> int:
    """Resident set size of one process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


# What a process's PSS is made of (smaps_rollup): its own heap and stacks, mapped files (code,
# libraries), and shared memory (a local Ray's object store is a shared-memory mapping).
PSS_KINDS = {"Pss_Anon:": "anon", "Pss_File:": "file", "Pss_Shmem:": "shmem"}


def pss_parts(pid: int) -> dict[str, int]:
    """Proportional set size of one process in bytes, ``total`` and by :data:`PSS_KINDS` (zeros if it is gone)."""
    parts = dict.fromkeys(("total", *PSS_KINDS.values()), 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                field, kib = line.split()[:2]
                if field == "Pss:":
                    parts["total"] = int(kib) * 1024
                elif field in PSS_KINDS:
                    parts[PSS_KINDS[field]] = int(kib) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return parts


def pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 if it is gone or unreadable)."""
    return pss_parts(pid)["total"]


def cmdline(pid: int) -> str:
    """A process's command line, its arguments joined by spaces ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class _TreeSampler:
    """Calls ``sample()`` on the tree of ``root`` every ``interval`` seconds in a thread, and once more at the end.

    Use as a context manager around the work to measure.
    """

    def __init__(self, root: int | None = None, interval: float = 0.2):
        self.root, self.interval = root or os.getpid(), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PeakSampler(_TreeSampler):
    """Samples a process tree's summed RSS and PSS in a thread; ``peak_rss`` / ``peak_pss`` in bytes.

    Use as a context manager around the work to measure.
    """

    def __init__(self, root: int | None = None, interval: float = 0.2, titles: tuple[str, ...] = ()):
        super().__init__(root, interval)
        self.peak_rss = self.peak_pss = 0
        self.peak_root_pss = 0  # the root process alone (a job's driver)
        # Per title: the peak summed PSS of the processes whose command line starts with it (Ray names an
        # actor's process "ray::ClassName...").
        self.titles = tuple(titles)
        self.peak_title_pss = {title: 0 for title in self.titles}
        self.peak_procs = 0
        self.samples = 0
        self.series: list[tuple[float, int]] = []  # (time.time(), tree PSS) of every sample
        # The tree's PSS at its peak, by kind (PSS_KINDS) and by group of process (cpu_group, "driver").
        self.at_peak_by_kind: dict[str, int] = {}
        self.at_peak_by_group: dict[str, int] = {}

    def sample(self) -> tuple[int, int]:
        pids = tree(self.root)
        parts = {p: pss_parts(p) for p in pids}
        total_rss, total_pss = sum(rss(p) for p in pids), sum(part["total"] for part in parts.values())
        # Command lines only where needed (a new peak's groups, the titles), read once for both.
        lines = {p: cmdline(p) for p in pids} if self.titles or total_pss > self.peak_pss else {}
        if total_pss > self.peak_pss:
            self.at_peak_by_kind = {kind: sum(part[kind] for part in parts.values()) for kind in PSS_KINDS.values()}
            self.at_peak_by_group = {}
            for p, part in parts.items():
                group = "driver" if p == self.root else cpu_group(lines[p])
                self.at_peak_by_group[group] = self.at_peak_by_group.get(group, 0) + part["total"]
        self.peak_rss, self.peak_pss = max(self.peak_rss, total_rss), max(self.peak_pss, total_pss)
        self.peak_root_pss = max(self.peak_root_pss, parts[self.root]["total"] if self.root in parts else 0)
        self.peak_procs = max(self.peak_procs, len(pids))
        for title in self.titles:
            held = sum(parts[p]["total"] for p, line in lines.items() if line.startswith(title))
            self.peak_title_pss[title] = max(self.peak_title_pss[title], held)
        self.samples += 1
        self.series.append((time.time(), total_pss))
        return total_rss, total_pss

    def peak_pss_between(self, start: float, stop: float) -> int:
        """The tree's peak PSS over the samples taken from ``start`` to ``stop`` (``time.time()``)."""
        return max((p for t, p in self.series if start <= t <= stop), default=0)


# Groups of a local Ray's processes by the start of their command line (Ray names a worker's
# process "ray::<what it runs>"); the root process is "driver", anything unmatched "other Ray workers".
CPU_GROUPS = (
    ("scoring actors", ("ray::MapWorker",)),
    ("Ray Data helper actors", ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::ActorLocationTracker")),
    ("Ray's own processes", ("ray::DashboardAgent", "ray::RuntimeEnvAgent")),
)
_RAY_DAEMONS = ("gcs_server", "raylet", "dashboard.py", "log_monitor.py", "monitor.py")
# /proc counts CPU time in clock ticks.
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND
    except (OSError, IndexError, ValueError):
        return None


def cpu_group(line: str) -> str:
    """The :data:`CPU_GROUPS` name of a non-root process's command line."""
    for name, starts in CPU_GROUPS:
        if line.startswith(starts):
            return name
    if any(daemon in part for part in line.split()[:2] for daemon in _RAY_DAEMONS):
        return "Ray's own processes"
    return "other Ray workers"


class CpuSampler(_TreeSampler):
    """CPU seconds of a process tree by :data:`CPU_GROUPS`, sampled in a thread; ``by_group()`` after use.

    Each process counts the CPU time last seen and the group of its last command line (a Ray worker
    is renamed when it takes an actor); one that exits loses at most ``interval`` of its time.
    """

    def __init__(self, root: int | None = None, interval: float = 0.2):
        super().__init__(root, interval)
        self.seen: dict[int, tuple[float, str]] = {}

    def sample(self) -> None:
        for pid in tree(self.root):
            cpu, line = cpu_seconds(pid), cmdline(pid)
            if cpu is not None and line:
                self.seen[pid] = (cpu, "driver" if pid == self.root else cpu_group(line))

    def by_group(self) -> dict[str, float]:
        """``{group: CPU seconds}``, rounded to 0.01 s, for every group seen."""
        out: dict[str, float] = {}
        for cpu, group in self.seen.values():
            out[group] = out.get(group, 0.0) + cpu
        return {group: round(value, 2) for group, value in sorted(out.items())}
