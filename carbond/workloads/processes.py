"""Per-process CPU time for tasks in the root cgroup (hosts without systemd).

Each process is read from `/proc/PID/stat` (utime + stime, clock ticks) and cached by
(pid, starttime), so a reused pid is never mistaken for the old process. Consumers are
`Consumer("process", comm)`. A process that exits between ticks is finished off with its
taskstats exit record: only the part after its last `/proc` reading is added (final total minus
last reading), so no CPU time is counted twice.

A process that lived and died between two ticks belongs to the root cgroup for certain only
where /proc showed its cgroup at exit (v2). Otherwise (always on v1, where an exiting task
shows ``/``) its record's likely cgroup, else its parents', is a guess, and guessed time is
capped by the collector.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from carbond.types import Consumer
from carbond.workloads.kernfiles import OpenFiles, descriptor_budget, mount_fstype, read_head
from carbond.workloads.taskstats import PF_EXITING, TaskExit

# ac_btime and /proc/stat's btime are whole seconds: a start this long before the last tick
# surely came before it.
START_SLACK_SECONDS = 2.0


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    cpu_seconds: float  # utime + stime
    starttime: int  # clock ticks after boot: with pid, the process identity
    children_seconds: float = 0.0  # cutime + cstime: exact time of reaped descendants


def parse_stat(pid: int, text: str, clock_ticks: int) -> ProcStat | None:
    """Parse `/proc/PID/stat`; comm may hold spaces and parentheses, so split at the last ')'."""
    open_paren, close_paren = text.find("("), text.rfind(")")
    if open_paren < 0 or close_paren < 0:
        return None
    rest = text[close_paren + 2 :].split()
    try:
        # rest[0] is field 3 (state): field n is rest[n - 3]
        return ProcStat(
            pid,
            text[open_paren + 1 : close_paren],
            int(rest[1]),
            (int(rest[11]) + int(rest[12])) / clock_ticks,
            int(rest[19]),
            (int(rest[13]) + int(rest[14])) / clock_ticks,
        )
    except (IndexError, ValueError):
        return None


def read_pids(procs_file: str) -> list[int]:
    """Pids listed in a cgroup.procs file (empty when unreadable)."""
    try:
        with open(procs_file, "rb") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def boot_time_epoch(proc_root: str = "/proc") -> float | None:
    try:
        with open(f"{proc_root}/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@dataclass
class ProcessTick:
    """`usage`: CPU seconds per process consumer that surely ran in the root cgroup;
    `guessed`: exits that lived and died between ticks and are root-cgroup tasks only by
    inheritance from their parent (the collector caps these by the root's unexplained time)."""

    usage: dict[Consumer, float]
    guessed: dict[Consumer, float]


@dataclass(slots=True)
class _Seen:
    stat: ProcStat
    tick: int
    raw: bytes = b""  # the /proc/PID/stat text it was parsed from


class ProcessTracker:
    """Per-process CPU deltas for a given set of pids (the root cgroup's cgroup.procs)."""

    def __init__(
        self,
        proc_root: str = "/proc",
        clock_ticks: int | None = None,
        boottime: float | None = None,
    ) -> None:
        self.proc_root = proc_root
        self.clock_ticks = clock_ticks or os.sysconf("SC_CLK_TCK")
        self.boot_epoch = boottime if boottime is not None else boot_time_epoch(proc_root)
        self._seen: dict[int, _Seen] = {}
        self._tick = 0
        self._last_boottime: float | None = None
        on_procfs = mount_fstype(proc_root) == "proc"
        self._files = OpenFiles(descriptor_budget() if on_procfs else 0)

    def _read(self, pids: Iterable[int]) -> tuple[dict[int, ProcStat], dict[int, bytes]]:
        """Stats of the pids that could be read, and their raw text.

        A sleeping process's stat text is byte-for-byte what it was last tick (same process,
        no CPU time, no faults), so it is only parsed again when it changed.
        """
        live: dict[int, ProcStat] = {}
        raw: dict[int, bytes] = {}
        seen, read, proc_root = self._seen, self._files.read, self.proc_root
        for pid in pids:
            data = read(pid, f"{proc_root}/{pid}/stat", 4096)
            if data is None:
                continue
            last = seen.get(pid)
            if last is not None and last.raw == data:
                stat: ProcStat | None = last.stat
            else:
                stat = parse_stat(pid, data.decode("utf-8", "backslashreplace"), self.clock_ticks)
                if stat is None:
                    continue
            live[pid] = stat
            raw[pid] = data
        return live, raw

    def tick(
        self,
        pids: Iterable[int],
        exits: Sequence[TaskExit] = (),
        root_cgroup: str = "/",
        now_boottime: float | None = None,
    ) -> ProcessTick:
        """Read the pids, finish exited processes, return this interval's CPU seconds."""
        now = time.clock_gettime(time.CLOCK_BOOTTIME) if now_boottime is None else now_boottime
        first, last_boot = self._last_boottime is None, self._last_boottime
        self._last_boottime = now
        self._tick += 1
        usage: dict[Consumer, float] = {}
        guessed: dict[Consumer, float] = {}
        live, raw = self._read(pids)
        self._files.retain(live)

        for pid, stat in live.items():
            seen = self._seen.get(pid)
            if seen is not None and seen.stat is stat:
                grew = 0.0  # unchanged text: see _read
            elif seen is not None and seen.stat.starttime == stat.starttime:
                grew = stat.cpu_seconds - seen.stat.cpu_seconds
            elif first or last_boot is None:
                grew = 0.0
            elif stat.starttime / self.clock_ticks < last_boot - 0.05:
                grew = 0.0  # older than the last tick but not seen then: moved in, not new
            else:
                grew = stat.cpu_seconds  # born since the last tick: all of its time is new
            if grew > 0:
                key = Consumer("process", stat.comm)
                usage[key] = usage.get(key, 0.0) + grew
            else:
                usage.setdefault(Consumer("process", stat.comm), 0.0)

        self._forget_moved_out(live)
        if not first and last_boot is not None:
            self._finish_exits(exits, live, usage, guessed, root_cgroup, last_boot)

        tick = self._tick
        for pid, stat in live.items():
            seen = self._seen.get(pid)
            if seen is not None and seen.stat is stat:
                seen.tick = tick
            else:
                self._seen[pid] = _Seen(stat, tick, raw[pid])
        # Keep a vanished process one extra tick: its exit record may arrive a tick late.
        for pid in [p for p, s in self._seen.items() if s.tick < self._tick - 1]:
            del self._seen[pid]
        return ProcessTick(usage, guessed)

    def close(self) -> None:
        """Close the /proc files held open between ticks."""
        self._files.close()

    def _forget_moved_out(self, live: dict[int, ProcStat]) -> None:
        """Forget root processes that left the root cgroup alive (moved to another cgroup, as
        a shell does before exec'ing a container's or a service's work): whatever they run
        from now on, their exit included, is that cgroup's. One that is exiting or gone keeps
        its entry for its exit record (an exiting task leaves cgroup.procs, still in its
        cgroup)."""
        for pid in [p for p, s in self._seen.items() if s.tick == self._tick - 1]:
            if pid in live:
                continue
            data = read_head(f"{self.proc_root}/{pid}/stat", 4096)
            if data is None:
                continue
            stat = parse_stat(pid, data.decode("utf-8", "backslashreplace"), self.clock_ticks)
            if stat is None or stat.starttime != self._seen[pid].stat.starttime:
                continue  # the pid was reused: the process we knew has ended
            try:
                flags = int(data.rpartition(b")")[2].split()[6])
            except (IndexError, ValueError):
                continue
            if not flags & PF_EXITING:
                del self._seen[pid]

    def _lived_elsewhere(self, exit_: TaskExit, last_boot: float) -> bool:
        """Whether an exit that was not among the root's pids at the last tick had started
        before it: it was then in another cgroup, so no part of its lifetime is the root's
        (a process moved into the root since, as a cleanup evicting leftovers does, would
        otherwise bring its whole lifetime along)."""
        if exit_.start_epoch is None or self.boot_epoch is None:
            return False
        return exit_.start_epoch - self.boot_epoch < last_boot - START_SLACK_SECONDS

    def _same_process(self, seen: ProcStat, exit_: TaskExit) -> bool:
        if exit_.start_epoch is None or self.boot_epoch is None:
            return True
        started = self.boot_epoch + seen.starttime / self.clock_ticks
        return abs(started - exit_.start_epoch) <= 2.0

    def _rescale(self, exits: Sequence[TaskExit], live: dict[int, ProcStat]) -> dict[int, float]:
        """Exit estimates per pid, rescaled to their live reaper's exact cutime growth.

        Taskstats undercounts short tasks; a parent that reaped them (a shell loop, make,
        a CI runner) saw their exact total added to its cutime + cstime. Exits are grouped under
        the nearest ancestor alive at both ticks and scaled so they sum to that growth.
        """
        batch = {e.pid: e for e in exits}
        groups: dict[int, list[int]] = {}
        for exit_ in exits:
            pid, hops = exit_.ppid, 0
            while pid in batch and hops < 64:
                pid, hops = batch[pid].ppid, hops + 1
            seen, now = self._seen.get(pid), live.get(pid)
            if seen is not None and now is not None and seen.stat.starttime == now.starttime:
                groups.setdefault(pid, []).append(exit_.pid)
        scaled = {e.pid: e.cpu_seconds for e in exits}
        for reaper, pids in groups.items():
            exact = live[reaper].children_seconds - self._seen[reaper].stat.children_seconds
            # Only what ran after the last reading is uncertain. A tracked exit brings its
            # lifetime and all it reaped into the reaper's growth: the part read before the
            # last tick was never this batch's work, and scaling it too would hand a lagging
            # reap (a child whose record came a tick earlier) to a long-lived process.
            before: dict[int, ProcStat] = {}
            for p in pids:
                seen = self._seen.get(p)
                if seen is not None and self._same_process(seen.stat, batch[p]):
                    before[p] = seen.stat
                    exact -= seen.stat.cpu_seconds + seen.stat.children_seconds
            rest = {p: batch[p].cpu_seconds - (before[p].cpu_seconds if p in before else 0.0)
                    for p in pids}
            estimate = sum(max(0.0, r) for r in rest.values())
            if exact > 0 and estimate > 0:
                factor = min(4.0, max(0.5, exact / estimate))  # bounded: reaping can lag exits
                for p in pids:
                    done = before[p].cpu_seconds if p in before else 0.0
                    scaled[p] = done + max(0.0, rest[p]) * factor
        return scaled

    def _finish_exits(
        self,
        exits: Sequence[TaskExit],
        live: dict[int, ProcStat],
        usage: dict[Consumer, float],
        guessed: dict[Consumer, float],
        root_cgroup: str,
        last_boot: float,
    ) -> None:
        unknown: dict[int, TaskExit] = {}
        root_pids = set(live) | set(self._seen)  # before finishing: dead parents count too
        total = self._rescale(exits, live)
        for exit_ in exits:
            seen = self._seen.get(exit_.pid)
            alive = live.get(exit_.pid)
            if (
                seen is not None
                and (alive is None or alive.starttime != seen.stat.starttime)
                and self._same_process(seen.stat, exit_)
            ):
                # Tracked in the root cgroup: add only what ran after its last reading.
                grew = max(0.0, total[exit_.pid] - seen.stat.cpu_seconds)
                key = Consumer("process", seen.stat.comm)
                usage[key] = usage.get(key, 0.0) + grew
                del self._seen[exit_.pid]
            elif (
                seen is None or alive is None or alive.starttime != seen.stat.starttime
            ) and not self._lived_elsewhere(exit_, last_boot):
                unknown[exit_.pid] = exit_  # lived and died between two ticks

        verdict: dict[int, bool] = {}

        def in_root(pid: int, depth: int = 0) -> bool:
            if pid in verdict:
                return verdict[pid]
            exit_ = unknown.get(pid)
            if exit_ is None:
                return pid in root_pids
            if exit_.cgroup is not None:
                result = exit_.cgroup == root_cgroup
            elif exit_.likely_cgroup is not None:
                result = exit_.likely_cgroup == root_cgroup
            else:
                result = depth < 64 and in_root(exit_.ppid, depth + 1)
            verdict[pid] = result
            return result

        for pid, exit_ in unknown.items():
            if not in_root(pid):
                continue
            key = Consumer("process", exit_.comm)
            target = usage if exit_.cgroup is not None else guessed
            target[key] = target.get(key, 0.0) + total[pid]
