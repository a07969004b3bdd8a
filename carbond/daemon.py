"""The tick loop: read meters on an internal monotonic timer, publish a Snapshot.

Ticks are independent of scrapes. Every tick is self-contained: a faulty source loses its own
sample for that tick and nothing else.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from carbond.config import Config
from carbond.energy import DeviceDelta, DeviceTotals, Histogram, series
from carbond.meters.base import Meter, MeterReading
from carbond.meters.model import ModelMeter
from carbond.meters.rapl import RaplMeter
from carbond.snapshot import Snapshot
from carbond.systemd import notify

log = logging.getLogger(__name__)


def build_meters(config: Config) -> list[Meter]:
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
    return meters


class Daemon:
    def __init__(
        self,
        config: Config,
        meters: list[Meter],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.meters = meters
        self._clock = clock
        self._totals = DeviceTotals()
        self._histogram = Histogram()
        self._errors_total = {meter.name: 0 for meter in meters}
        self._wraps_total: dict[str, int] = {}
        self._last_tick = clock()
        self._snapshot = Snapshot()
        for meter in meters:  # baselines, so the first tick already has deltas
            self._account(meter, meter.read(), used=False)

    def latest(self) -> Snapshot:
        return self._snapshot

    def _model_in_use(self, readings: dict[str, MeterReading]) -> bool:
        if self.config.model_enabled == "on":
            return True
        rapl = readings.get("rapl")
        return rapl is None or not rapl.devices

    def _account(self, meter: Meter, reading: MeterReading, used: bool) -> list[DeviceDelta]:
        self._errors_total[meter.name] = self._errors_total.get(meter.name, 0) + reading.errors
        for device, wraps in reading.wraps.items():
            self._wraps_total[device] = self._wraps_total.get(device, 0) + wraps
        return self._totals.update(reading.devices, used=used)

    def tick(self) -> Snapshot:
        started = self._clock()
        seconds, self._last_tick = started - self._last_tick, started
        readings = {meter.name: meter.read() for meter in self.meters}
        use_model = self._model_in_use(readings)
        deltas: list[DeviceDelta] = []
        for meter in self.meters:
            used = meter.name != "model" or use_model
            deltas += self._account(meter, readings[meter.name], used)
        self._histogram.observe(self._clock() - started)
        self._snapshot = Snapshot(
            devices=tuple(series(self._totals, deltas, seconds)),
            meters_up={meter.name: meter.up() for meter in self.meters},
            meter_errors_total=dict(self._errors_total),
            counter_wraps_total=dict(self._wraps_total),
            tick_buckets=tuple(self._histogram.cumulative()),
            tick_seconds_sum=self._histogram.sum_seconds,
            ticks_total=sum(self._histogram.counts),
        )
        return self._snapshot

    def run(self, stop: threading.Event) -> None:
        """Tick on a fixed cadence until `stop` is set; overruns skip, never pile up."""
        interval = self.config.interval_seconds
        deadline = self._clock() + interval
        notify("READY=1")
        while not stop.wait(max(0.0, deadline - self._clock())):
            try:
                self.tick()
            except Exception:  # a bug in one tick must not end accounting
                log.exception("tick failed")
            notify("WATCHDOG=1")
            deadline += interval
            now = self._clock()
            if deadline <= now:
                deadline = now + interval - (now - deadline) % interval
        notify("STOPPING=1")

    def close(self) -> None:
        for meter in self.meters:
            meter.close()


def install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
