"""Whole-node power from the BMC through the kernel's IPMI device: source `ipmi`.

DCMI "Get Power Reading" (NetFn 0x2C group extension, command 0x02, group 0xDC) is sent
through `/dev/ipmi0` (`meters.ipmi.device`) with the ipmi_devintf ioctls
`IPMICTL_SEND_COMMAND` and `IPMICTL_RECEIVE_MSG_TRUNC`, built with ctypes from the structures
of <linux/ipmi.h>: no program is run (not ipmitool, not anything the configuration names),
so a privileged daemon executes nothing and pays no fork per reading. The device path is only
opened, and only if it is a character device.

The reply carries the current, minimum, maximum and average power of the BMC's statistics
period, an IPMI timestamp and a state byte whose bit 6 says whether power measurement is
active. The current power is polled on the meter's own thread every `interval` and integrated
(trapezoid, integrate.PowerIntegrator); readings whose timestamp and power do not move for
twelve intervals are stale, not power. `encode_request` and `decode_reply` are pure and
tested against the spec's byte layout; the ctypes structures are checked against the C
header by compiling it (tests/test_ipmi.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from carbond.meters.base import DeviceEnergy, DeviceReport, MeterReading
from carbond.meters.integrate import (
    TRAPEZOID,
    Freshness,
    PowerIntegrator,
    ReadingError,
    Reported,
    check_watts,
)
from carbond.meters.poller import Poller

log = logging.getLogger(__name__)

SOURCE = "ipmi"
DEVICE = COMPONENT = "platform"

# <linux/ipmi.h>
IPMI_MAX_ADDR_SIZE = 32
IPMI_SYSTEM_INTERFACE_ADDR_TYPE = 0x0C
IPMI_BMC_CHANNEL = 0x0F
IPMI_RESPONSE_RECV_TYPE = 1
# DCMI 1.5, "Get Power Reading"
NETFN_GROUP_EXTENSION = 0x2C
CMD_GET_POWER_READING = 0x02
DCMI_GROUP = 0xDC
MODE_SYSTEM_POWER_STATISTICS = 0x01
STATE_MEASUREMENT_ACTIVE = 0x40
REPLY_BYTES = 19  # completion code, group, 4 x 16-bit power, 32-bit timestamp and period, state
COMPLETION_CODES = {
    0xC1: "invalid command (the BMC has no DCMI power management)",
    0xC3: "timeout", 0xCC: "invalid data field in request", 0xD5: "not supported in present state",
    0xD6: "cannot execute: sub-function disabled or unavailable",
}
GAP_POLLS = 3.0
STALE_POLLS = 12.0
RECEIVE_BUFFER_BYTES = 64


class IpmiMsg(ctypes.Structure):
    _fields_ = (("netfn", ctypes.c_ubyte), ("cmd", ctypes.c_ubyte),
                ("data_len", ctypes.c_ushort), ("data", ctypes.POINTER(ctypes.c_ubyte)))


class IpmiReq(ctypes.Structure):
    _fields_ = (("addr", ctypes.POINTER(ctypes.c_ubyte)), ("addr_len", ctypes.c_uint),
                ("msgid", ctypes.c_long), ("msg", IpmiMsg))


class IpmiRecv(ctypes.Structure):
    _fields_ = (("recv_type", ctypes.c_int), ("addr", ctypes.POINTER(ctypes.c_ubyte)),
                ("addr_len", ctypes.c_uint), ("msgid", ctypes.c_long), ("msg", IpmiMsg))


class IpmiSystemInterfaceAddr(ctypes.Structure):
    _fields_ = (("addr_type", ctypes.c_int), ("channel", ctypes.c_short),
                ("lun", ctypes.c_ubyte))


class IpmiAddr(ctypes.Structure):
    _fields_ = (("addr_type", ctypes.c_int), ("channel", ctypes.c_short),
                ("data", ctypes.c_char * IPMI_MAX_ADDR_SIZE))


def _ioc(direction: int, number: int, size: int) -> int:
    """The kernel's _IOC(dir, 'i', nr, size) for this architecture's generic layout."""
    return (direction << 30) | (size << 16) | (ord("i") << 8) | number


_IOC_WRITE, _IOC_READ = 1, 2
IPMICTL_SEND_COMMAND = _ioc(_IOC_READ, 13, ctypes.sizeof(IpmiReq))
IPMICTL_RECEIVE_MSG_TRUNC = _ioc(_IOC_READ | _IOC_WRITE, 11, ctypes.sizeof(IpmiRecv))


@dataclass(frozen=True)
class PowerReading:
    """A decoded DCMI Get Power Reading reply."""

    current_watts: int
    minimum_watts: int
    maximum_watts: int
    average_watts: int
    timestamp: int  # IPMI timestamp (seconds)
    period_ms: int  # the statistics reporting period
    active: bool  # power measurement active (state bit 6)


def encode_request() -> tuple[int, int, bytes]:
    """NetFn, command and data of Get Power Reading in system power statistics mode."""
    return NETFN_GROUP_EXTENSION, CMD_GET_POWER_READING, bytes(
        (DCMI_GROUP, MODE_SYSTEM_POWER_STATISTICS, 0x00, 0x00))


def decode_reply(data: bytes) -> PowerReading:
    """The reply's data (completion code first) or ReadingError saying what is wrong."""
    if not data:
        raise ReadingError("empty DCMI reply")
    if data[0] != 0:
        reason = COMPLETION_CODES.get(data[0], "error")
        raise ReadingError(f"DCMI Get Power Reading failed: completion code 0x{data[0]:02X} "
                           f"({reason})")
    if len(data) < REPLY_BYTES:
        raise ReadingError(f"DCMI reply of {len(data)} bytes, expected {REPLY_BYTES}")
    if data[1] != DCMI_GROUP:
        raise ReadingError(f"DCMI reply for group 0x{data[1]:02X}, not 0xDC")

    def u16(at: int) -> int:
        return int.from_bytes(data[at:at + 2], "little")

    return PowerReading(u16(2), u16(4), u16(6), u16(8),
                        int.from_bytes(data[10:14], "little"),
                        int.from_bytes(data[14:18], "little"),
                        bool(data[18] & STATE_MEASUREMENT_ACTIVE))


