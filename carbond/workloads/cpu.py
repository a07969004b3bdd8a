"""CPU seconds per consumer for one tick: cgroups, root-cgroup processes and their exits.

The cgroup walk (`cgroups.py`) covers every non-root cgroup exactly; where user tasks live in
the root cgroup, `processes.py` splits the root's own time per process and `taskstats.py`
brings the final time of tasks that exited between ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carbond.consumers import Consumer
from carbond.workloads.cgroups import CgroupReader
from carbond.workloads.naming import ROOT_CONSUMER
from carbond.workloads.processes import ProcessTracker, read_pids
from carbond.workloads.taskstats import TaskstatsListener

# The root cgroup's own CPU time comes from tick-sampled kernel counters; exact task times can
# exceed it over a short interval (seen: 15 % with a hundred exits a second elsewhere) without
# anything being counted twice. The cap on guessed exits only has to stop gross double counts.
ROOT_SAMPLING_TOLERANCE = 0.25


@dataclass
class CpuUsage:
    """What the daemon feeds `attribution.split_energy` each tick."""

    usage: dict[Consumer, float]  # CPU seconds this tick, every consumer (root time included)
    exited_tasks: int = 0  # process exits seen by taskstats this tick (all cgroups)
    baseline: bool = False  # first tick: counters primed, usage all zero
    cgroups: int = 0
    processes: int = 0
    details: dict[str, float] = field(default_factory=dict)


class CpuUsageCollector:
    """Cgroups + root-cgroup processes + exited tasks -> CPU seconds per consumer, per tick.

    Root-cgroup time is split across processes (by comm) when a `ProcessTracker` is given;
    what no process claims (kernel, irq, lost exits) goes to ``cgroup "/"``. Exits whose
    cgroup could only be guessed from their parent are capped to the root's unexplained time,
    so a wrong guess can't inflate the total beyond what the kernel counted.
    """

    def __init__(
        self,
        reader: CgroupReader,
        processes: ProcessTracker | None = None,
        exits: TaskstatsListener | None = None,
    ) -> None:
        self.reader = reader
        self.processes = processes
        self.exits = exits

    def tick(self) -> CpuUsage:
        exits = self.exits.drain() if self.exits is not None else []
        cg = self.reader.tick()
        usage = dict(cg.usage)
        root_own = cg.root_own_cpu_seconds
        details = {"root_own_cpu_seconds": root_own}
        n_procs = 0
        claimed = 0.0
        if self.processes is not None:
            pids = read_pids(self.reader.root.procs_file)
            pt = self.processes.tick(pids, exits, self.reader.root.rel)
            n_procs = len(pids)
            certain = sum(pt.usage.values())
            guessed = sum(pt.guessed.values())
            # The root's own time is tick-sampled by the kernel while task times are exact,
            # so the cap leaves room for sampling error and only stops real double counting.
            room = max(0.0, root_own * (1.0 + ROOT_SAMPLING_TOLERANCE) - certain)
            scale = min(1.0, room / guessed) if guessed > 0 else 0.0
            for consumer, seconds in pt.usage.items():
                usage[consumer] = usage.get(consumer, 0.0) + seconds
            for consumer, seconds in pt.guessed.items():
                usage[consumer] = usage.get(consumer, 0.0) + seconds * scale
            claimed = certain + guessed * scale
            details.update(process_cpu_seconds=certain, guessed_cpu_seconds=guessed * scale)
        if not cg.baseline:
            left = max(0.0, root_own - claimed)
            owners = cg.root_vanished or (ROOT_CONSUMER,)
            for owner in owners:
                usage[owner] = usage.get(owner, 0.0) + left / len(owners)
        return CpuUsage(usage, len(exits), cg.baseline, cg.cgroups, n_procs, details)

    def close(self) -> None:
        self.reader.close()
        if self.processes is not None:
            self.processes.close()
        if self.exits is not None:
            self.exits.stop()
