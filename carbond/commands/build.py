"""Everything the daemon and the commands need, wired from one `Config`.

Bad input raises ConfigError here, before anything starts; a source that is merely absent on
this host (no cgroup hierarchy, no taskstats) is logged and left out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from carbond.carbon import IntensityFeed, build_providers, resolve_zone
from carbond.carbon.zone import ZoneChoice
from carbond.config import BUDGETS, FEED, METADATA, METERS, NAMER, Config, fields_on_reload, load
from carbond.daemon import Daemon, Reconfiguration, policy_of
from carbond.exporter.publisher import COUNTERS_STATE, Publisher
from carbond.ledger.budgets import OWNER_KEYS, BudgetTracker, MetadataLookup, no_metadata
from carbond.ledger.ledger import Ledger, LedgerError
from carbond.meters.base import Meter
from carbond.meters.nvml import NvmlMeter
from carbond.meters.platform import build_platform_meters
from carbond.meters.power_model import ModelMeter
from carbond.meters.rapl import RaplMeter
from carbond.pipeline.idle import IdleBaseline
from carbond.pipeline.names import NO_LABELS, Names
from carbond.pipeline.tick import READ_DEADLINE_SECONDS, CpuSource, Pipeline
from carbond.runtime.lifecycle import Part, Periodic, Runner
from carbond.types import ConfigError
from carbond.workloads.cgroups import CgroupReader, CgroupRoot, detect_cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.gpu import GpuUsageTracker, PidConsumers
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.identity.settings import build_resolver
from carbond.workloads.naming import CgroupNamer
from carbond.workloads.processes import ProcessTracker, read_pids
from carbond.workloads.taskstats import TaskstatsListener

log = logging.getLogger(__name__)


# nvmlInit and the first look at each GPU: seconds on a large node without persistence mode;
# a driver that hangs there leaves the GPUs out until it answers, never the daemon.
NVML_START_DEADLINE_SECONDS = 10.0


def build_meters(config: Config, *, sampler: bool = True) -> list[Meter]:
    meters: list[Meter] = []
    if config.rapl_enabled != "off":
        meters.append(RaplMeter(config.powercap_root))
    if config.model_enabled != "off":
        meters.append(
            ModelMeter(
                config.proc_root,
                config.model_cpu_watts_min,
                config.model_cpu_watts_max,
                config.model_memory_watts_per_gb,
            )
        )
    if config.nvml_enabled != "off":
        meters.append(NvmlMeter(start_sampler=sampler,
                                start_deadline_seconds=NVML_START_DEADLINE_SECONDS))
    return meters + build_platform_meters(config, start_threads=sampler)


def root_has_processes(root: CgroupRoot, proc_root: str) -> bool:
    """True when user-space tasks live in the root cgroup (no systemd): kernel threads have
    an empty cmdline and are not workloads."""
    for pid in read_pids(root.procs_file):
        try:
            with open(f"{proc_root}/{pid}/cmdline", "rb") as handle:
                if handle.read(1):
                    return True
        except OSError:
            continue
    return False


def build_cpu_usage(config: Config, namer: CgroupNamer) -> CpuUsageCollector | None:
    """Cgroup walk plus, where tasks run in the root cgroup, processes and taskstats exits."""
    try:
        root = detect_cgroup_root(config.cgroup_root, proc_root=config.proc_root)
    except ConfigError as exc:
        if config.cgroup_root:
            raise
        log.warning("%s: CPU energy goes to consumer 'other'", exc.problem)
        return None
    processes = config.processes == "on" or (
        config.processes == "auto" and root_has_processes(root, config.proc_root)
    )
    tracker, listener = None, None
    if processes:
        tracker = ProcessTracker(config.proc_root)
        listener = TaskstatsListener(config.proc_root, root.hierarchy)
        if not listener.start():
            log.warning("%s; short-lived processes are recovered from their parents only",
                        listener.reason)
            listener = None
    log.info("cgroups: %s at %s; per-process consumers %s", root.mode, root.path,
             "on" if processes else "off")
    return CpuUsageCollector(CgroupReader(root, namer), tracker, listener,
                             proc_root=config.proc_root)


def build_feed(config: Config) -> tuple[IntensityFeed, ZoneChoice]:
    choice = resolve_zone(config.zone)
    providers = build_providers(list(config.providers), choice.zone)
    feed = IntensityFeed(
        providers, choice.zone, config.intensity_refresh_seconds,
        config.intensity_max_age_seconds, config.state_dir,
    )
    return feed, choice


def gpu_usage_of(meters: list[Meter]) -> GpuUsageTracker | None:
    """NVML's per-pid usage, where an NVML meter is among the meters."""
    nvml = next((m for m in meters if isinstance(m, NvmlMeter)), None)
    return GpuUsageTracker(nvml) if nvml else None


