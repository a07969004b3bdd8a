"""Exit records of tasks from the kernel's taskstats netlink family (through pyroute2).

A process that starts and ends between two ticks never shows up in /proc; its exit record
carries its final CPU time, so short-lived work (build steps, shell loops) is not lost. Listening
needs CAP_NET_ADMIN; without it, or on any failure, the listener reports why (for
`carbond check`) and the daemon carries on without exit records - never a crash.

The stats struct is parsed from raw bytes at the kernel's ABI offsets rather than through
pyroute2's decoder, whose layout table is wrong for current kernels (version 16).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass

from carbond.types import name_text
from carbond.workloads.kernfiles import cgroup_line, parse_proc_cgroup, read_proc_cgroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskExit:
    """One process (thread group) that ended.

    `cgroup` is certain; `likely_cgroup` is only a guess (a child starts in its parent's
    cgroup and is rarely moved), so the collector caps what a guess may claim.
    """

    pid: int  # the thread-group id
    ppid: int
    comm: str
    cpu_seconds: float  # its whole lifetime's CPU time, all threads (an estimate, see below)
    start_epoch: float | None  # ac_btime: start, seconds since the epoch
    cgroup: str | None  # its cgroup in our hierarchy, where /proc still shows it at exit
    # where `cgroup` is None: its own cgroup seen while it was alive, else its parent's
    likely_cgroup: str | None = None


# struct taskstats offsets (include/uapi/linux/taskstats.h). Version 15 inserted max/min delay
# fields in the middle; version 16 moved them to the end again, restoring these offsets.
_LAYOUT = {
    "run_virtual": 72,
    "comm": 80,
    "pid": 128,
    "ppid": 132,
    "btime": 136,
    "utime": 152,
    "stime": 160,
    "tgid": 368,
}
_LAYOUT_V15 = {
    "run_virtual": 120,
    "comm": 128,
    "pid": 176,
    "ppid": 180,
    "btime": 184,
    "utime": 200,
    "stime": 208,
    "tgid": 464,
}


MAX_TICK_SECONDS = 0.010  # the scheduler tick at HZ=100, the lowest HZ
AGROUP = 0x20  # ac_flag: the last task of a thread group (include/uapi/linux/acct.h)


@dataclass(frozen=True)
class RawStats:
    version: int
    pid: int
    ppid: int
    tgid: int | None
    comm: str
    btime: int
    cpu_seconds: float
    # AGROUP (version 12 on, Linux 5.19): the last task of its process; None where not told
    last_of_group: bool | None = None


def parse_taskstats(raw: bytes) -> RawStats | None:
    """Decode the fields carbond needs from one `struct taskstats`."""
    if len(raw) < 168:
        return None
    (version,) = struct.unpack_from("=H", raw, 0)
    lay = _LAYOUT_V15 if version == 15 else _LAYOUT
    if len(raw) < lay["stime"] + 8:
        return None
    (virtual_ns,) = struct.unpack_from("=Q", raw, lay["run_virtual"])
    (utime_us, stime_us) = struct.unpack_from("=QQ", raw, lay["utime"])
    pid, ppid, btime = struct.unpack_from("=III", raw, lay["pid"])
    comm = name_text(raw[lay["comm"] : lay["comm"] + 32].split(b"\0", 1)[0])
    tgid = None
    if version >= 12 and len(raw) >= lay["tgid"] + 4:
        tgid = struct.unpack_from("=I", raw, lay["tgid"])[0] or None
    # At exit notification sum_exec_runtime (ns) still lacks the time since the task's last
    # scheduler update (for a short task, most of its life); utime/stime are tick samples,
    # coarse. The larger of the two is closest for a short task, but a running task is
    # updated at least every tick, so the samples can't be right beyond one tick (10 ms at
    # HZ=100, the longest) above the runtime: measured, they ran 60-80 ms (6-8 %) over the
    # exact time of 1 s processes. ProcessTracker later rescales exits against their live
    # parent's cutime + cstime, which the kernel keeps exactly.
    runtime = virtual_ns / 1e9
    seconds = min(max(runtime, (utime_us + stime_us) / 1e6), runtime + MAX_TICK_SECONDS)
    last = bool(raw[8] & AGROUP) if version >= 12 else None  # ac_flag
    return RawStats(version, pid, ppid, tgid, comm, btime, seconds, last)


_NLMSG_HDR = struct.Struct("=IHHII")
_NLA_HDR = struct.Struct("=HH")
_TYPE_PID, _TYPE_TGID, _TYPE_STATS, _TYPE_AGGR_PID, _TYPE_AGGR_TGID = 1, 2, 3, 4, 5
_NLMSG_ERROR, _NLMSG_MIN_TYPE = 2, 0x10


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes in data[start:end]: type -> (payload start, payload end)."""
    found: dict[int, tuple[int, int]] = {}
    while start + 4 <= end:
        length, kind = _NLA_HDR.unpack_from(data, start)
        if length < 4 or start + length > end:
            break
        found[kind & 0x3FFF] = (start + 4, start + length)
        start += (length + 3) & ~3
    return found


