"""Everything the daemon and the commands need, wired from one `Config`.

Bad input raises ConfigError here, before anything starts; a source that is merely absent on
this host (no cgroup hierarchy, no taskstats) is logged and left out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from carbond.carbon import IntensityFeed, build_providers, resolve_zone
from carbond.carbon.zone import ZoneChoice
from carbond.config import Config, load
from carbond.daemon import Daemon, Reconfiguration
from carbond.ledger.ledger import Ledger, LedgerError
from carbond.meters.base import Meter
from carbond.meters.nvml import NvmlMeter
from carbond.meters.power_model import ModelMeter
from carbond.meters.rapl import RaplMeter
from carbond.types import ConfigError
from carbond.workloads.cgroups import CgroupReader, CgroupRoot, detect_cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.naming import CgroupNamer
from carbond.workloads.processes import ProcessTracker, read_pids
from carbond.workloads.taskstats import TaskstatsListener

log = logging.getLogger(__name__)


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
        meters.append(NvmlMeter(start_sampler=sampler))
    return meters


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


METER_KEYS = ("rapl_enabled", "powercap_root", "nvml_enabled", "model_enabled",
              "model_cpu_watts_min", "model_cpu_watts_max", "model_memory_watts_per_gb")
FEED_KEYS = ("zone", "providers", "intensity_refresh_seconds", "intensity_max_age_seconds")


def reconfigure(config_path: str | None, flags: Mapping[str, Any], old: Config
                ) -> Reconfiguration:
    """SIGHUP: the configuration read again, and the parts its changes need rebuilt. Bad
    input raises ConfigError before anything is touched."""
    new = load(config_path, flags)

    def changed(keys: tuple[str, ...]) -> bool:
        return any(getattr(new, key) != getattr(old, key) for key in keys)

    feed = build_feed(new)[0] if changed(FEED_KEYS) else None
    meters = build_meters(new) if changed(METER_KEYS) else None
    namer = CgroupNamer(new.rules) if new.rules != old.rules else None
    return Reconfiguration(new, meters, feed, namer)


def open_ledger(config: Config) -> Ledger:
    """The state directory's ledger; a second daemon on the same directory is refused."""
    try:
        return Ledger.open(config.state_dir, config.ledger_retention_seconds)
    except LedgerError as exc:
        raise ConfigError("--state-dir", str(exc)) from None


def build_daemon(config: Config) -> Daemon:
    """Everything from config; bad input raises ConfigError before anything starts."""
    ledger = open_ledger(config)  # first: a second daemon on this state dir stops here
    try:
        feed, choice = build_feed(config)
        log.info("intensity zone %s (%s)", choice.zone, choice.how)
        namer = CgroupNamer(config.rules)
        return Daemon(config, build_meters(config), build_cpu_usage(config, namer), feed, namer,
                      ledger)
    except BaseException:
        ledger.close()
        raise