def reading_watts(reading: PowerReading) -> float:
    if not reading.active:
        raise ReadingError("the BMC's power measurement is not active (DCMI state bit 6)")
    watts = check_watts(float(reading.current_watts))
    if watts == 0:
        raise ReadingError("0 W: the BMC has no power reading (a running node draws power)")
    return watts


Ioctl = Callable[[int, int, Any], Any]


class IpmiDevice:
    """One open kernel IPMI device: a request and its response within a deadline.

    `ioctl` is fcntl.ioctl; a test passes a stand-in for the kernel's side of the call.
    """

    def __init__(self, path: str, ioctl: Ioctl = fcntl.ioctl) -> None:
        self.path = path
        self._ioctl = ioctl
        self._fd: int | None = None
        self._msgid = 0

    def _open(self) -> int:
        if self._fd is None:
            mode = os.stat(self.path).st_mode
            if not stat.S_ISCHR(mode):
                raise ReadingError(f"{self.path} is not a character device")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def request(self, netfn: int, cmd: int, data: bytes, timeout_seconds: float) -> bytes:
        """Send to the BMC (system interface) and wait for the matching response's data."""
        try:
            return self._exchange(netfn, cmd, data, timeout_seconds)
        except OSError:
            self.close()  # reopened at the next request: the driver may have been reloaded
            raise

    def _exchange(self, netfn: int, cmd: int, data: bytes, timeout_seconds: float) -> bytes:
        fd = self._open()
        deadline = time.monotonic() + timeout_seconds
        address = IpmiSystemInterfaceAddr(IPMI_SYSTEM_INTERFACE_ADDR_TYPE, IPMI_BMC_CHANNEL, 0)
        payload = (ctypes.c_ubyte * max(1, len(data))).from_buffer_copy(data or b"\0")
        self._msgid = self._msgid % 0x7FFFFFFF + 1
        request = IpmiReq(ctypes.cast(ctypes.pointer(address), ctypes.POINTER(ctypes.c_ubyte)),
                          ctypes.sizeof(address), self._msgid,
                          IpmiMsg(netfn, cmd, len(data), payload))
        self._ioctl(fd, IPMICTL_SEND_COMMAND, request)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the BMC did not answer within {timeout_seconds:g} s")
            if not poller.poll(max(1, int(remaining * 1000))):
                continue
            answer = self._receive(fd)
            if answer is None:
                continue  # not ours (a late answer to an earlier request) or not there yet
            reply_netfn, reply_cmd, reply = answer
            if reply_netfn != netfn + 1 or reply_cmd != cmd:
                continue
            return reply

    def _receive(self, fd: int) -> tuple[int, int, bytes] | None:
        address = IpmiAddr()
        buffer = (ctypes.c_ubyte * RECEIVE_BUFFER_BYTES)()
        received = IpmiRecv(0, ctypes.cast(ctypes.pointer(address),
                                           ctypes.POINTER(ctypes.c_ubyte)),
                            ctypes.sizeof(address), 0,
                            IpmiMsg(0, 0, RECEIVE_BUFFER_BYTES, buffer))
        try:
            self._ioctl(fd, IPMICTL_RECEIVE_MSG_TRUNC, received)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return None
            if exc.errno != errno.EMSGSIZE:  # TRUNC: a long message is cut, which is fine
                raise
        if received.recv_type != IPMI_RESPONSE_RECV_TYPE or received.msgid != self._msgid:
            return None
        length = min(received.msg.data_len, RECEIVE_BUFFER_BYTES)
        return received.msg.netfn, received.msg.cmd, bytes(buffer[:length])


