"""GPU energy from NVML (nvidia-ml-py / pynvml).

Energy comes from `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver loaded; a decrease
is a reset) and, on GPUs without that counter, from `nvmlDeviceGetPowerUsage` (mW) integrated by
a small background sampler at 1 s or finer, so the result does not depend on how often the
daemon reads. A GPU that is lost, unsupported or not permitted is marked down and left out of
readings while the other GPUs go on; down GPUs are looked up again (by UUID, else by index) every
`retry_interval_s`, and a GPU that comes back continues its series from where it stopped: energy
spent while it was lost is unknown and is not counted, so there is never a spike.
Nothing here raises at construction or read: a missing library or unloaded driver leaves the
meter down with the reason in `report()`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from carbond.meters.base import (
    CEILING_WATTS,
    ERROR,
    DeviceEnergy,
    DeviceReport,
    MeterReading,
)
from carbond.meters.nvml_errors import (
    STATUS_LOST,
    STATUS_NO_PERMISSION,
    STATUS_NOT_SUPPORTED,
    STATUS_OK,
    as_text,
    describe,
    error_code,
    load_pynvml,
    status_for,
)
from carbond.meters.nvml_gpu import GpuInfo, GpuState, MigInstance

METHOD_COUNTER = "energy counter"
METHOD_POWER = "power integration"

__all__ = ["STATUS_LOST", "GpuInfo", "MigInstance", "NvmlMeter", "describe", "error_code",
           "load_pynvml", "status_for"]

log = logging.getLogger(__name__)


class NvmlMeter:
    """Cumulative joules per GPU from NVML; see the module docstring for the rules."""

    name = "nvml"

    def __init__(
        self,
        nvml: ModuleType | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        power_interval_s: float = 1.0,
        retry_interval_s: float = 10.0,
        start_sampler: bool = True,
        start_deadline_seconds: float | None = None,
    ) -> None:
        """`start_deadline_seconds`: how long the constructor waits for NVML to answer (None:
        for ever). A driver that hangs at start leaves the meter down, never the daemon; its
        GPUs join when NVML answers."""
        if not 0 < power_interval_s <= 1.0:
            raise ValueError("power_interval_s must be in (0, 1] seconds")
        self._nvml = nvml if nvml is not None else load_pynvml()
        self._clock = clock
        self.power_interval_s = power_interval_s
        self.retry_interval_s = retry_interval_s
        self._start_sampler = start_sampler
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._gpus: list[GpuState] = []
        self._initialised = False
        self._closed = False
        self._reason = ""  # why the whole meter is down
        self._last_init_try = float("-inf")
        self._init_retryable = False  # driver not loaded yet: try nvmlInit again later
        self._up = False
        self.errors_total = 0  # cumulative failed reads, for carbond_meter_errors_total
        self.driver_version = ""
        self._starting: threading.Thread | None = None
        if start_deadline_seconds is None:
            self._init()
            return
        self._starting = threading.Thread(target=self._start, name="carbond-nvml-start",
                                          daemon=True)
        self._starting.start()
        self._starting.join(start_deadline_seconds)
        if self._starting.is_alive():
            self._reason = (f"NVML did not answer within {start_deadline_seconds:g} s of the "
                            "start; its GPUs join when it does")
            log.warning("nvml meter down: %s", self._reason)

    def _start(self) -> None:
        try:
            with self._lock:
                self._init()
        except Exception:  # never let the start die silently
            log.exception("nvml meter start")

    def _still_starting(self) -> bool:
        """NVML has not answered the start yet: every call answers from nothing, at once."""
        return self._starting is not None and self._starting.is_alive()

    @property
    def _api(self) -> ModuleType:
        assert self._nvml is not None  # only used once nvmlInit succeeded
        return self._nvml

    # -- setup -------------------------------------------------------------------------------

    def _init(self) -> None:
        """nvmlInit once and discover GPUs; failures only set the reason."""
        nvml = self._nvml
        self._last_init_try = self._clock()
        if nvml is None:
            self._reason = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, OSError …
            self._reason = self._init_failure(exc, nvml)
            self._init_retryable = error_code(exc) != nvml.NVML_ERROR_LIBRARY_NOT_FOUND
            log.info("nvml meter down: %s", self._reason)
            return
        self._initialised = True
        self._reason = ""
        try:
            self.driver_version = as_text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            self.driver_version = ""
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._reason = f"cannot count GPUs: {describe(exc)}"
            self.errors_total += 1
            return
        if count == 0:
            self._reason = "NVML found no GPUs"
        now = self._clock()
        for index in range(count):
            gpu = GpuState(index)
            self._gpus.append(gpu)
            self._acquire(gpu, now)

    @staticmethod
    def _init_failure(exc: BaseException, nvml: ModuleType) -> str:
        code = error_code(exc)
        if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            return "NVML library libnvidia-ml.so.1 not found (no NVIDIA driver installed)"
        if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
            return "NVIDIA driver not loaded"
        if code == nvml.NVML_ERROR_NO_PERMISSION:
            return "no permission to open the NVIDIA device files"
        return f"nvmlInit failed: {describe(exc)}"

    def _acquire(self, gpu: GpuState, now: float) -> None:
        """(Re)get a GPU's handle and pick its energy method; marks it ok or down."""
        nvml = self._api
        gpu.last_retry = now
        try:
            handle = None
            if gpu.uuid:
                try:
                    handle = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                except Exception as exc:
                    if error_code(exc) == nvml.NVML_ERROR_GPU_IS_LOST:
                        raise
            if handle is None:
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            uuid = as_text(nvml.nvmlDeviceGetUUID(handle))
            name = as_text(nvml.nvmlDeviceGetName(handle))
        except Exception as exc:
            self._mark_down(gpu, exc, "cannot get a handle")
            return
        if gpu.uuid and uuid != gpu.uuid:
            log.warning("%s is now %s (was %s)", gpu.device, uuid, gpu.uuid)
        gpu.handle, gpu.uuid, gpu.name = handle, uuid, name
        # Whatever the counter did while the GPU was away is unknown: start a fresh baseline.
        gpu.counter.restart()
        gpu.last_power_milliwatts = None
        self._read_limit(gpu)
        self._refresh_mig(gpu)
        self._choose_method(gpu, now)

    def _choose_method(self, gpu: GpuState, now: float) -> None:
        nvml = self._api
        try:
            raw = int(nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
        except Exception as exc:
            if status_for(exc, nvml) not in (STATUS_NOT_SUPPORTED, STATUS_NO_PERMISSION):
                self._mark_down(gpu, exc, "energy counter")
                return
            energy_exc: BaseException = exc
        else:
            gpu.counter.update(raw, now)
            self._mark_ok(gpu, METHOD_COUNTER)
            return
        try:
            milliwatts = self._power(gpu)
        except Exception as exc:
            # "no permission" on the counter is the actionable one to report
            worst = energy_exc if status_for(energy_exc, nvml) == STATUS_NO_PERMISSION else exc
            self._mark_down(gpu, worst, "", reason=f"energy counter: {describe(energy_exc)}; "
                                                   f"power: {describe(exc)}")
            return
        gpu.last_power_milliwatts = None if milliwatts is None else int(milliwatts)
        gpu.last_power_time = now
        self._mark_ok(gpu, METHOD_POWER)
        self._ensure_sampler()

    def _read_limit(self, gpu: GpuState) -> None:
        """Bound what a reading may imply by twice the enforced power limit (boost passes it
        briefly; the limit can be changed at run time, so it is read again with MIG), else
        CEILING_WATTS: more is a glitch, an error sample, never energy."""
        try:
            limit_milliwatts = float(self._api.nvmlDeviceGetEnforcedPowerLimit(gpu.handle))
        except Exception:
            limit_milliwatts = 0.0
        plausible = math.isfinite(limit_milliwatts) and limit_milliwatts > 0
        gpu.max_milliwatts = 2.0 * limit_milliwatts if plausible else CEILING_WATTS * 1000.0
        gpu.counter.max_units_per_second = gpu.max_milliwatts

    def _power(self, gpu: GpuState) -> float | None:
        """nvmlDeviceGetPowerUsage in mW; None for an impossible value (NaN, negative, above
        the bound), which is an error sample; NVML failures raise."""
        value = self._api.nvmlDeviceGetPowerUsage(gpu.handle)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and 0 <= value <= gpu.max_milliwatts):
            return float(value)
        return None

    def _rejected(self, gpu: GpuState, what: str, value: object) -> bool:
        """Count an impossible value; warn once per run of them. Always False (no sample)."""
        self.errors_total += 1
        if not gpu.rejecting:
            log.warning("%s: impossible %s %r (bound %.0f W): an error sample, not energy",
                        gpu.device, what, value, gpu.max_milliwatts / 1000.0)
        gpu.rejecting = True
        return False

    def _refresh_mig(self, gpu: GpuState) -> None:
        """List MIG instances; a GPU or driver without MIG simply has none."""
        nvml = self._api
        instances: list[MigInstance] = []
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(gpu.handle)
            enabled = bool(current)
        except Exception:
            enabled = False
        if enabled:
            try:
                slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu.handle))
            except Exception:
                slots = 0
            for slot in range(slots):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, slot)
                    instances.append(MigInstance(
                        slot, as_text(nvml.nvmlDeviceGetUUID(mig)),
                        int(nvml.nvmlDeviceGetGpuInstanceId(mig)),
                        int(nvml.nvmlDeviceGetComputeInstanceId(mig))))
                except Exception:
                    continue  # empty slot (NotFound) or unreadable instance
        gpu.mig_enabled, gpu.mig_instances = enabled, tuple(instances)

    def _mark_ok(self, gpu: GpuState, method: str) -> None:
        if gpu.status != STATUS_OK:
            log.info("%s (%s) readable via %s", gpu.device, gpu.uuid, method)
        gpu.status, gpu.reason, gpu.method = STATUS_OK, "", method

    def _mark_down(self, gpu: GpuState, exc: BaseException, what: str,
                   reason: str | None = None) -> None:
        status = status_for(exc, self._api)
        reason = reason or f"{what}: {describe(exc)}"
        if (gpu.status, gpu.reason) != (status, reason):
            log.warning("%s (%s) down: %s", gpu.device, gpu.uuid or "uuid unknown", reason)
        gpu.status, gpu.reason, gpu.method = status, reason, ""
        gpu.last_power_milliwatts = None
        self.errors_total += 1

    # -- power sampler -------------------------------------------------------------------------

    def _ensure_sampler(self) -> None:
        if not self._start_sampler or self._closed:
            return
        if self._sampler is None or not self._sampler.is_alive():
            self._sampler = threading.Thread(target=self._sample_loop, name="carbond-nvml-power",
                                             daemon=True)
            self._sampler.start()

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.power_interval_s):
            try:
                self.sample_power()
            except Exception:  # never let the sampler die silently
                log.exception("nvml power sampler")

    def sample_power(self) -> None:
        """Integrate power once for every GPU read by power integration (the sampler calls this
        every `power_interval_s`; tests with an injected clock call it directly)."""
        if self._still_starting():
            return
        with self._lock:
            if not self._initialised:
                return
            now = self._clock()
            for gpu in self._gpus:
                if gpu.status == STATUS_OK and gpu.method == METHOD_POWER:
                    self._sample_gpu_power(gpu, now)

    def _sample_gpu_power(self, gpu: GpuState, now: float) -> bool:
        try:
            milliwatts = self._power(gpu)
        except Exception as exc:
            self._mark_down(gpu, exc, "power")
            return False
        if milliwatts is None:  # the previous good sample stays the trapezoid's start
            return self._rejected(gpu, "power (mW)", "out of range")
        gpu.rejecting = False
        if gpu.last_power_milliwatts is not None and now > gpu.last_power_time:
            # trapezoid: mW * s = mJ
            gpu.power_millijoules += ((gpu.last_power_milliwatts + milliwatts) / 2.0
                                      * (now - gpu.last_power_time))
        gpu.last_power_milliwatts, gpu.last_power_time = milliwatts, now
        return True

    # -- the Meter interface -------------------------------------------------------------------

    def read(self) -> MeterReading:
        """Cumulative joules for every GPU that could be read now."""
        reading = MeterReading()
        if self._still_starting():
            return reading
        with self._lock:
            errors_before = self.errors_total
            now = self._clock()
            if not self._initialised:
                self._maybe_retry_init(now)
            for gpu in self._gpus:
                if gpu.status != STATUS_OK:
                    if now - gpu.last_retry < self.retry_interval_s:
                        continue
                    self._acquire(gpu, now)
                    if gpu.status != STATUS_OK:
                        continue
                elif now - gpu.last_retry >= self.retry_interval_s:
                    gpu.last_retry = now
                    self._refresh_mig(gpu)
                    self._read_limit(gpu)
                if gpu.method == METHOD_COUNTER:
                    ok = self._read_counter(gpu, reading)
                else:
                    ok = self._sample_gpu_power(gpu, now)
                if ok:
                    reading.devices.append(DeviceEnergy(gpu.device, "gpu", "nvml", gpu.joules))
            reading.errors = self.errors_total - errors_before
            self._up = bool(reading.devices)
        return reading

    def _maybe_retry_init(self, now: float) -> None:
        """A driver that loads after carbond started is picked up; a missing library is not
        retried (installing one needs a restart anyway)."""
        if not self._init_retryable:
            return
        if now - self._last_init_try >= self.retry_interval_s:
            self._init()

    def _read_counter(self, gpu: GpuState, reading: MeterReading) -> bool:
        nvml = self._api
        try:
            raw = int(nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
        except Exception as exc:
            if status_for(exc, nvml) == STATUS_NOT_SUPPORTED:
                # The counter went away (driver change): carry on by power integration.
                self._choose_method(gpu, self._clock())
                return False
            self._mark_down(gpu, exc, "energy counter")
            return False
        event = gpu.counter.update(raw, self._clock())
        if event == ERROR:
            return self._rejected(gpu, "energy counter (mJ)", raw)
        gpu.rejecting = False
        if event is not None:  # no range: a decrease is a driver reload
            reading.resets[gpu.device] = reading.resets.get(gpu.device, 0) + 1
        return True

    def up(self) -> bool:
        return self._up

    def components(self) -> frozenset[str]:
        return frozenset({"gpu"}) if self._up else frozenset()

    @property
    def reason(self) -> str:
        """Why the whole meter is down ("" when NVML initialised and found GPUs)."""
        return self._reason

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML reported, up or down (for carbond_gpu_info and check); no NVML call."""
        if self._still_starting():
            return []
        with self._lock:
            return [gpu.info() for gpu in self._gpus]

    def handles(self) -> dict[str, Any]:
        """device -> NVML handle for the GPUs that are up, for carbond.workloads.gpu."""
        if self._still_starting():
            return {}
        with self._lock:
            return {gpu.device: gpu.handle for gpu in self._gpus if gpu.status == STATUS_OK}

    @property
    def nvml(self) -> ModuleType | None:
        return self._nvml

    def report(self) -> list[DeviceReport]:
        """Lines for `carbond check`: driver, then each GPU with its UUID, method or fault."""
        if self._still_starting():
            return [DeviceReport("nvml", self._reason, False)]
        with self._lock:
            if not self._initialised:
                return [DeviceReport("nvml", self._reason or "not initialised", False)]
            lines = [DeviceReport("nvml", f"driver {self.driver_version or 'unknown'}, "
                                          f"{len(self._gpus)} GPU(s)", bool(self._gpus))]
            if self._reason:
                lines.append(DeviceReport("nvml", self._reason, False))
            for gpu in self._gpus:
                ident = f"index {gpu.index}, {gpu.uuid or 'uuid unknown'}"
                mig = ""
                if gpu.mig_enabled:
                    mig = f", MIG enabled ({len(gpu.mig_instances)} instance(s))"
                if gpu.status == STATUS_OK:
                    detail = f"{gpu.name} ({ident}): {gpu.method}{mig}"
                else:
                    detail = f"{gpu.name or 'GPU'} ({ident}): {gpu.status} ({gpu.reason})"
                lines.append(DeviceReport(gpu.device, detail, gpu.status == STATUS_OK))
            return lines

    def close(self) -> None:
        """Stop the sampler (within 2 s) and shut NVML down; safe to call twice."""
        self._stop.set()
        sampler = self._sampler
        if sampler is not None:
            sampler.join(timeout=2.0)
        if self._still_starting():  # NVML never answered: nothing to shut down yet
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._initialised and self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._initialised = False
