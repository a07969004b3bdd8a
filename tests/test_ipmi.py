"""DCMI power readings through the kernel IPMI device, without a BMC: the ctypes structures
and ioctl numbers are checked against <linux/ipmi.h> by compiling it, encode/decode against
the spec's byte layout, and the meter's exchange against a stand-in for the kernel's side of
the ioctls on a pseudo-terminal (a real character device whose readiness the stand-in
drives, as the driver does when a response is queued)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import threading
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.meters.integrate import ReadingError
from carbond.meters.ipmi import (
    IPMICTL_RECEIVE_MSG_TRUNC,
    IPMICTL_SEND_COMMAND,
    IpmiAddr,
    IpmiDevice,
    IpmiMeter,
    IpmiMsg,
    IpmiRecv,
    IpmiReq,
    IpmiSystemInterfaceAddr,
    decode_reply,
    encode_request,
)

HEADER = "/usr/include/linux/ipmi.h"

# DCMI 1.5 Get Power Reading response: completion code, group extension 0xDC, current power
# 500 W, minimum 200 W, maximum 800 W, average 450 W (16-bit, LS byte first), IPMI timestamp
# 0x5F5E1000, statistics period 1000 ms (32-bit, LS first), state 0x40 (measurement active).
SPEC_REPLY = bytes.fromhex("00 dc f4 01 c8 00 20 03 c2 01 00 10 5e 5f e8 03 00 00 40")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ against the C header


C_LAYOUT = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/ipmi.h>
#define F(s, m) printf(#s "." #m " %zu %zu\n", offsetof(struct s, m), sizeof(((struct s *)0)->m))
int main(void) {
    printf("ipmi_msg %zu\nipmi_req %zu\nipmi_recv %zu\n", sizeof(struct ipmi_msg),
           sizeof(struct ipmi_req), sizeof(struct ipmi_recv));
    printf("ipmi_addr %zu\nipmi_system_interface_addr %zu\n", sizeof(struct ipmi_addr),
           sizeof(struct ipmi_system_interface_addr));
    F(ipmi_msg, netfn); F(ipmi_msg, cmd); F(ipmi_msg, data_len); F(ipmi_msg, data);
    F(ipmi_req, addr); F(ipmi_req, addr_len); F(ipmi_req, msgid); F(ipmi_req, msg);
    F(ipmi_recv, recv_type); F(ipmi_recv, addr); F(ipmi_recv, addr_len); F(ipmi_recv, msgid);
    F(ipmi_recv, msg);
    F(ipmi_system_interface_addr, addr_type); F(ipmi_system_interface_addr, channel);
    F(ipmi_system_interface_addr, lun);
    printf("IPMICTL_SEND_COMMAND %lu\nIPMICTL_RECEIVE_MSG_TRUNC %lu\n",
           (unsigned long)IPMICTL_SEND_COMMAND, (unsigned long)IPMICTL_RECEIVE_MSG_TRUNC);
    printf("IPMI_SYSTEM_INTERFACE_ADDR_TYPE %d\nIPMI_BMC_CHANNEL %d\nIPMI_RESPONSE_RECV_TYPE %d\n",
           IPMI_SYSTEM_INTERFACE_ADDR_TYPE, IPMI_BMC_CHANNEL, IPMI_RESPONSE_RECV_TYPE);
    return 0;
}
"""


def test_structures_and_ioctl_numbers_match_the_kernel_header(tmp_path) -> None:
    if shutil.which("gcc") is None or not os.path.exists(HEADER):
        pytest.skip("needs gcc and linux-libc-dev (<linux/ipmi.h>)")
    source = tmp_path / "layout.c"
    source.write_text(C_LAYOUT)
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(source)], check=True,
                   capture_output=True, timeout=120)
    output = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True,
                            text=True, timeout=60).stdout
    c = {}
    for line in output.splitlines():
        name, *values = line.split()
        c[name] = tuple(int(v) for v in values)
    ours = {"ipmi_msg": IpmiMsg, "ipmi_req": IpmiReq, "ipmi_recv": IpmiRecv,
            "ipmi_addr": IpmiAddr, "ipmi_system_interface_addr": IpmiSystemInterfaceAddr}
    for name, structure in ours.items():
        assert c[name] == (ctypes.sizeof(structure),), name
        for member, _ in getattr(structure, "_fields_", ()):
            key = f"{name}.{member}"
            if key in c:
                described = getattr(structure, member)
                assert c[key] == (described.offset, described.size), key
    assert c["IPMICTL_SEND_COMMAND"] == (IPMICTL_SEND_COMMAND,)
    assert c["IPMICTL_RECEIVE_MSG_TRUNC"] == (IPMICTL_RECEIVE_MSG_TRUNC,)
    assert c["IPMI_SYSTEM_INTERFACE_ADDR_TYPE"] == (0x0C,)
    assert c["IPMI_BMC_CHANNEL"] == (0x0F,) and c["IPMI_RESPONSE_RECV_TYPE"] == (1,)


