"""Who used each GPU during an interval, per pid, as NVML reports it.

Per GPU, NVML's process utilisation samples newer than the last timestamp seen on that GPU give
each pid's SM utilisation; summed over the interval's samples they weigh the pids by
utilisation x time. The running processes' used memory is read too: where there are no samples
(nothing ran a kernel, MIG mode, vGPU) `attribution.attribute` splits by memory instead.

MIG has no per-instance energy counter, so the parent GPU's energy is split across the pids of
all its instances; `GpuUsage.gpu_instances` says which instance each pid runs in.

NVML reports host pids; they map to cgroups through /proc/PID/cgroup under `proc_root`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from carbond.meters.nvml import describe, error_code
from carbond.types import OTHER, Consumer
from carbond.workloads.kernfiles import (
    PROC_CGROUP_BYTES,
    OpenFiles,
    cgroup_line,
    descriptor_budget,
    mount_fstype,
    parse_proc_cgroup,
    read_head,
    read_proc_cgroup,
)

log = logging.getLogger(__name__)

NO_GPU_INSTANCE = 0xFFFFFFFF  # NVML's "not a MIG process" instance id


class GpuHandles(Protocol):
    """What the tracker needs from the NVML meter (NvmlMeter satisfies it)."""

    @property
    def nvml(self) -> ModuleType | None: ...

    def handles(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class GpuUsage:
    """One GPU's usage over the interval since the previous `GpuUsageTracker.sample()`."""

    device: str  # "gpu-N"
    sm: dict[int, float] = field(default_factory=dict)  # pid -> summed smUtil of the samples
    memory: dict[int, float] = field(default_factory=dict)  # pid -> used bytes, running now
    gpu_instances: dict[int, int] = field(default_factory=dict)  # pid -> MIG GPU instance id
    error: str = ""  # why usage could not be read, if it could not

    @property
    def pids(self) -> set[int]:
        return set(self.sm) | set(self.memory)