def reconfigure(config_path: str | None, flags: Mapping[str, Any], old: Config,
                ledger: Ledger | None = None, metadata: MetadataLookup = no_metadata
                ) -> Reconfiguration:
    """SIGHUP: the configuration read again, and the parts its changes need rebuilt. Bad
    input raises ConfigError before anything is touched. `metadata`: the running daemon's
    owner labels, for new budgets that match by namespace, account or user."""
    new = load(config_path, flags)

    def changed(on_reload: str) -> bool:
        return any(getattr(new, key) != getattr(old, key) for key in fields_on_reload(on_reload))

    feed = build_feed(new)[0] if changed(FEED) else None
    meters = build_meters(new) if changed(METERS) else None
    namer = CgroupNamer(new.rules) if changed(NAMER) else None
    budgets = (BudgetTracker(new.budgets, new.budgets_timezone, ledger,
                             metadata=owners(new, ledger, metadata))
               if changed(BUDGETS) else None)
    metadata_changed = changed(METADATA)
    resolver = (build_resolver(new.metadata) if metadata_changed and new.metadata.enabled
                else None)
    return Reconfiguration(new, meters, gpu_usage_of(meters) if meters is not None else None,
                           feed, namer, budgets, metadata_changed, resolver)


def owners(config: Config, ledger: Ledger | None, live: MetadataLookup) -> MetadataLookup:
    """Owner labels for budgets: the running resolver's, else the ledger's as last known. A
    budget reads the ledger's rows of its period at start and after a clock step, and jobs and
    pods that ended before are known only to the ledger. Read only where a budget matches by
    owner, and once."""
    if ledger is None or not any(key in budget.match for budget in config.budgets
                                 for key in OWNER_KEYS):
        return live
    stored = ledger.stored_labels()
    return lambda consumer: live(consumer) or stored.get(consumer, NO_LABELS)


def open_ledger(config: Config) -> Ledger:
    """The state directory's ledger; a second daemon on the same directory is refused."""
    try:
        return Ledger.open(config.state_dir, config.ledger_retention_seconds)
    except LedgerError as exc:
        raise ConfigError("--state-dir", str(exc)) from None


IDLE_STATE_FILE = "idle-baseline.json"
PERSIST_SECONDS = 300.0
_DETECT: Any = object()  # build what config says, unless a test passes its own


def idle_state_path(config: Config) -> str:
    return os.path.join(config.state_dir, IDLE_STATE_FILE)


def build_pipeline(config: Config, meters: list[Meter], cpu: CpuSource | None,
                   pid_consumers: PidConsumers | None, interval_seconds: float | None = None,
                   clock: Callable[[], float] = time.monotonic,
                   names: Names | None = None) -> Pipeline:
    """The tick both the daemon and exec run: meters and usage under deadlines, the idle
    baseline the daemon learns (from its state file; exec learns on from it, never saving),
    and, in the daemon, the consumers' names from the metadata resolver."""
    cpu_idle = IdleBaseline.load(idle_state_path(config), time.time(), clock(),
                                 fixed_watts=config.idle_watts_cpu)
    return Pipeline(meters, cpu, gpu_usage_of(meters), pid_consumers, policy_of(config),
                    cpu_idle, config.idle_watts_gpu or 0.0,
                    read_deadline_seconds=min(READ_DEADLINE_SECONDS,
                                              (interval_seconds or config.interval_seconds) / 2),
                    vcpus=os.cpu_count() or 1, clock=clock, names=names)


