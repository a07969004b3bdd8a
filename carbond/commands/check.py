"""`carbond check`: what this host offers, in plain lines an operator can act on."""

from __future__ import annotations

import logging
import os
import time

from carbond import __version__
from carbond.carbon import cloud_hint_sentence
from carbond.commands.build import build_feed, build_meters, build_pipeline
from carbond.config import Config
from carbond.meters.base import Meter
from carbond.types import ConfigError
from carbond.workloads.cgroups import detect_cgroup_root
from carbond.workloads.taskstats import probe_taskstats

log = logging.getLogger(__name__)

NVIDIA_VERSION_FILE = "/proc/driver/nvidia/version"


COVERAGE_SECONDS = 1.0  # how long `check` measures parts against the platform meter


def _probe(meter: Meter) -> None:
    """A platform meter samples on a thread of its own in the daemon; here once, now."""
    probe = getattr(meter, "probe", None)
    if probe is not None:
        try:
            probe()
        except Exception as exc:  # its report() says why it is down
            log.debug("probing %s failed: %s", meter.name, exc)


def meter_lines(meters: list[Meter]) -> tuple[list[str], bool]:
    lines, any_up = [], False
    for meter in meters:
        _probe(meter)
        meter.read()
        up = meter.up()
        any_up = any_up or up
        lines.append(f"meter {meter.name}: {'up' if up else 'down'}")
        for device in meter.report():
            mark = "ok " if device.ok else "!! "
            lines.append(f"  {mark}{device.device}: {device.detail}")
    return lines, any_up


def coverage_lines(config: Config, meters: list[Meter]) -> list[str]:
    """Parts against the platform over one second, through the daemon's own pipeline; nothing
    when no platform meter is up."""
    if not any("platform" in meter.components() for meter in meters):
        return []
    pipeline = build_pipeline(config, meters, None, None)
    pipeline.prime()
    time.sleep(COVERAGE_SECONDS)
    for meter in meters:
        _probe(meter)
    result = pipeline.tick().attribution
    seconds = COVERAGE_SECONDS
    if result.platform_joules is None:
        return ["coverage: the platform meter gave no reading over 1 s"]
    ratio = result.coverage_ratio
    return [f"coverage: parts {result.parts_joules / seconds:.1f} W (cpu + dram + gpu) of "
            f"platform {result.platform_joules / seconds:.1f} W"
            + (f" = {ratio:.2f}" if ratio is not None else "")
            + f"; the rest, {result.rest_joules / seconds:.1f} W, is attributed as "
            f"component platform ({config.platform_policy})"]


def cgroup_line(config: Config) -> str:
    try:
        root = detect_cgroup_root(config.cgroup_root, proc_root=config.proc_root)
    except ConfigError as exc:
        return f"cgroups: none usable ({exc.problem}); CPU energy goes to 'other'"
    return f"cgroups: {root.mode} ({root.path})"


def nvidia_line() -> str:
    try:
        with open(NVIDIA_VERSION_FILE, encoding="utf-8") as handle:
            return f"nvidia driver: present ({handle.readline().strip()})"
    except OSError:
        return "nvidia driver: not loaded (no /proc/driver/nvidia/version)"


def intensity_lines(config: Config) -> list[str]:
    feed, choice = build_feed(config)
    lines = [f"intensity zone: {choice.zone} ({choice.how})"]
    if config.zone is None:
        hint = cloud_hint_sentence()
        if hint:
            lines.append(f"  hint: {hint}")
    lines += [f"  provider {p.describe()}" for p in feed.providers]
    return lines


def state_dir_line(config: Config) -> str:
    path = config.state_dir
    if not os.path.isdir(path):
        return f"state dir: {path} does not exist yet (created at start)"
    writable = os.access(path, os.W_OK | os.X_OK)
    return f"state dir: {path} ({'writable' if writable else 'NOT writable'})"


def run_check(config: Config, meters: list[Meter]) -> tuple[list[str], int]:
    """Lines to print and the exit status: 0 when at least one meter works, else 1."""
    lines = [f"carbond {__version__}", f"config: {config.source or 'built-in defaults'}"]
    meter_report, any_up = meter_lines(meters)
    lines += meter_report
    lines += coverage_lines(config, meters)
    lines.append(nvidia_line())
    lines.append(cgroup_line(config))
    lines.append(probe_taskstats(config.proc_root)[1])
    lines += intensity_lines(config)
    lines.append(state_dir_line(config))
    lines.append("result: " + ("at least one meter works" if any_up else "no meter works"))
    return lines, 0 if any_up else 1


def main(cfg: Config) -> int:
    meters = build_meters(cfg, sampler=False)
    try:
        lines, status = run_check(cfg, meters)
    finally:
        for meter in meters:
            meter.close()
    print("\n".join(lines))
    return status