# ------------------------------------------------------------------ the bytes of the spec


def test_the_request_is_get_power_reading_in_system_statistics_mode() -> None:
    assert encode_request() == (0x2C, 0x02, bytes.fromhex("dc 01 00 00"))


def test_a_reply_decodes_field_by_field() -> None:
    reading = decode_reply(SPEC_REPLY)
    assert (reading.current_watts, reading.minimum_watts, reading.maximum_watts,
            reading.average_watts) == (500, 200, 800, 450)
    assert reading.timestamp == 0x5F5E1000 and reading.period_ms == 1000 and reading.active


@pytest.mark.parametrize(("reply", "message"), [
    (b"", "empty"),
    (bytes.fromhex("c1"), "completion code 0xC1 (invalid command"),
    (bytes.fromhex("d6 dc"), "0xD6"),
    (SPEC_REPLY[:12], "12 bytes"),
    (bytes([0, 0xDD]) + SPEC_REPLY[2:], "group 0xDD"),
])  # fmt: skip
def test_replies_that_are_not_a_reading(reply, message) -> None:
    with pytest.raises(ReadingError, match=message.replace("(", r"\(")):
        decode_reply(reply)


@given(st.binary(max_size=40))
def test_any_bytes_decode_or_are_refused(data) -> None:
    try:
        reading = decode_reply(data)
    except ReadingError:
        return
    assert 0 <= reading.current_watts <= 0xFFFF and len(data) >= 19


# ------------------------------------------------------------------ the kernel's side, stood in


@dataclass
class Queued:
    msgid: int
    netfn: int
    cmd: int
    data: bytes
    recv_type: int = 1


@dataclass
class FakeIpmiDriver:
    """The kernel's side of IPMICTL_SEND_COMMAND / IPMICTL_RECEIVE_MSG_TRUNC for a BMC that
    answers DCMI Get Power Reading. A queued response makes the device readable (a byte
    written to the pty's master side), as the driver wakes poll() when a message arrives."""

    master: int
    reply: bytes = SPEC_REPLY
    mode: str = "ok"  # ok, silent, stray_first, wrong_netfn, long
    sent: list[tuple[int, int, int, bytes, int, int]] = field(default_factory=list)
    queue: list[Queued] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, fd: int, request: int, arg: object) -> int:
        if request == IPMICTL_SEND_COMMAND:
            return self._send(arg)
        if request == IPMICTL_RECEIVE_MSG_TRUNC:
            return self._receive(fd, arg)
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    def _send(self, req: object) -> int:
        assert isinstance(req, IpmiReq)
        address = ctypes.cast(req.addr, ctypes.POINTER(IpmiSystemInterfaceAddr)).contents
        data = bytes(req.msg.data[:req.msg.data_len])
        with self.lock:
            self.sent.append((address.addr_type, address.channel, req.addr_len, data,
                              req.msg.netfn, req.msg.cmd))
            answers = []
            if self.mode == "stray_first":
                answers.append(Queued(req.msgid - 1, req.msg.netfn + 1, req.msg.cmd, b"\xc1"))
            if self.mode == "wrong_netfn":
                answers.append(Queued(req.msgid, 0x07, req.msg.cmd, b"\x00"))
            if self.mode != "silent":
                reply = self.reply + (b"\xaa" * 80 if self.mode == "long" else b"")
                answers.append(Queued(req.msgid, req.msg.netfn + 1, req.msg.cmd, reply))
            self.queue += answers
        for _ in answers:
            os.write(self.master, b"!")
        return 0

    def _receive(self, fd: int, recv: object) -> int:
        assert isinstance(recv, IpmiRecv)
        with self.lock:
            if not self.queue:
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            message = self.queue.pop(0)
        os.read(fd, 1)  # the device is readable while messages are queued
        recv.recv_type, recv.msgid = message.recv_type, message.msgid
        recv.msg.netfn, recv.msg.cmd = message.netfn, message.cmd
        size = recv.msg.data_len
        ctypes.memmove(recv.msg.data, message.data, min(size, len(message.data)))
        recv.msg.data_len = min(size, len(message.data))
        if len(message.data) > size:
            raise OSError(errno.EMSGSIZE, "Message too long")  # TRUNC: cut and say so
        return 0


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        yield master, path
    finally:
        os.close(slave)
        os.close(master)


