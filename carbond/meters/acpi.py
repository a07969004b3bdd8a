"""Whole-node power from the ACPI power meter (ACPI000D) in hwmon: source `acpi`.

The kernel's acpi_power_meter driver shows it as a hwmon device named `power_meter` with
`power1_average` (µW, the mean over `power1_average_interval` ms) or, on some firmware,
`power1_input` (µW, instantaneous). Older kernels put the files under `hwmonN/device/`, newer
ones in `hwmonN/`; both are looked at. Reading a file evaluates an ACPI method (it can take
milliseconds, or hang with broken firmware), so a sampling thread reads it once per averaging
interval (clamped to 0.5-5 s, 1 s when unknown) and the tick's `read()` only integrates what
the samples say up to now (integrate.PowerIntegrator): a failed read, garbage or a vanished
file is an error sample, and an interval longer than three sampling intervals is a gap,
counted and shown by `carbond check`, never integrated across.

Where several power_meter devices exist the first (by hwmon name) is counted and the others
are listed as not counted: adding meters that measure the same supply twice would double the
node silently, while counting one too few shows up as a coverage above the expected.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from carbond.meters.base import DeviceEnergy, DeviceReport, MeterReading
from carbond.meters.integrate import (
    TRAPEZOID,
    WINDOW_MEAN,
    PowerIntegrator,
    ReadingError,
    Reported,
    check_watts,
)
from carbond.meters.poller import Poller

log = logging.getLogger(__name__)

SOURCE = "acpi"
DEVICE = COMPONENT = "platform"
HWMON_NAME = "power_meter"
DEFAULT_SAMPLE_SECONDS = 1.0
MIN_SAMPLE_SECONDS, MAX_SAMPLE_SECONDS = 0.5, 5.0
GAP_SAMPLES = 3.0  # an interval longer than this many sampling intervals is a gap
REDISCOVER_SECONDS = 60.0


@dataclass(frozen=True)
class PowerMeterFiles:
    """One hwmon power_meter: where its files are and which power file it has."""

    hwmon: str  # hwmonN
    directory: str  # the directory holding the files (hwmonN or hwmonN/device)
    power_file: str  # power1_average or power1_input
    interval_ms: int | None  # power1_average_interval

    @property
    def rule(self) -> str:
        return WINDOW_MEAN if self.power_file == "power1_average" else TRAPEZOID

    @property
    def sample_seconds(self) -> float:
        if self.interval_ms is None or self.interval_ms <= 0:
            return DEFAULT_SAMPLE_SECONDS
        return min(MAX_SAMPLE_SECONDS, max(MIN_SAMPLE_SECONDS, self.interval_ms / 1000.0))


def read_text(path: str) -> str:
    """A small sysfs file, non-blocking (a FIFO planted there reads as garbage)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode("ascii").strip()
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    try:
        return int(read_text(path))
    except (OSError, ValueError):
        return None


def parse_microwatts(text: str) -> float:
    """A power file's contents as watts, or ReadingError (garbage, negative, absurd, zero)."""
    try:
        microwatts = int(text.strip())
    except ValueError:
        raise ReadingError(f"not a number: {text[:40]!r}") from None
    watts = check_watts(microwatts / 1e6)
    if watts == 0:
        raise ReadingError("0 W: the meter has no measurement (a running node draws power)")
    return watts


def discover(root: str) -> list[PowerMeterFiles]:
    """Every hwmon power_meter under `root` with a power file, in hwmon name order."""
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    found = []
    for hwmon in entries:
        for directory in (os.path.join(root, hwmon), os.path.join(root, hwmon, "device")):
            try:
                if read_text(os.path.join(directory, "name")) != HWMON_NAME:
                    continue
            except (OSError, ValueError):
                continue
            power = next((name for name in ("power1_average", "power1_input")
                          if os.path.isfile(os.path.join(directory, name))), None)
            if power is None:
                continue
            interval = _read_int(os.path.join(directory, "power1_average_interval"))
            found.append(PowerMeterFiles(hwmon, directory, power, interval))
            break
    return found


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied: run carbond as root"
        if exc.errno == errno.ENOENT:
            return "the file vanished"
        return exc.strerror or type(exc).__name__
    if isinstance(exc, UnicodeDecodeError):
        return "not ASCII text"
    return str(exc) or type(exc).__name__