def exits_from_datagram(data: bytes) -> list[tuple[RawStats, float | None]]:
    """Each exit in one netlink datagram: (the task's stats, whole-group seconds if it ended).

    Parsed by hand: a burst of exits must be read as fast as the kernel sends it.
    """
    out: list[tuple[RawStats, float | None]] = []
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size or offset + length > len(data):
            break
        if kind >= _NLMSG_MIN_TYPE:
            top = _attrs(data, offset + _NLMSG_HDR.size + 4, offset + length)  # + genl header
            task: RawStats | None = None
            group_seconds: float | None = None
            group_pid: int | None = None
            if _TYPE_AGGR_PID in top:
                inner = _attrs(data, *top[_TYPE_AGGR_PID])
                if _TYPE_STATS in inner:
                    lo, hi = inner[_TYPE_STATS]
                    task = parse_taskstats(data[lo:hi])
            if _TYPE_AGGR_TGID in top:
                inner = _attrs(data, *top[_TYPE_AGGR_TGID])
                if _TYPE_TGID in inner:
                    group_pid = struct.unpack_from("=I", data, inner[_TYPE_TGID][0])[0]
                if _TYPE_STATS in inner:
                    lo, hi = inner[_TYPE_STATS]
                    group = parse_taskstats(data[lo:hi])
                    group_seconds = group.cpu_seconds if group else None
            if task is not None:
                if group_pid and task.tgid is None:
                    task = RawStats(
                        task.version,
                        task.pid,
                        task.ppid,
                        group_pid,
                        task.comm,
                        task.btime,
                        task.cpu_seconds,
                        task.last_of_group,
                    )
                out.append((task, group_seconds))
        offset += (length + 3) & ~3
    return out


def task_cgroup(proc_root: str, pid: int, hierarchy: str) -> str | None:
    """The pid's cgroup path in our hierarchy (v2 `0::` line or the v1 cpuacct line).

    Only the walked hierarchy's own line counts: on a hybrid host the `0::` line and the v1
    lines are independent memberships (writing a pid to cpuacct's cgroup.procs moves it there
    only), so neither says anything about the other. On v2 a zombie's line stays true, also
    once its cgroup is removed (the path is given without the kernel's " (deleted)": it is
    still where the task ran). On v1 the kernel prints ``/`` for every task that is exiting
    (proc_cgroup_show, PF_EXITING), so there ``/`` is only meaningful for a live task: see
    `live_cgroup`.
    """
    text = read_proc_cgroup(pid, proc_root) if hierarchy in ("v1", "v2") else None
    if text is None:
        return None
    line = cgroup_line(parse_proc_cgroup(text), None if hierarchy == "v2" else "cpuacct")
    return line.path if line is not None else None


PF_EXITING = 0x4  # task->flags, field 9 of /proc/PID/stat


