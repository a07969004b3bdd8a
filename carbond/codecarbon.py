"""CodeCarbon's tracker API on carbond: change the import line and nothing else
(docs/codecarbon.md).

    from carbond.codecarbon import EmissionsTracker, OfflineEmissionsTracker, track_emissions

Each tracker is a `carbond.track` block under its project (measured by the daemon where one
runs, else alone), and `stop()` appends the row `carbond exec --output` writes to
`output_dir/output_file` (CodeCarbon 3.3's emissions.csv, 38 columns). Arguments carbond has
no use for are accepted and named in one warning; none of them is ever an error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from carbond.commands.exec.hostfacts import driver_gpu_models, host_facts
from carbond.commands.exec.summary import (
    CODECARBON_COLUMNS,
    OutputFileError,
    RunSummary,
    append_codecarbon_row,
    codecarbon_values,
    csv_cell,
)
from carbond.tracking import TrackResult, track

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "codecarbon"  # CodeCarbon's own default project_name
# Accepted, and carbond needs nothing from them (no effect worth a warning).
HARMLESS = frozenset({"log_level", "allow_multiple_runs", "logger_preamble"})
# CodeCarbon's values that mean what carbond does anyway.
SAME_AS_CARBOND: Mapping[str, tuple[Any, ...]] = {
    "tracking_mode": ("process",), "on_csv_write": ("append",), "offline": (True, False),
}


def _values(self: Any) -> OrderedDict[str, Any]:
    return OrderedDict(dataclasses.asdict(self))


# The row's values as an object, as CodeCarbon's `final_emissions_data` is one.
EmissionsData = dataclasses.make_dataclass(
    "EmissionsData", [(name, Any) for name in CODECARBON_COLUMNS],
    namespace={"values": property(_values),
               "__doc__": "One emissions.csv row: CodeCarbon's EmissionsData fields."},
    frozen=True)


def _csv_method(methods: Any) -> bool | None:
    """CodeCarbon's `output_methods` (OutputMethod enums or their names): whether CSV is in
    it; None when it is not a list of those."""
    try:
        names = {str(getattr(m, "name", getattr(m, "value", m))).lower() for m in methods}
    except TypeError:
        return None
    return "csv" in names


class EmissionsTracker:
    """CodeCarbon's `EmissionsTracker`: `start()`, `stop()` (kg CO2e), `start_task` /
    `stop_task`, `flush()`, a context manager; `final_emissions`, `final_emissions_data`.

    Mapped: `project_name`, `output_dir`, `output_file`, `save_to_file`, `output_methods`
    (CSV), `experiment_id`. carbond's own: `carbond_config` (a carbond.yaml),
    `carbond_socket` (the exec socket), `carbond_listen` (the daemon's HTTP address)."""

    def __init__(self, project_name: str | None = None, *args: Any,
                 output_dir: str | None = None, output_file: str | None = None,
                 save_to_file: bool | None = None, experiment_id: str | None = None,
                 carbond_config: str | None = None, carbond_socket: str | None = None,
                 carbond_listen: str | None = None, **others: Any) -> None:
        ignored = [name for name, value in others.items() if not _mapped(name, value)]
        if "output_methods" in others:
            csv_wanted = _csv_method(others["output_methods"])
            if csv_wanted is None:
                ignored.append("output_methods")
            elif save_to_file is None:
                save_to_file = csv_wanted
        if args:
            ignored.append(f"{len(args)} positional argument(s) after project_name")
        if project_name is not None and not _valid_project(project_name):
            ignored.append(f"project_name {project_name!r} (empty or too long: "
                           f"{DEFAULT_PROJECT!r} instead)")
            project_name = None
        if ignored:
            warnings.warn(f"carbond.codecarbon: {type(self).__name__} accepts but does not use "
                          f"{', '.join(sorted(ignored))} (docs/codecarbon.md)",
                          UserWarning, stacklevel=2)  # the caller's line: once there
        self.project_name = project_name or DEFAULT_PROJECT
        self.output_dir = output_dir if output_dir is not None else "."
        self.output_file = output_file or "emissions.csv"
        self.save_to_file = True if save_to_file is None else bool(save_to_file)
        self.experiment_id = "" if experiment_id is None else str(experiment_id)
        self.run_id = str(uuid.uuid4())
        self._carbond = {"config": carbond_config, "socket": carbond_socket,
                         "listen": carbond_listen}
        self._started: float | None = None  # monotonic, while the run is on
        self._block: track | None = None  # the run's current block (none during a task)
        self._segments: list[TrackResult] = []  # the run's ended blocks
        self._task: tuple[str, track] | None = None
        self._tasks: dict[str, TrackResult] = {}
        self.final_emissions: float | None = None
        self.final_emissions_data: Any = None
        self.results: list[TrackResult] = []  # carbond's own figures, one per block

    # ---- CodeCarbon's methods ----------------------------------------------------------------

    def start(self) -> None:
        if self._started is not None:
            log.warning("carbond.codecarbon: tracker already started")
            return
        self._tasks.clear()
        self._segments.clear()
        self._started = time.monotonic()
        self._block = self._enter()

    def stop(self) -> float | None:
        """End the run, append its row; kg CO2e (None when it was never started)."""
        if self._task is not None:
            self.stop_task()
        started, self._started = self._started, None
        if started is None and not self._tasks:
            log.warning("carbond.codecarbon: tracker already stopped or never started")
            return self.final_emissions
        self._leave_run()
        parts = [*self._segments, *self._tasks.values()]
        duration = (time.monotonic() - started if started is not None
                    else sum(p.duration_seconds for p in parts))  # tasks without start()
        result = _combined(self.project_name, parts, duration)
        self.results = parts
        values = self._row(result)
        self.final_emissions_data = EmissionsData(**values)
        self.final_emissions = values["emissions"]
        for note in result.notes:
            log.warning("carbond.codecarbon: %s", note)
        if self.save_to_file:
            self._append(values)
        return self.final_emissions

    def start_task(self, task_name: str | None = None) -> None:
        """A task is a block of its own between two blocks of the run (blocks of one project
        never overlap, so none is counted twice); the run's total includes its tasks, as
        CodeCarbon's does."""
        if self._task is not None:
            log.warning("carbond.codecarbon: a task is already under measure")
            return
        name = task_name or str(uuid.uuid4())
        if name in self._tasks:
            name += "_" + str(uuid.uuid4())
        self._leave_run()
        self._task = (name, self._enter())

    def stop_task(self, task_name: str | None = None) -> Any:
        """The task's EmissionsData; None when no task is running."""
        if self._task is None:
            log.warning("carbond.codecarbon: stop_task: no active task to stop")
            return None
        name, block = self._task
        self._task = None
        block.__exit__(None, None, None)
        if self._started is not None:
            self._block = self._enter()  # the run goes on
        if block.result is None:
            return None
        self._tasks[name] = block.result
        return EmissionsData(**self._row(block.result))

    def flush(self) -> float | None:
        """Not supported: a run's figures come at its end (CodeCarbon writes a row so far)."""
        warnings.warn("carbond.codecarbon: flush() writes nothing; stop() writes the row",
                      UserWarning, stacklevel=2)
        return None

    def __enter__(self) -> EmissionsTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the row -----------------------------------------------------------------------------

    def _enter(self) -> track:
        block = track(self.project_name, listen=self._carbond["listen"],
                      socket=self._carbond["socket"], config=self._carbond["config"])
        block.__enter__()
        return block

    def _leave_run(self) -> None:
        """End the run's current block, keeping its result."""
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(None, None, None)
            if block.result is not None:
                self._segments.append(block.result)

    def _row(self, result: TrackResult) -> dict[str, Any]:
        pue, proc_root = _settings(self._carbond["config"])
        summary = RunSummary(
            project=result.project, run_id=self.run_id, command=list(sys.argv),
            exit_status=0, started=result.started, ended=result.ended,
            duration_seconds=result.duration_seconds, cpu_seconds=result.cpu_seconds,
            joules={"cpu": result.cpu_joules, "dram": result.dram_joules,
                    "gpu": result.gpu_joules},
            grams=result.grams, grams_per_kwh=result.grams_per_kwh,
            providers=[result.provider] if result.provider else [], zone=result.zone,
            pue=pue, measured_by=result.measured_by, notes=list(result.notes))
        host = host_facts(result.zone, proc_root, driver_gpu_models(proc_root))
        values = codecarbon_values(summary, host)
        values["experiment_id"] = self.experiment_id
        return values

    def _append(self, values: Mapping[str, Any]) -> None:
        path = os.path.join(self.output_dir, self.output_file)
        try:
            append_codecarbon_row(path, {key: csv_cell(value) for key, value in values.items()})
        except OutputFileError as exc:  # the run is measured and recorded: only the row is lost
            log.error("carbond.codecarbon: cannot append to %s: %s", path, exc)


class OfflineEmissionsTracker(EmissionsTracker):
    """CodeCarbon's offline tracker. carbond prices with its own zone and intensity providers
    (the daemon's, or the config's), so `country_iso_code`, `region`, `cloud_provider` and
    `cloud_region` are accepted and named in the warning."""


def track_emissions(fn: Callable[..., Any] | None = None, **arguments: Any) -> Any:
    """CodeCarbon's decorator, with or without arguments: each call of the function is one
    run (an OfflineEmissionsTracker with `offline=True`, as CodeCarbon chooses)."""
    kind = OfflineEmissionsTracker if arguments.get("offline") else EmissionsTracker

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tracker = kind(**arguments)
            tracker.start()
            try:
                return function(*args, **kwargs)
            finally:
                tracker.stop()

        return wrapped

    return decorate(fn) if fn is not None else decorate


# ---- helpers -----------------------------------------------------------------------------------


def _mapped(name: str, value: Any) -> bool:
    """Whether an argument carbond does not read changes nothing (no warning)."""
    if name in HARMLESS or value is None:
        return True
    if name == "output_methods":
        return True  # read by the caller
    return name in SAME_AS_CARBOND and value in SAME_AS_CARBOND[name]


def _valid_project(name: str) -> bool:
    from carbond.workloads.naming import encode_project

    try:
        encode_project(name)
    except ValueError:
        return False
    return True


def _settings(config_path: str | None) -> tuple[float, str]:
    """The PUE carbond priced with (energy columns include it, as CodeCarbon's do) and the
    /proc the host columns come from."""
    from carbond.config import load
    from carbond.types import ConfigError

    try:
        config = load(config_path, {})
    except (ConfigError, OSError):
        return 1.0, "/proc"
    return config.pue, config.proc_root


def _combined(project: str, parts: list[TrackResult], duration: float) -> TrackResult:
    """The run: its blocks and its tasks' (one after another, never overlapping)."""
    if not parts:
        now = time.time()
        return TrackResult(project, duration, None, 0.0, 0.0, 0.0, None, None, None, "alone",
                           started=now - duration, ended=now, notes=["nothing was measured"])
    cpu = [p.cpu_seconds for p in parts]
    grams = [p.grams for p in parts]
    return TrackResult(
        project=project, duration_seconds=duration,
        cpu_seconds=None if any(c is None for c in cpu) else sum(c or 0.0 for c in cpu),
        cpu_joules=sum(p.cpu_joules for p in parts),
        dram_joules=sum(p.dram_joules for p in parts),
        gpu_joules=sum(p.gpu_joules for p in parts),
        grams=None if any(g is None for g in grams) else sum(g or 0.0 for g in grams),
        grams_per_kwh=_weighted_intensity(parts),
        provider=next((p.provider for p in parts if p.provider), None),
        measured_by=("daemon" if all(p.measured_by == "daemon" for p in parts) else "alone"),
        zone=next((p.zone for p in parts if p.zone), ""),
        started=min(p.started for p in parts), ended=max(p.ended for p in parts),
        notes=list(dict.fromkeys(note for p in parts for note in p.notes)),
    )


def _weighted_intensity(parts: list[TrackResult]) -> float | None:
    """The energy-weighted mean intensity the parts were priced at."""
    priced = [(p.grams_per_kwh, p.joules) for p in parts if p.grams_per_kwh is not None]
    energy = sum(joules for _, joules in priced)
    if energy > 0:
        return sum((value or 0.0) * joules for value, joules in priced) / energy
    return priced[0][0] if priced else None


__all__ = ["EmissionsData", "EmissionsTracker", "OfflineEmissionsTracker", "track_emissions"]
