"""`carbond exec`: run one command in its own cgroup and say what it cost (docs/exec.md).

The command runs in ``carbond.exec/<project>/<run>`` under the cgroup root carbond uses; the
child enters that cgroup between fork and exec, so none of its CPU time is counted outside.
SIGINT, SIGTERM and SIGHUP sent to `exec` go to the command (the terminal's own signals reach it
directly: it is in the foreground process group); `exec` exits with the command's status, 128+N
when a signal N killed it. With a daemon answering at `--listen` the daemon attributes the run
(kind="project") and its counters give the summary; without one `exec` measures the run itself
with the same meters and attribution step (`measure.py`). The cgroup is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from carbond.carbon import IntensityFeed
from carbond.carbon.zone import ZoneChoice
from carbond.commands.build import build_feed
from carbond.commands.exec.cgroup import (
    CgroupUnavailable,
    DaemonRunCgroup,
    create_run_cgroup,
)
from carbond.commands.exec.greenest import greenest_start
from carbond.commands.exec.hostfacts import host_facts
from carbond.commands.exec.measure import FeedStarter, RunMeasurement, RunPricing
from carbond.commands.exec.plan import Plan
from carbond.commands.exec.remote import (
    DocumentSource,
    ProjectBaseline,
    ProjectCounters,
    daemon_client,
    fetch_consumers,
    project_counters,
    wait_for_tick_after,
)
from carbond.commands.exec.summary import (
    OutputFileError,
    RunSummary,
    append_codecarbon_row,
    check_output_file,
    codecarbon_row,
    format_summary,
    summary_document,
)
from carbond.commands.exec.supervise import (
    EXIT_EXEC_FAILED,
    TICK_SECONDS,
    Signals,
    Supervisor,
    say,
    spawn,
)
from carbond.config import Config
from carbond.config.units import parse_seconds
from carbond.runs.client import SocketDocuments
from carbond.types import ConfigError, Consumer, name_text
from carbond.web.client import ClientConfig
from carbond.workloads.cgroups import CgroupRoot, detect_cgroup_root
from carbond.workloads.naming import encode_project

log = logging.getLogger(__name__)

DAEMON_WAIT_TICKS = 3  # after CMD ends: how many daemon intervals to wait for its next tick


@dataclass(frozen=True)
class ExecOptions:
    command: tuple[str, ...]
    project: str
    json: bool = False
    output: str | None = None
    greenest: bool = False
    deadline_seconds: float | None = None
    duration_seconds: float | None = None
    client: ClientConfig | None = None  # TLS and basic auth towards the daemon


def default_project(command: Sequence[str]) -> str:
    """The command's basename, shortened until it fits one cgroup directory name."""
    raw = os.fsencode(os.path.basename(command[0].rstrip("/"))) or b"exec"
    while raw:
        name = os.fsdecode(raw)
        try:
            encode_project(name)
            return name
        except ValueError:
            raw = raw[:-1]
    return "exec"


def _daemon_figures(start: ProjectCounters, after: dict[str, Any], project: str
                    ) -> tuple[dict[str, float], float, float | None, list[str], str] | None:
    """The project's joules and grams since `start`, the intensity applied, its provider and
    zone; None when the daemon does not list the project afterwards."""
    end = project_counters(after, project)
    if not end.present:
        return None
    joules = {c: max(0.0, end.joules.get(c, 0.0) - start.joules.get(c, 0.0))
              for c in ("cpu", "dram", "gpu")}
    grams = max(0.0, end.grams - start.grams)
    intensity = after.get("intensity") if isinstance(after.get("intensity"), dict) else {}
    pue = after.get("pue") if isinstance(after.get("pue"), (int, float)) else 1.0
    kwh = math.fsum(joules.values()) / 3.6e6
    per_kwh: float | None = grams / (kwh * pue) if kwh > 0 and pue > 0 else None
    if per_kwh is None and isinstance(intensity.get("grams_per_kwh"), (int, float)):
        per_kwh = float(intensity["grams_per_kwh"])
    provider = intensity.get("provider")
    zone = intensity.get("zone")
    return (joules, grams, per_kwh, [provider] if isinstance(provider, str) else [],
            zone if isinstance(zone, str) else "")


