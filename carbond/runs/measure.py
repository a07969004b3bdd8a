"""One `carbond.track` block: measured by the daemon over its exec socket, or alone.

By the daemon: `start` moves this process into a new run; at the end `leave` moves it back,
the result is the project's counters from the first tick after the block less those before it
(`exec.remote.ProjectBaseline`, as `carbond exec` reads them), and `end` lets the daemon remove
the run's cgroup once its last process has gone. Alone: where this process may make a cgroup
(root, or a delegated sub-tree) it moves itself into one and ticks `exec`'s RunMeasurement every
second on a thread of its own; elsewhere only duration and CPU seconds are known.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Any

from carbond.commands.exec.cgroup import CgroupUnavailable, RunCgroup
from carbond.commands.exec.remote import (
    DocumentSource,
    ProjectBaseline,
    daemon_client,
    fetch_consumers,
    wait_for_tick_after,
)
from carbond.config import Config, load
from carbond.runs.client import RunsClient, RunsRefused, RunsUnavailable, SocketDocuments
from carbond.runs.moves import cgroup_of, write_pid
from carbond.tracking import TICK_SECONDS, WAIT_TICKS, TrackResult, _own_cpu_seconds
from carbond.types import ConfigError, Consumer
from carbond.workloads.cgroups import V2, CgroupRoot, detect_cgroup_root, read_counter

log = logging.getLogger(__name__)


def _root(config: Config) -> CgroupRoot | None:
    try:
        return detect_cgroup_root(config.cgroup_root, proc_root=config.proc_root)
    except ConfigError:
        return None


def _cpu_seconds(root: CgroupRoot | None, rel: str) -> float | None:
    if root is None:
        return None
    return read_counter(os.path.join(root.path, rel, root.usage_file), root.hierarchy == V2)


class DaemonBlock:
    def __init__(self, project: str, config: Config, client: RunsClient,
                 listen: str | None) -> None:
        self.pid = os.getpid()
        self.config = config
        self.client = client
        self.root = _root(config)
        self.started_wall, self.started = time.time(), time.monotonic()
        self.run = client.start(project)  # raises before anything changed
        self.project = self.run.project
        self.docs: DocumentSource = (daemon_client(config) if listen
                                     else SocketDocuments(client, self.project))
        before = fetch_consumers(self.docs)
        self.baseline = (ProjectBaseline(self.docs, self.project, before,
                                         config.interval_seconds)
                         if before is not None else None)
        self.cpu_start = _cpu_seconds(self.root, self.run.cgroup) or 0.0

    def finish(self) -> TrackResult:
        from carbond.commands.exec import _daemon_figures

        ended_wall, duration = time.time(), time.monotonic() - self.started
        cpu = _cpu_seconds(self.root, self.run.cgroup)
        notes: list[str] = []
        gone = False
        try:
            self.client.leave(self.run.run)
        except RunsUnavailable as exc:
            gone = True
            notes.append(f"the daemon went away mid-block ({exc}): this process stays in the "
                         f"run's cgroup {self.run.cgroup}, the project's until it exits")
        except RunsRefused as exc:  # a block in another thread moved the process meanwhile
            notes.append(f"the daemon did not move this process out of the run: {exc}")
        result = TrackResult(self.project, duration,
                             None if cpu is None else max(0.0, cpu - self.cpu_start),
                             0.0, 0.0, 0.0, None, None, None, "alone",
                             started=self.started_wall, ended=ended_wall, notes=notes)
        after = None
        if self.baseline is not None and not gone:
            wait = WAIT_TICKS * self.config.interval_seconds + 2.0
            after = wait_for_tick_after(self.docs, ended_wall, wait)
        if self.baseline is not None and after is not None:
            figures = _daemon_figures(self.baseline.result(after), after, self.project)
            if figures is not None:
                joules, grams, per_kwh, providers, zone = figures
                result.cpu_joules, result.dram_joules = joules["cpu"], joules["dram"]
                result.gpu_joules, result.grams, result.grams_per_kwh = (
                    joules["gpu"], grams, per_kwh)
                result.provider = providers[0] if providers else None
                result.zone, result.measured_by = zone, "daemon"
            else:
                notes.append("the daemon does not list the project (folded into 'other' past "
                             "max_consumers?): energy unknown")
        else:
            if self.baseline is not None:
                self.baseline.stop()
            if not gone:
                notes.append("the daemon gave no counters after the block: energy unknown")
        with contextlib.suppress(RunsUnavailable, RunsRefused):
            self.client.end(self.run.run)
        return result


class AloneBlock:
    """No daemon: this process in a cgroup of its own (where it may make one), measured by the
    daemon's pipeline run here; else duration and CPU seconds only."""

    def __init__(self, project: str, config: Config, why: str) -> None:
        self.pid = os.getpid()
        self.project = project
        self.config = config
        self.notes = [f"no daemon measured the block ({why}): measured alone"]
        self.started_wall, self.started = time.time(), time.monotonic()
        self.cpu_start = _own_cpu_seconds()
        self.cgroup: RunCgroup | None = None
        self.measurement: Any = None
        self.origin: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        root = _root(config)
        if root is not None:
            self._enter(root)

    def _enter(self, root: CgroupRoot) -> None:
        from carbond.commands.build import build_feed
        from carbond.commands.exec.measure import FeedStarter, RunMeasurement, RunPricing

        try:
            cgroup = RunCgroup.create(root, self.project, str(uuid.uuid4()))
        except (CgroupUnavailable, OSError) as exc:
            self.notes.append(f"no cgroup of its own ({exc}): energy not measured")
            return
        self.origin = cgroup_of(self.pid, root)
        try:
            self.measurement = RunMeasurement(self.config, cgroup, Consumer("project",
                                              self.project), TICK_SECONDS)
            feed, choice = build_feed(self.config)
            self.pricing = RunPricing(self.config.pue, zone=choice.zone)
            self.starter = FeedStarter(feed)
            write_pid(cgroup.path, self.pid)
        except Exception as exc:  # measuring serves the block, never fails it
            log.debug("alone measurement failed", exc_info=True)
            self.notes.append(f"cannot measure: {type(exc).__name__}: {exc}")
            if self.measurement is not None:
                self.measurement.close()
            self.measurement = None
            cgroup.remove()
            return
        self.cgroup = cgroup
        self._thread = threading.Thread(target=self._ticks, name="carbond-track", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        with self._lock:
            if self.measurement is None:
                return
            try:
                self.pricing.add(self.measurement.tick(), self.starter.current())
            except Exception as exc:
                self.notes.append(f"stopped measuring: {type(exc).__name__}: {exc}")
                self.measurement.close()
                self.measurement = None

    def _ticks(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            self._tick()

    def finish(self) -> TrackResult:
        ended_wall, duration = time.time(), time.monotonic() - self.started
        result = TrackResult(self.project, duration, _own_cpu_seconds() - self.cpu_start,
                             0.0, 0.0, 0.0, None, None, None, "alone",
                             started=self.started_wall, ended=ended_wall, notes=self.notes)
        if self.cgroup is None:
            return result
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        root = self.cgroup.root
        with contextlib.suppress(OSError):
            write_pid(os.path.join(root.path, self.origin or ""), self.pid)
        self._tick()
        self.pricing.add(0.0, self.starter.settle())
        self.starter.stop()
        measurement = self.measurement
        if measurement is not None:
            result.cpu_seconds = measurement.cpu_seconds
            result.cpu_joules = measurement.joules.get("cpu", 0.0)
            result.dram_joules = measurement.joules.get("dram", 0.0)
            result.gpu_joules = measurement.joules.get("gpu", 0.0)
            result.grams = self.pricing.grams if self.pricing.pending_joules == 0 else None
            result.grams_per_kwh = self.pricing.grams_per_kwh
            names = self.pricing.provider_names()
            result.provider = names[0] if names else None
            result.zone = self.pricing.zone
            measurement.close()
        self.cgroup.remove()
        return result


def start_block(project: str, listen: str | None, socket: str | None,
                config_path: str | None) -> DaemonBlock | AloneBlock:
    config = load(config_path, {"--listen": listen} if listen else {})
    path = socket or config.exec_socket
    if not path:
        return AloneBlock(project, config, "exec_socket is off")
    client = RunsClient(path)
    try:
        return DaemonBlock(project, config, client, listen)
    except (RunsUnavailable, RunsRefused) as exc:
        return AloneBlock(project, config, str(exc))