def describe_error(exc: BaseException, path: str) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no {path}: load the ipmi_devintf and ipmi_si kernel modules"
    if isinstance(exc, PermissionError):
        return f"permission denied on {path}: run carbond as root"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTTY:
        return f"{path} is not an IPMI device"
    if isinstance(exc, OSError):
        return f"{path}: {exc.strerror or type(exc).__name__}"
    return str(exc) or type(exc).__name__


class IpmiMeter:
    """The node's power from DCMI through the kernel IPMI device (module docstring)."""

    name = SOURCE

    def __init__(self, device: IpmiDevice, *, interval_seconds: float = 5.0,
                 timeout_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, start_poller: bool = True) -> None:
        self.device = device
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds or min(interval_seconds, 5.0)
        self._clock = clock
        self._lock = threading.Lock()
        self._power = PowerIntegrator(GAP_POLLS * interval_seconds, TRAPEZOID)
        self._freshness = Freshness(STALE_POLLS * interval_seconds)
        self._reported = Reported()
        self._stale = False
        self._up = False
        self._pending_errors = 0
        self.errors_total = 0
        self.last_error = ""
        self.last_reading: PowerReading | None = None
        self._poller: Poller | None = None
        if start_poller:
            self._poller = Poller(f"{SOURCE}-poller", interval_seconds, self.poll, self._failed)
            self._poller.start()

    def poll(self) -> None:
        """One Get Power Reading (the polling thread's work; tests and `probe` call it)."""
        try:
            reply = self.device.request(*encode_request(), self.timeout_seconds)
            reading = decode_reply(reply)
            watts = reading_watts(reading)
        except (OSError, ReadingError) as exc:
            self._failed(exc)
            return
        now = self._clock()
        with self._lock:
            self.last_reading = reading
            stale = self._freshness.observe(now, (reading.timestamp, reading.current_watts))
            if stale and not self._stale:
                self._error(ReadingError("the BMC's power reading has not moved for "
                                         f"{STALE_POLLS * self.interval_seconds:g} s: stale"))
                self._power.restart()
            self._stale = stale
            if not stale:
                self._power.add(now, watts)

    probe = poll

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._error(exc)

    def _error(self, exc: BaseException) -> None:
        self._pending_errors += 1
        self.errors_total += 1
        text = describe_error(exc, self.device.path)
        if text != self.last_error:
            log.warning("ipmi: %s", text)
        self.last_error = text

    def read(self) -> MeterReading:
        now = self._clock()
        with self._lock:
            reading = MeterReading(errors=self._pending_errors)
            self._pending_errors = 0
            joules = None if self._stale else self._power.joules_at(
                now, self._power.max_gap_seconds)
            if joules is not None:
                reading.devices.append(DeviceEnergy(DEVICE, COMPONENT, SOURCE,
                                                    self._reported.update(joules)))
            self._up = joules is not None
        return reading

    def up(self) -> bool:
        return self._up

    def components(self) -> frozenset[str]:
        return frozenset({COMPONENT}) if self._up else frozenset()

    def report(self) -> list[DeviceReport]:
        with self._lock:
            reading, errors, last_error = self.last_reading, self.errors_total, self.last_error
            stale, gaps = self._stale, self._power.gaps
        where = f"{self.device.path} (DCMI Get Power Reading, every {self.interval_seconds:g} s)"
        if reading is None:
            return [DeviceReport(DEVICE, f"{where}: {last_error or 'not polled yet'}", False)]
        detail = (f"{where}: {reading.current_watts} W (min {reading.minimum_watts}, max "
                  f"{reading.maximum_watts}, average {reading.average_watts} W over "
                  f"{reading.period_ms / 1000:g} s)")
        if stale:
            detail += "; STALE"
        if gaps.count:
            detail += f"; {gaps.count} polling gaps ({gaps.seconds:.0f} s) not integrated"
        if errors:
            detail += f"; {errors} failed polls, last: {last_error}"
        lines = [DeviceReport(DEVICE, detail, reading.active and not stale)]
        if self._poller is not None and not self._poller.alive:
            lines.append(DeviceReport(DEVICE, "the polling thread has stopped", False))
        return lines

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        self.device.close()