def device(pty: tuple[int, str], **kwargs) -> tuple[IpmiDevice, FakeIpmiDriver]:
    driver = FakeIpmiDriver(pty[0], **kwargs)
    return IpmiDevice(pty[1], ioctl=driver), driver


def test_the_exchange_sends_dcmi_to_the_bmc_and_gets_its_reply(pty) -> None:
    dev, driver = device(pty)
    reply = dev.request(*encode_request(), timeout_seconds=5.0)
    assert reply == SPEC_REPLY
    (sent,) = driver.sent
    assert sent == (0x0C, 0x0F, ctypes.sizeof(IpmiSystemInterfaceAddr),
                    bytes.fromhex("dc 01 00 00"), 0x2C, 0x02)
    dev.close()


@pytest.mark.parametrize("mode", ["stray_first", "wrong_netfn", "long"])
def test_answers_that_are_not_ours_are_skipped_and_long_ones_cut(pty, mode) -> None:
    dev, driver = device(pty, mode=mode)
    assert decode_reply(dev.request(*encode_request(), timeout_seconds=5.0)).current_watts == 500
    assert driver.queue == []  # the stray answer was taken off the queue, not left to pile up
    dev.close()


def test_a_bmc_that_never_answers_ends_at_the_deadline(pty) -> None:
    dev, _ = device(pty, mode="silent")
    with pytest.raises(TimeoutError, match="did not answer"):
        dev.request(*encode_request(), timeout_seconds=0.3)
    dev.close()


def test_the_meter_integrates_the_current_power(pty) -> None:
    dev, driver = device(pty)
    clock = Clock()
    meter = IpmiMeter(dev, interval_seconds=5.0, clock=clock, start_poller=False)
    meter.poll()
    for step in range(1, 5):
        clock.now += 5.0
        timestamp = (0x5F5E1000 + 5 * step).to_bytes(4, "little")
        driver.reply = SPEC_REPLY[:10] + timestamp + SPEC_REPLY[14:]
        meter.poll()
    (energy,) = meter.read().devices
    assert (energy.device, energy.component, energy.source) == ("platform", "platform", "ipmi")
    assert energy.joules == pytest.approx(500.0 * 20)
    assert "500 W (min 200, max 800, average 450 W over 1 s)" in meter.report()[0].detail
    meter.close()


def test_a_reading_whose_timestamp_does_not_move_goes_stale(pty) -> None:
    dev, _ = device(pty)
    clock = Clock()
    meter = IpmiMeter(dev, interval_seconds=5.0, clock=clock, start_poller=False)
    for _ in range(15):
        clock.now += 5.0
        meter.poll()
    assert meter.read().devices == [] and "stale" in meter.last_error
    assert "STALE" in meter.report()[0].detail


def test_inactive_measurement_and_zero_watts_are_errors(pty) -> None:
    for reply in (SPEC_REPLY[:18] + b"\x00", SPEC_REPLY[:2] + b"\x00\x00" + SPEC_REPLY[4:]):
        dev, _ = device(pty, reply=reply)
        meter = IpmiMeter(dev, clock=Clock(), start_poller=False)
        meter.poll()
        assert meter.errors_total == 1 and meter.read().devices == []
        meter.close()


def test_devices_that_are_not_an_ipmi_device(tmp_path) -> None:
    regular = tmp_path / "ipmi0"
    regular.write_text("")
    cases = {str(tmp_path / "missing"): "load the ipmi_devintf",
             str(regular): "not a character device",
             "/dev/null": "not an IPMI device"}  # a character device, real ioctl: ENOTTY
    for path, message in cases.items():
        meter = IpmiMeter(IpmiDevice(path), clock=Clock(), start_poller=False)
        meter.poll()
        assert message in meter.last_error, path
        assert not meter.report()[0].ok and meter.read().devices == []
        meter.close()


def test_the_polling_thread_reads_and_stops(pty) -> None:
    from tests.helpers import wait_for

    dev, driver = device(pty)
    meter = IpmiMeter(dev, interval_seconds=0.1)
    try:
        assert wait_for(lambda: len(driver.sent) >= 3, timeout=30)
        assert any(t.name == "carbond-ipmi-poller" for t in threading.enumerate())
    finally:
        meter.close()
    assert wait_for(lambda: not any(t.name == "carbond-ipmi-poller" for t in threading.enumerate()),
                    timeout=10)