def build_daemon(config: Config, *, meters: list[Meter] | None = None,
                 cpu: CpuUsageCollector | None = _DETECT, feed: IntensityFeed | None = _DETECT,
                 ledger: Ledger | None = _DETECT, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 resolver: MetadataResolver | None = _DETECT) -> tuple[Daemon, Runner]:
    """The daemon and the runner of its parts (start order: metadata sources, pipeline
    baselines, intensity feed, ledger flushing, state saving; stop in reverse). Bad input
    raises ConfigError before anything starts. A test passes its own meters, or None for a
    part to leave out."""
    if ledger is _DETECT:
        ledger = open_ledger(config)  # first: a second daemon on this state dir stops here
    try:
        namer = CgroupNamer(config.rules)
        if feed is _DETECT:
            feed, choice = build_feed(config)
            log.info("intensity zone %s (%s)", choice.zone, choice.how)
        if cpu is _DETECT:
            cpu = build_cpu_usage(config, namer)
        if resolver is _DETECT:
            resolver = build_resolver(config.metadata) if config.metadata.enabled else None
        names = Names(resolver)
        meters = build_meters(config) if meters is None else meters
        rel = cpu.reader.root.rel if cpu else "/"
        pid_consumers = PidConsumers(namer, rel, config.proc_root,
                                     cpu is not None and cpu.processes is not None)
        pipeline = build_pipeline(config, meters, cpu, pid_consumers, clock=clock, names=names)
        publisher = Publisher(config.max_consumers, config.pue,
                              ledger.put_state if ledger is not None else None, clock)
        if ledger is not None:
            totals = ledger.restore()
            wall = wall_clock()
            publisher.restore(totals.consumer_joules, totals.consumer_grams,
                              totals.consumer_embodied_grams,
                              {c: wall - t for c, t in totals.consumer_updated.items()},
                              totals.device_joules, totals.host_grams,
                              ledger.get_state(COUNTERS_STATE))
        budgets = BudgetTracker(config.budgets, config.budgets_timezone, ledger,
                                clock=wall_clock, metadata=owners(config, ledger, names.labels))
    except BaseException:
        if ledger is not None:
            ledger.close()
        raise

    def rename(new: CgroupNamer) -> None:
        if cpu is not None:
            cpu.reader.namer = new
        pid_consumers.rename(new)

    daemon = Daemon(config, pipeline, publisher, feed, budgets,
                    [ledger] if ledger is not None else [], ledger, rename, clock, wall_clock)
    state_file = idle_state_path(config)

    def save_idle_baseline() -> None:
        try:
            pipeline.cpu_idle.save(state_file, wall_clock(), clock())
        except OSError as exc:
            log.warning("cannot save the idle baseline to %s: %s", state_file,
                        exc.strerror or exc)

    runner = Runner([
        # first: a tick may ask for a name as soon as there is one (lookups never wait)
        Part("metadata sources", lambda: resolver and resolver.start(),
             lambda: getattr(names.resolver, "stop", lambda: None)()),  # a reload's, if any
        Part("pipeline", pipeline.prime, pipeline.close),
        Part("intensity feed", lambda: daemon.feed and daemon.feed.start(),
             lambda: daemon.feed and daemon.feed.stop()),
        Part("ledger", lambda: ledger and ledger.start(config.ledger_flush_seconds),
             lambda: ledger and ledger.close()),  # close flushes the last ticks
        Periodic("idle baseline", save_idle_baseline, PERSIST_SECONDS),
    ])
    from carbond.exporter.documents import consumers_document
    from carbond.runs.server import exec_socket_services  # imports commands.exec: not at the top
    for service in exec_socket_services(config, lambda: consumers_document(daemon.latest())):
        runner.add(service)
    return daemon, runner
