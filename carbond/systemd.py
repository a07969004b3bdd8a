"""sd_notify without libsystemd: READY=1, WATCHDOG=1, STATUS=, STOPPING=1 over $NOTIFY_SOCKET.

`Type=notify` in deploy/systemd/carbond.service relies on these: systemd considers the service
started only at READY=1 (sent after the first tick, so "active" means "measuring"), restarts it
when WATCHDOG=1 stops arriving (ticks failing or hung), and shows STATUS= in `systemctl status`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from carbond import attribution
from carbond.snapshot import Snapshot


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one datagram (several `KEY=value` lines); False when not under systemd, the
    socket is gone or its queue is full: notification is best effort and never blocks a tick."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, address)
    except OSError:
        return False
    return True


def watchdog_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process (WatchdogSec=), or None."""
    env = environ if environ is not None else os.environ
    pid, usec = env.get("WATCHDOG_PID"), env.get("WATCHDOG_USEC")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def _one_line(text: str) -> str:
    """A STATUS= value must not end the datagram's line early."""
    return " ".join(text.split())


def host_watts(snapshot: Snapshot) -> float:
    """Host power as carbond attributes it: a platform meter's where one measured, else the
    parts; psys (`platform`, source rapl) overlaps cpu + dram and is never added."""
    return attribution.host_watts(snapshot.devices)


def status_line(snapshot: Snapshot) -> str:
    """What `systemctl status carbond` shows: consumers, host power, intensity and provider."""
    consumers = len({sample.consumer for sample in snapshot.consumers})
    text = f"{consumers} consumers, host {host_watts(snapshot):.1f} W"
    intensity = snapshot.intensity
    if intensity is None:
        text += ", no grid intensity yet"
    else:
        zone = snapshot.zone or intensity.zone
        text += f", {intensity.grams_per_kwh:.0f} g/kWh from {intensity.provider} ({zone})"
    if snapshot.tick_failures_total:
        text += f", {snapshot.tick_failures_total} failed ticks"
    return _one_line(text)