def run_exec(config: Config, options: ExecOptions, err: IO[str] | None = None) -> int:
    """Everything after the command line; returns the exit status."""
    err = err or sys.stderr
    if options.output:
        try:
            check_output_file(options.output)
        except OutputFileError as exc:
            raise ConfigError("--output", str(exc)) from None
    feed, choice = build_feed(config)  # bad provider options stop here, before anything runs
    try:
        root = detect_cgroup_root(config.cgroup_root, proc_root=config.proc_root)
    except ConfigError as exc:
        if config.cgroup_root:  # a configured root that is not one: bad input
            raise
        say(err, f"carbond exec: {exc.problem}")
        return EXIT_EXEC_FAILED
    signals = Signals()  # before any thread starts: every thread inherits the mask
    try:
        plan: Plan | None = None
        if options.greenest:
            plan, cancelled = greenest_start(
                feed, choice.zone, options.deadline_seconds or 0.0,
                options.duration_seconds or 0.0, signals, err)
            if cancelled is not None:
                return cancelled
        return _run(config, options, root, feed, choice, plan, signals, err)
    finally:
        signals.restore()


def _run(config: Config, options: ExecOptions, root: CgroupRoot, feed: IntensityFeed,
         choice: ZoneChoice, plan: Plan | None, signals: Signals, err: IO[str]) -> int:
    run_id = str(uuid.uuid4())
    try:
        cgroup = create_run_cgroup(root, options.project, run_id, config.exec_socket)
    except (CgroupUnavailable, OSError) as exc:
        say(err, f"carbond exec: {exc}")
        return EXIT_EXEC_FAILED
    notes: list[str] = []
    removed = False
    try:
        project = cgroup.project  # USER/PROJECT when the daemon made it for a user
        client: DocumentSource = (SocketDocuments(cgroup.client, project)
                                  if isinstance(cgroup, DaemonRunCgroup)
                                  else daemon_client(config, options.client))
        before = fetch_consumers(client)
        run_consumer = Consumer("project", project)
        measurement: RunMeasurement | None
        try:
            measurement = RunMeasurement(config, cgroup, run_consumer, TICK_SECONDS)
        except Exception as exc:  # measuring is a service to the run, never a reason to fail it
            log.debug("measurement setup failed", exc_info=True)
            notes.append(f"exec could not measure: {type(exc).__name__}: {exc}")
            measurement = None
        pricing = RunPricing(config.pue, zone=choice.zone)
        started_wall, started = time.time(), time.monotonic()
        child = spawn(options.command, cgroup, signals.old_mask, err)
        if isinstance(child, int):
            if measurement is not None:
                measurement.close()
            return child
        starter = FeedStarter(feed)
        baseline = (ProjectBaseline(client, project, before, config.interval_seconds)
                    if before is not None else None)

        def tick() -> None:
            nonlocal measurement
            if measurement is None:
                return
            try:
                pricing.add(measurement.tick(), starter.current())
            except Exception as exc:
                log.debug("measurement failed", exc_info=True)
                notes.append(f"exec stopped measuring: {type(exc).__name__}: {exc}")
                measurement.close()
                measurement = None

        status = Supervisor(child, signals, tick).wait()
        ended_wall, duration = time.time(), time.monotonic() - started
        tick()
        pricing.add(0.0, starter.settle())  # prices energy still waiting for the first fetch
        starter.stop()
        summary = RunSummary(
            project=name_text(project), run_id=run_id,
            command=[name_text(a) for a in options.command], exit_status=status,
            started=started_wall, ended=ended_wall, duration_seconds=duration,
            cpu_seconds=measurement.cpu_seconds if measurement else cgroup.cpu_seconds(),
            joules=dict(measurement.joules) if measurement else {},
            grams=pricing.grams if pricing.pending_joules == 0 else None,
            grams_per_kwh=pricing.grams_per_kwh, providers=pricing.provider_names(),
            zone=pricing.zone or choice.zone, pue=config.pue, measured_by="exec",
            cgroup=cgroup.path, plan=plan, notes=notes,
        )
        if baseline is not None:
            _from_daemon(summary, config, client, baseline, ended_wall, signals)
        elif measurement is None:
            summary.grams = None
        gpu_models = measurement.gpu_models() if measurement else []
        if measurement is not None:
            measurement.close()
        removed = cgroup.remove()
        summary.cgroup_removed = removed
        if not removed:
            left = len(cgroup.pids())
            notes.append(f"{left} process(es) of the run still run in {cgroup.path}: left in "
                         f"place, still counted under project {summary.project}; the next "
                         "carbond exec removes it once they are gone")
        _report(summary, options, config, gpu_models, err)
        return status
    finally:
        if not removed:
            cgroup.remove()