class AcpiMeter:
    """The node's power from hwmon's power_meter, integrated into joules (module docstring)."""

    name = SOURCE

    def __init__(self, root: str, *, clock: Callable[[], float] = time.monotonic,
                 start_sampler: bool = True) -> None:
        self.root = root
        self._clock = clock
        self._lock = threading.Lock()
        self._meters: list[PowerMeterFiles] = []
        self._discovered_at = float("-inf")
        self._integrator: PowerIntegrator | None = None
        self._reported = Reported()
        self._up = False
        self._pending_errors = 0  # failed samples since the last read()
        self.errors_total = 0
        self.last_error = ""
        self.last_watts: float | None = None
        self._rediscover()
        self._poller: Poller | None = None
        if start_sampler:
            self._poller = Poller(f"{SOURCE}-sampler", self.sample_seconds, self.sample,
                                  self._count_error)
            self._poller.start()

    @property
    def meter(self) -> PowerMeterFiles | None:
        """The power meter counted, if any."""
        return self._meters[0] if self._meters else None

    @property
    def sample_seconds(self) -> float:
        meter = self.meter
        return meter.sample_seconds if meter else DEFAULT_SAMPLE_SECONDS

    @property
    def max_gap_seconds(self) -> float:
        return GAP_SAMPLES * self.sample_seconds

    def _rediscover(self) -> None:
        before = self.meter
        found = discover(self.root)
        self._discovered_at = self._clock()
        # A meter whose file vanished is kept: each sample fails (counted), and the file
        # coming back is read at once.
        if found or before is None:
            self._meters = found
        meter = self.meter
        if meter is None:
            return
        if before is None or (before.directory, before.power_file) != (meter.directory,
                                                                       meter.power_file):
            # another meter (or the first): its samples start a new integration
            old = self._integrator
            self._integrator = PowerIntegrator(GAP_SAMPLES * meter.sample_seconds, meter.rule)
            if old is not None:
                self._integrator.joules = old.joules
                self._integrator.gaps = old.gaps

    def sample(self) -> None:
        """One reading of the power file (the sampling thread's work; tests call it)."""
        now = self._clock()
        with self._lock:
            if self.meter is None and now - self._discovered_at >= REDISCOVER_SECONDS:
                self._rediscover()
            meter, integrator = self.meter, self._integrator
        if meter is None or integrator is None:
            return
        try:
            watts = parse_microwatts(read_text(os.path.join(meter.directory, meter.power_file)))
        except (OSError, ValueError) as exc:  # ReadingError and UnicodeDecodeError too
            with self._lock:
                self._error(exc)
                if isinstance(exc, FileNotFoundError):
                    self._rediscover()  # the device went away, or moved to another hwmonN
            return
        with self._lock:
            integrator.add(now, watts)
            self.last_watts = watts

    def _count_error(self, exc: BaseException) -> None:
        with self._lock:
            self._error(exc)

    def _error(self, exc: BaseException) -> None:
        self._pending_errors += 1
        self.errors_total += 1
        text = describe_error(exc)
        if text != self.last_error:
            log.info("acpi power meter: %s", text)
        self.last_error = text

    def read(self) -> MeterReading:
        """The energy up to now; no device when there is no fresh sample (never zero)."""
        now = self._clock()
        with self._lock:
            reading = MeterReading(errors=self._pending_errors)
            self._pending_errors = 0
            integrator = self._integrator
            joules = None if integrator is None else integrator.joules_at(
                now, self.max_gap_seconds)
            if joules is not None:
                reading.devices.append(DeviceEnergy(DEVICE, COMPONENT, SOURCE,
                                                    self._reported.update(joules)))
            self._up = joules is not None
        return reading

    def up(self) -> bool:
        return self._up

    def components(self) -> frozenset[str]:
        return frozenset({COMPONENT}) if self._up else frozenset()

    probe = sample  # one sample now (carbond check; the sampler thread calls sample)

    def report(self) -> list[DeviceReport]:
        with self._lock:
            meters, integrator = list(self._meters), self._integrator
            last_error, watts, errors = self.last_error, self.last_watts, self.errors_total
        if not meters:
            return [DeviceReport(DEVICE, f"no hwmon device named {HWMON_NAME} with "
                                 f"power1_average or power1_input under {self.root}", False)]
        meter = meters[0]
        path = os.path.join(meter.directory, meter.power_file)
        interval = (f"averaging interval {meter.interval_ms} ms" if meter.interval_ms
                    else "averaging interval unknown")
        detail = f"{path} ({interval}; sampled every {meter.sample_seconds:g} s)"
        try:
            now_watts = parse_microwatts(read_text(path))
            detail += f": {now_watts:.1f} W"
            ok = True
        except (OSError, ValueError) as exc:
            detail += f": {describe_error(exc)}"
            ok = False
        gaps = integrator.gaps if integrator else None
        if gaps and gaps.count:
            detail += (f"; {gaps.count} sampling gaps ({gaps.seconds:.1f} s, longest "
                       f"{gaps.longest_seconds:.1f} s) not integrated")
        if errors:
            detail += f"; {errors} failed samples, last: {last_error}"
        elif watts is None and ok:
            detail += "; no sample integrated yet"
        lines = [DeviceReport(DEVICE, detail, ok)]
        lines += [DeviceReport(other.hwmon, f"{other.directory}: another {HWMON_NAME}, not "
                               "counted (one meter per node)", True) for other in meters[1:]]
        if self._poller is not None and not self._poller.alive:
            lines.append(DeviceReport(DEVICE, "the sampling thread has stopped", False))
        return lines

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