def is_exiting(proc_root: str, pid: int) -> bool | None:
    """Whether the task has begun to exit (None: unreadable, so most likely gone)."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            rest = f.read().rpartition(b")")[2].split()
        return bool(int(rest[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):
        return None


def live_cgroup(proc_root: str, pid: int, hierarchy: str) -> str | None:
    """The pid's cgroup where /proc shows it truly; None where it can't tell.

    On v2 that is any answer (a zombie still shows its cgroup, also once it is removed). On
    v1 a path other than ``/`` is real, and ``/`` is real only if the task is not exiting:
    the flags are read after the path and PF_EXITING is never cleared, so a task seen not
    exiting was not exiting when its path was printed.
    """
    path = task_cgroup(proc_root, pid, hierarchy)
    if path is None or hierarchy != "v1" or path != "/":
        return path
    return "/" if is_exiting(proc_root, pid) is False else None


def possible_cpus() -> str:
    """The CPU list taskstats accepts (a mask outside cpu_possible_mask is EINVAL)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            value = f.read().strip()
            if value:
                return value
    except OSError:
        pass
    return f"0-{max(0, (os.cpu_count() or 1) - 1)}"


class TaskstatsListener:
    """Collects process exit records on a background thread until `stop()`.

    `start()` returns False and sets `reason` when taskstats can't be used; `drain()` hands
    over the exits since the last drain.

    Where /proc can't show an exited task's cgroup (always on v1, where an exiting task shows
    ``/``; on v2 once it is reaped), the record carries a guess: the cgroup its parent is in
    at that moment, or the task's own, learned while it was alive as the parent of an earlier
    exit (so a shell that moved itself into a cgroup, ran work there and ended is placed
    there, not in the root where v1 shows it). At most `max_learned` pids are remembered.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        hierarchy: str = "v2",
        cpus: str | None = None,
        rcvbuf_bytes: int = 16 << 20,
        max_pending: int = 200_000,
        max_learned: int = 4096,
    ) -> None:
        self.proc_root = proc_root
        self.hierarchy = hierarchy
        self.cpus = cpus or possible_cpus()
        self.rcvbuf_bytes = rcvbuf_bytes
        self.max_pending = max_pending
        self.max_learned = max_learned
        self._learned: dict[int, str] = {}  # pid -> its cgroup while it was alive
        self.reason: str | None = None
        self.overruns = 0  # receive-buffer overruns: the kernel dropped exit records
        self.failed_datagrams = 0
        self._pending: list[TaskExit] = []
        self._lock = threading.Lock()  # guards _pending
        self._reading = threading.Lock()  # one reader of the socket at a time; guards _learned
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.reason is None

    def start(self, timeout_seconds: float = 5.0) -> bool:
        if self._thread is not None:
            return self.running
        self._thread = threading.Thread(target=self._run, name="carbond-taskstats", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_seconds):
            self.reason = "taskstats: no answer from the kernel"
        return self.running

    def drain(self, catch_up_seconds: float = 0.5) -> list[TaskExit]:
        """The exits since the last drain, every one the kernel has queued by now included.

        The kernel queues a task's record before its parent can reap it, but the thread may
        lag behind the queue on a busy host: a record left there would come a tick late,
        after its reaper's exact time was used to rescale its siblings, and as a parent it
        would look as if it had lived elsewhere. So the queue is read here first, unless
        the thread holds it longer than `catch_up_seconds` (then it is reading it anyway).
        """
        if self._sock is not None and self._reading.acquire(timeout=catch_up_seconds):
            try:
                if self._sock is not None:
                    self._read_queued(self._sock)
            except OSError as exc:  # the thread meets it too, and reports it
                log.debug("taskstats: catching up before a drain failed: %s", exc)
            finally:
                self._reading.release()
        with self._lock:
            exits, self._pending = self._pending, []
        return exits

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _open(self):
        from pyroute2 import TaskStats
        from pyroute2.netlink.exceptions import NetlinkError

        ts = TaskStats(rcvbuf=self.rcvbuf_bytes)
        try:
            ts.bind()
            fd = ts.asyncore.socket.fileno()
            try:  # root may exceed net.core.rmem_max: bursts of exits need the room
                with socket.socket(fileno=os.dup(fd)) as dup:
                    dup.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf_bytes)  # SO_RCVBUFFORCE
            except OSError:
                pass
            try:  # the registration itself is unacknowledged: a GET shows missing privileges
                ts.get_pid_stat(os.getpid())
            except NetlinkError as exc:
                if exc.code == errno.EPERM:
                    raise PermissionError("taskstats needs CAP_NET_ADMIN") from None
                raise
            ts.register_mask(self.cpus)
        except BaseException:
            ts.close()
            raise
        return ts, fd

    def _run(self) -> None:
        try:
            ts, fd = self._open()
        except Exception as exc:  # any failure degrades, never crashes the daemon
            self.reason = f"taskstats unavailable: {exc}"
            self._ready.set()
            return
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        self._sock = sock
        self._ready.set()
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([sock], [], [], 0.25)
                if readable:
                    with self._reading:
                        self._read_queued(sock)
        except Exception as exc:
            self.reason = f"taskstats stopped: {exc}"
            log.error("%s: exit records are no longer read", self.reason)
        finally:
            with self._reading:
                self._sock = None
                sock.close()
            with contextlib.suppress(Exception):
                ts.deregister_mask(self.cpus)
            ts.close()

    def _read_queued(self, sock: socket.socket) -> None:
        """Every datagram queued on the socket now (the caller holds `_reading`)."""
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1  # records dropped: their time stays in root
                    continue
                raise
            try:
                for task, group_seconds in exits_from_datagram(data):
                    self._handle(task, group_seconds)
            except Exception:  # one bad record must not end the listener
                self.failed_datagrams += 1
                log.exception("taskstats: a datagram could not be handled")

    def _handle(self, task: RawStats, group_seconds: float | None) -> None:
        tgid = task.tgid or task.pid
        if group_seconds is not None:
            seconds = group_seconds  # last thread of a multi-threaded process
        elif tgid == task.pid and task.last_of_group is not False:
            seconds = task.cpu_seconds  # single-threaded process
        else:
            # One thread of a live process: /proc already counts it. That includes the leader
            # when it ends before the other threads (exit_group from the main thread): its
            # group's record follows, and taking the leader for a whole process would count
            # its time twice, and a tracked process's whole lifetime once more.
            return
        # v1 shows "/" for every exiting task; on v2 the zombie still shows its cgroup
        on_v1 = self.hierarchy == "v1"
        cgroup = None if on_v1 else task_cgroup(self.proc_root, tgid, self.hierarchy)
        learned = self._learned.pop(tgid, None)
        likely = None
        if cgroup is None:
            likely = learned or (self._learn(task.ppid) if task.ppid > 0 else None)
        record = TaskExit(
            tgid,
            task.ppid,
            task.comm,
            seconds,
            # a thread's btime is its own start: only a single-threaded exit dates the process
            float(task.btime) if task.btime and group_seconds is None else None,
            cgroup,
            likely,
        )
        with self._lock:
            if len(self._pending) < self.max_pending:
                self._pending.append(record)

    def _learn(self, pid: int) -> str | None:
        """A live task's cgroup, remembered for when it exits itself; else what was learned."""
        path = live_cgroup(self.proc_root, pid, self.hierarchy)
        if path is None:
            return self._learned.get(pid)
        self._learned.pop(pid, None)
        self._learned[pid] = path  # newest last: the oldest go first when full
        while len(self._learned) > self.max_learned:
            del self._learned[next(iter(self._learned))]
        return path


def probe_taskstats(proc_root: str = "/proc") -> tuple[bool, str]:
    """For `carbond check`: (usable, one line saying why or why not)."""
    listener = TaskstatsListener(proc_root)
    ok = listener.start(timeout_seconds=3.0)
    listener.stop()
    if ok:
        return True, f"taskstats: exit records on CPUs {listener.cpus}"
    return False, listener.reason or "taskstats unavailable"