def _from_daemon(summary: RunSummary, config: Config, client: DocumentSource,
                 baseline: ProjectBaseline, ended_wall: float, signals: Signals) -> None:
    """Replace exec's own figures with the daemon's, once its first tick after the end of CMD
    is out; keep exec's (with a note) when that tick does not come in time."""
    stopped: list[int] = []

    def stop() -> bool:
        signo = signals.pending_stop()
        if signo is not None:
            stopped.append(signo)
        return bool(stopped)

    wait = DAEMON_WAIT_TICKS * config.interval_seconds + 2.0
    after = wait_for_tick_after(client, ended_wall, wait, stop)
    where = client.base.split("://", 1)[-1]
    if after is None:
        baseline.stop()
        why = "interrupted" if stopped else f"no daemon tick within {wait:g}s"
        summary.notes.append(f"the daemon at {where} answered before the run but not after "
                             f"it ({why}): figures measured by exec itself")
        return
    figures = _daemon_figures(baseline.result(after), after, baseline.project)
    if figures is None:
        summary.notes.append(f"the daemon at {where} does not list project {summary.project} "
                             "(folded into 'other' past max_consumers?): figures measured by "
                             "exec itself")
        return
    joules, grams, per_kwh, providers, zone = figures
    summary.joules, summary.grams, summary.grams_per_kwh = joules, grams, per_kwh
    summary.providers, summary.zone = providers, zone or summary.zone
    summary.measured_by, summary.daemon = "daemon", where
    pue = after.get("pue")
    if isinstance(pue, (int, float)) and not isinstance(pue, bool):
        summary.pue = float(pue)


def _report(summary: RunSummary, options: ExecOptions, config: Config,
            gpu_models: Sequence[str], err: IO[str]) -> None:
    if options.json:
        say(err, json.dumps(summary_document(summary), separators=(",", ":")))
    else:
        say(err, format_summary(summary))
    if options.output:
        row = codecarbon_row(summary, host_facts(summary.zone, config.proc_root, gpu_models))
        try:
            append_codecarbon_row(options.output, row)
        except OutputFileError as exc:
            say(err, f"carbond exec: --output: {exc}")


def exec_options(args: argparse.Namespace, client: ClientConfig | None = None) -> ExecOptions:
    """`carbond exec`'s own flags, checked; bad input is a ConfigError naming the flag."""
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("CMD", "no command given: carbond exec [options] -- CMD [ARGS...]")
    project = args.project if args.project is not None else default_project(command)
    try:
        encode_project(project)
    except ValueError as exc:
        raise ConfigError("--project", str(exc)) from None
    seconds: dict[str, float | None] = {}
    for flag in ("--deadline", "--duration"):
        value = getattr(args, flag[2:])
        if value is not None and not args.greenest:
            raise ConfigError(flag, "only with --greenest")
        try:
            seconds[flag] = None if value is None else parse_seconds(value)
        except ValueError as exc:
            raise ConfigError(flag, str(exc)) from None
    if args.greenest:
        missing = [flag for flag, value in seconds.items() if value is None]
        if missing:
            raise ConfigError("--greenest", f"needs {' and '.join(missing)}")
        if (seconds["--duration"] or 0.0) > (seconds["--deadline"] or 0.0):
            raise ConfigError("--duration", "is longer than --deadline: the run could not "
                              "end by the deadline")
    return ExecOptions(tuple(command), project, args.json, args.output, args.greenest,
                       seconds["--deadline"], seconds["--duration"], client)


def main(cfg: Config, args: argparse.Namespace, client: ClientConfig | None) -> int:
    """The command's own status (128+N when killed by signal N); 125 when exec cannot run
    it, 126/127 when it is not executable / not found; 2 for bad input."""
    options = exec_options(args, client)
    if args.log_level is None:  # a wrapper around a user's command: quiet unless asked
        logging.getLogger().setLevel(logging.WARNING)
    return run_exec(cfg, options)
