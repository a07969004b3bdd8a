"""Exits inside a short-lived top-level cgroup are that cgroup's, on real v1 and v2 trees.

A cgroup created and removed between two collector ticks, with short CPU-burning processes
inside, must get its kernel CPU time; none of it may go to a `process` consumer of the root
cgroup. On v1 an exiting task's /proc/PID/cgroup shows ``/`` (the kernel's v1 rule for
exiting tasks), which once made every such exit a certain root-cgroup process (issue 10,
item 3).
"""

from __future__ import annotations

import math
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carbond.types import Consumer
from carbond.workloads.cgroups import CgroupReader, cgroup_root, read_usage_tree
from carbond.workloads.cpu import CpuUsage, CpuUsageCollector
from carbond.workloads.naming import CgroupNamer
from carbond.workloads.processes import ProcessTracker
from carbond.workloads.taskstats import TaskExit, TaskstatsListener, probe_taskstats
from tests.cgroup_helpers import available, hierarchy_path, remove_tree

BURNERS = 10
BURN_CPU_SECONDS = 0.2
ATTEMPTS = 4  # another test's top-level cgroup vanishing in the same tick shares the time

# Sets its own comm, so its exit record and /proc name can't be confused with anything else.
BURN = """
import sys, time
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[1])
while time.process_time() < float(sys.argv[2]):
    pass
"""


class HeldExits:
    """The listener's exits, drained early so the test can wait for its own records."""

    def __init__(self, listener: TaskstatsListener) -> None:
        self.listener = listener
        self.held: list[TaskExit] = []

    def poll(self) -> list[TaskExit]:
        self.held.extend(self.listener.drain())
        return self.held

    def drain(self) -> list[TaskExit]:
        held, self.held = self.poll(), []
        return held

    def stop(self) -> None:
        self.listener.stop()


def _in_root(hierarchy: str) -> bool:
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for number, controllers, path in lines:
        if hierarchy == "v2" and number == "0" and controllers == "":
            return path == "/"
        if hierarchy == "v1" and "cpuacct" in controllers.split(","):
            return path == "/"
    return False


@pytest.fixture(params=["v2", "v1"])
def collector(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[str, CpuUsageCollector, HeldExits]]:
    """The collector the daemon builds for the WHOLE hierarchy, with process tracking."""
    hierarchy = request.param
    why = available(hierarchy)
    if why:
        pytest.skip(why)
    if not _in_root(hierarchy):
        pytest.skip(f"the test process must sit in the {hierarchy} root cgroup")
    ok, why = probe_taskstats()
    if not ok:
        pytest.skip(why)
    root = cgroup_root(hierarchy_path(hierarchy))
    assert root.hierarchy == hierarchy and root.rel == "/"
    listener = TaskstatsListener(hierarchy=hierarchy)
    assert listener.start()
    held = HeldExits(listener)
    made = CpuUsageCollector(CgroupReader(root, CgroupNamer()), ProcessTracker(), held)
    try:
        yield hierarchy, made, held
    finally:
        made.close()


def _vanished_others(made: CpuUsageCollector, usage: CpuUsage, ours: Consumer) -> set[Consumer]:
    """Consumers given time this tick whose cgroup is gone, other than ours."""
    namer = made.reader.namer
    live = {namer(path) for path in read_usage_tree(made.reader.root) if path}
    return {
        c for c, seconds in usage.usage.items()
        if seconds > 0 and c.kind != "process" and c.name != "/" and c not in live and c != ours
    }


def _run_in_short_lived_cgroup(
    hierarchy: str, made: CpuUsageCollector, held: HeldExits, tmp_path: Path
) -> tuple[float, CpuUsage, Consumer, float, set[Consumer]]:
    """One tick around a top-level cgroup that lives and dies inside it; returns (the cgroup's
    kernel CPU seconds, the tick, its consumer, CPU seconds of our comms as process
    consumers, other vanished consumers)."""
    tag = secrets.token_hex(3)
    shell, burner = tmp_path / f"cbsh{tag}", f"cbburn{tag}"
    shutil.copy("/bin/sh", shell)
    name = f"carbond-exits-{tag}.service"
    path = os.path.join(hierarchy_path(hierarchy), name)
    made.tick()  # a fresh interval for this attempt
    os.mkdir(path)
    try:
        python = shlex.quote(sys.executable)
        burn = f"{python} -S -c {shlex.quote(BURN)} {burner} {BURN_CPU_SECONDS}"
        script = (
            f"echo $$ > {shlex.quote(path)}/cgroup.procs || exit 3; "
            f"i=0; while [ $i -lt {BURNERS} ]; do {burn} || exit 4; i=$((i+1)); done"
        )
        loop = subprocess.Popen([str(shell), "-c", script], stdin=subprocess.DEVNULL)
        assert loop.wait(timeout=120) == 0
        with open(os.path.join(path, "cpuacct.usage" if hierarchy == "v1" else "cpu.stat")) as f:
            text = f.read()
        kernel = int(text) / 1e9 if hierarchy == "v1" else int(text.split()[1]) / 1e6
    finally:
        remove_tree(path)
    # Every record is sent before its parent can reap the task: wait until all are handled.
    deadline = time.monotonic() + 10
    while True:
        ours = [e for e in held.poll() if e.comm in (burner, shell.name)]
        if len(ours) >= BURNERS + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(ours) == BURNERS + 1
    usage = made.tick()
    consumer = made.reader.namer(name)
    phantom = math.fsum(
        s for c, s in usage.usage.items() if c.kind == "process" and c.name in (burner, shell.name)
    )
    return kernel, usage, consumer, phantom, _vanished_others(made, usage, consumer)


def test_exits_in_a_short_lived_top_level_cgroup_stay_there(collector, tmp_path: Path) -> None:
    hierarchy, made, held = collector
    assert made.tick().baseline
    unclear = []
    for _ in range(ATTEMPTS):
        kernel, usage, consumer, phantom, others = _run_in_short_lived_cgroup(
            hierarchy, made, held, tmp_path
        )
        assert kernel >= BURNERS * BURN_CPU_SECONDS
        assert phantom <= 0.02 * kernel, f"{phantom:.3f} s of {kernel:.3f} s went to processes"
        # The root's unexplained time is the vanished cgroup's only if nothing else in the tick
        # competed for it: another vanished top-level cgroup, or other jobs' exits whose cgroup
        # could only be guessed (docs/cpu-accounting.md). Then try again.
        guessed = usage.details.get("guessed_cpu_seconds", 0.0)
        if not others and guessed <= 0.02 * kernel:
            assert usage.usage.get(consumer, 0.0) == pytest.approx(kernel, rel=0.05)
            return
        unclear.append((sorted(others), round(guessed, 3)))
    pytest.skip(f"other jobs competed for the root's time in every tick: {unclear}")