class GpuUsageTracker:
    """Per-GPU process usage from NVML, one `sample()` per daemon tick.

    The last-seen sample timestamp is kept per GPU ("gpu-N"), so every sample is counted in
    exactly one interval. Call `sample()` once at start (its result is the baseline
    and covers whatever the driver still buffers) and then once per tick, right after the
    meter's `read()`.
    """

    def __init__(self, meter: GpuHandles, nvml: ModuleType | None = None) -> None:
        self._meter = meter
        self._nvml = nvml if nvml is not None else meter.nvml
        self._last_seen_us: dict[str, int] = {}
        self._use_v2 = False  # the driver lacks the *_v3 process queries
        self.errors = 0

    def sample(self) -> dict[str, GpuUsage]:
        """Usage per GPU that is up; a GPU that is down is absent."""
        if self._nvml is None:
            return {}
        return {device: self._sample_gpu(device, handle)
                for device, handle in self._meter.handles().items()}

    def _sample_gpu(self, device: str, handle: Any) -> GpuUsage:
        try:
            processes = self.running_processes(handle)
        except Exception as exc:
            self.errors += 1
            processes, process_error = [], f"running processes: {describe(exc)}"
        else:
            process_error = ""
        instances = {pid: gi for pid, _mem, gi in processes if gi != NO_GPU_INSTANCE}
        memory = memory_weights(processes)
        try:
            sm = self._sm_weights(device, handle)
        except Exception as exc:
            self.errors += 1
            return GpuUsage(device, {}, memory, instances, f"utilisation: {describe(exc)}")
        return GpuUsage(device, sm, memory, instances, process_error)

    def _sm_weights(self, device: str, handle: Any) -> dict[int, float]:
        """pid -> summed smUtil over samples newer than the last one seen on this GPU."""
        nvml = self._nvml
        assert nvml is not None
        last_seen = self._last_seen_us.get(device, 0)
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, last_seen)
        except Exception as exc:
            # NotFound: no samples newer than last_seen. pynvml also raises with code 0 (success)
            # when the size query finds nothing. NotSupported: MIG mode, vGPU, old GPUs.
            if error_code(exc) in (
                nvml.NVML_SUCCESS, nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_NOT_SUPPORTED
            ):
                return {}
            raise
        weights: dict[int, float] = {}
        newest = last_seen
        for s in samples:
            stamp = int(s.timeStamp)
            if stamp <= last_seen:
                continue
            newest = max(newest, stamp)
            if s.smUtil > 0:
                weights[int(s.pid)] = weights.get(int(s.pid), 0.0) + float(s.smUtil)
        self._last_seen_us[device] = newest
        return weights

    def running_processes(self, handle: Any) -> list[tuple[int, int | None, int]]:
        """(pid, used bytes or None, MIG GPU instance id) of compute and graphics processes.

        nvidia-ml-py 12/13 call the `_v3` symbol from the unversioned functions and turn a
        missing symbol into NVMLLibraryMismatchError; older drivers only have `_v2` (same
        struct layout), so fall back to it once and remember.
        """
        nvml = self._nvml
        assert nvml is not None
        found: dict[int, tuple[int, int | None, int]] = {}
        for kind in ("Compute", "Graphics"):
            for info in self._query(handle, kind):
                pid = int(info.pid)
                memory = info.usedGpuMemory
                gi = getattr(info, "gpuInstanceId", NO_GPU_INSTANCE)
                gi = NO_GPU_INSTANCE if gi is None else int(gi)
                previous = found.get(pid)
                if previous is not None and previous[1] is not None and memory is not None:
                    memory = max(memory, previous[1])  # a process in both lists: count once
                found[pid] = (pid, None if memory is None else int(memory), gi)
        return list(found.values())

    def _query(self, handle: Any, kind: str) -> list[Any]:
        nvml = self._nvml
        assert nvml is not None
        if not self._use_v2:
            mismatch = getattr(nvml, "NVMLLibraryMismatchError", ())
            try:
                # the unversioned name is pynvml's _v3 call, wrapped to raise the mismatch error
                return list(getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses")(handle))
            except Exception as exc:
                if not (isinstance(exc, mismatch)
                        or error_code(exc) == nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                    raise
                log.info("NVML library has no _v3 process queries; using _v2")
                self._use_v2 = True
        return list(getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v2")(handle))


def memory_weights(processes: list[tuple[int, int | None, int]]) -> dict[int, float]:
    """pid -> used bytes; where the driver hides memory use (None), an equal share each."""
    known = {pid: float(memory) for pid, memory, _gi in processes if memory}
    if known:
        return known
    return {pid: 1.0 for pid, _memory, _gi in processes}


def cgroup_of(text: str) -> str | None:
    """The cgroup path in a /proc/PID/cgroup text, as the kernel writes it ("/a/b"); a removed
    cgroup's too (a zombie's GPU memory still names who used it).

    cgroup v2's "0::" line wins unless it is the root and a v1 cpuacct line names a deeper
    cgroup (hybrid hosts where a runtime only uses v1).
    """
    lines = parse_proc_cgroup(text)
    unified = cgroup_line(lines)
    cpuacct = cgroup_line(lines, "cpuacct")
    if unified is not None and (unified.path != "/" or cpuacct is None or cpuacct.path == "/"):
        return unified.path
    return cpuacct.path if cpuacct is not None else None


def pid_cgroup(pid: int, proc_root: str | os.PathLike[str] = "/proc") -> str | None:
    """The cgroup path of a pid; None when the pid is gone."""
    text = read_proc_cgroup(pid, os.fspath(proc_root))
    return cgroup_of(text) if text is not None else None


def below_root(path: str, rel: str) -> str:
    """/proc/PID/cgroup paths start at the hierarchy's top; consumer names start at our root."""
    path, rel = path.strip("/"), rel.strip("/")
    if not rel:
        return path
    if path == rel:
        return ""
    return path[len(rel) + 1:] if path.startswith(rel + "/") else path


class PidConsumers:
    """NVML pid -> consumer, named as the CPU side names it: by its cgroup below our root, or
    by executable name for a task in the root cgroup while per-process consumers are on.
    A pid that exited since NVML listed it goes to `other`.

    Opening and parsing /proc/PID/cgroup for every GPU process every tick was most of a busy
    GPU host's tick, so the files stay open (re-read with pread: the kernel regenerates them,
    so a process moved to another cgroup is seen at once) and each distinct text is named once.
    """

    MAX_NAMED_TEXTS = 4096  # distinct cgroup texts remembered; more: start over

    def __init__(
        self,
        namer: Callable[[str], Consumer],
        rel: str = "/",
        proc_root: str | os.PathLike[str] = "/proc",
        per_process: bool = False,
    ) -> None:
        self._namer = namer
        self._rel = rel
        self._proc_root = os.fspath(proc_root)
        self._per_process = per_process
        on_procfs = mount_fstype(self._proc_root) == "proc"
        self._files = OpenFiles(descriptor_budget() if on_procfs else 0)
        self._named: dict[bytes, Consumer | None] = {}  # None: a task of our root cgroup

    def __call__(self, pid: int) -> Consumer:
        data = self._files.read(pid, f"{self._proc_root}/{pid}/cgroup", PROC_CGROUP_BYTES)
        if data is None:
            return OTHER
        if data in self._named:
            consumer = self._named[data]
        else:
            consumer = self._name(data)
            if len(self._named) >= self.MAX_NAMED_TEXTS:
                self._named.clear()
            self._named[data] = consumer
        return consumer if consumer is not None else self._root_task(pid)

    def rename(self, namer: Callable[[str], Consumer]) -> None:
        """New naming rules (a configuration reload): forget names made with the old ones."""
        self._namer = namer
        self._named.clear()

    def _name(self, data: bytes) -> Consumer | None:
        path = cgroup_of(data.decode("utf-8", "surrogateescape"))
        if path is None:
            return OTHER
        below = below_root(path, self._rel)
        if not below and self._per_process:
            return None
        return self._namer(below)

    def _root_task(self, pid: int) -> Consumer:
        comm = read_head(f"{self._proc_root}/{pid}/comm", 64)
        if comm is None:
            return OTHER
        name = comm.decode("utf-8", "backslashreplace").rstrip("\n")
        return Consumer("process", name) if name else self._namer("")

    def retain(self, pids: Collection[int]) -> None:
        """Close the files of pids no GPU reports any more."""
        self._files.retain(pids)


def consumer_weights(
    pid_weights: Mapping[int, float], pid_to_consumer: Callable[[int], Consumer]
) -> dict[Consumer, float]:
    """Sum pid weights per consumer (several pids of one job become one weight)."""
    weights: dict[Consumer, float] = {}
    for pid, weight in pid_weights.items():
        consumer = pid_to_consumer(pid)
        weights[consumer] = weights.get(consumer, 0.0) + weight
    return weights
