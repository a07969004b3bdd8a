"""What `carbond exec` prints and appends when CMD ends: one human summary, one JSON object,
or one row of CodeCarbon's emissions.csv. Formatting is pure; `append_codecarbon_row` is the
only I/O."""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from carbond.commands.exec.plan import Plan
from carbond.commands.figures import decimal, human_grams, human_joules

JOULES_PER_KWH = 3.6e6

# CodeCarbon's emissions.csv columns, in its order: the fields of `EmissionsData` in
# codecarbon/output_methods/emissions_data.py (mlco2/codecarbon 3.3; docs/exec.md). CodeCarbon
# appends to a file only when its header holds exactly these names (in any order): with any
# other set it moves the file to .bak and starts anew, so a new file gets exactly these.
CODECARBON_COLUMNS = (
    "timestamp", "project_name", "run_id", "experiment_id", "duration", "emissions",
    "emissions_rate", "cpu_power", "gpu_power", "ram_power", "cpu_energy", "gpu_energy",
    "ram_energy", "energy_consumed", "water_consumed", "country_name", "country_iso_code",
    "region", "cloud_provider", "cloud_region", "os", "python_version", "codecarbon_version",
    "cpu_count", "cpu_model", "gpu_count", "gpu_model", "longitude", "latitude",
    "ram_total_size", "tracking_mode", "cpu_utilization_percent", "gpu_utilization_percent",
    "ram_utilization_percent", "ram_used_gb", "on_cloud", "pue", "wue",
)
# Without these a file is not an emissions.csv that a row can be appended to.
REQUIRED_COLUMNS = frozenset({"timestamp", "project_name", "run_id", "duration", "emissions",
                              "energy_consumed"})


@dataclass
class RunSummary:
    """Everything the summary says about one run."""

    project: str
    run_id: str
    command: Sequence[str]
    exit_status: int
    started: float  # wall clock, epoch seconds
    ended: float
    duration_seconds: float
    cpu_seconds: float | None
    joules: Mapping[str, float]  # cpu, dram, gpu
    grams: float | None
    grams_per_kwh: float | None  # energy-weighted mean applied (before PUE)
    providers: Sequence[str]
    zone: str
    pue: float
    measured_by: str  # "daemon" or "exec"
    daemon: str | None = None  # the daemon's address when it measured
    cgroup: str = ""
    cgroup_removed: bool = True
    plan: Plan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_joules(self) -> float:
        return math.fsum(self.joules.get(c, 0.0) for c in ("cpu", "dram", "gpu"))


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{decimal(seconds)} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def describe_status(status: int) -> str:
    if status > 128 and status - 128 < signal.NSIG:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = f"signal {status - 128}"
        return f"killed by {name} (exit status {status})"
    return f"exit status {status}"


def printable(text: str) -> str:
    """Control characters as \\xNN, so a name cannot move the cursor or break a line."""
    return "".join(f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch
                   for ch in text)


def format_summary(run: RunSummary) -> str:
    """The human summary: three lines (plus notes)."""
    who = "the daemon" + (f" at {run.daemon}" if run.daemon else "") \
        if run.measured_by == "daemon" else "exec"
    cpu = f", {decimal(run.cpu_seconds)} CPU-s" if run.cpu_seconds is not None else ""
    providers = ", ".join(run.providers) or "no provider"
    intensity = (f"{run.grams_per_kwh:.0f} gCO2e/kWh" if run.grams_per_kwh is not None
                 else "unknown intensity")
    lines = [
        f"carbond exec: {printable(run.project)}: {describe_status(run.exit_status)} after "
        f"{human_seconds(run.duration_seconds)}{cpu} (measured by {who})",
        f"  energy  CPU {human_joules(run.joules.get('cpu', 0.0))}, "
        f"DRAM {human_joules(run.joules.get('dram', 0.0))}, "
        f"GPU {human_joules(run.joules.get('gpu', 0.0))}, "
        f"total {human_joules(run.total_joules)}",
        f"  CO2e    {human_grams(run.grams)} at {intensity} ({providers}, zone {run.zone or '?'}"
        f", PUE {run.pue:g})",
    ]
    lines += [f"  note: {printable(note)}" for note in run.notes]
    return "\n".join(lines) + "\n"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_document(run: RunSummary) -> dict[str, Any]:
    """The `--json` object (docs/exec.md)."""
    joules = {c: _finite(run.joules.get(c, 0.0)) for c in ("cpu", "dram", "gpu")}
    joules["total"] = _finite(run.total_joules)
    plan = None
    if run.plan is not None:
        plan = {
            "start": _iso(run.plan.start), "planned_at": _iso(run.plan.now),
            "grams_per_kwh": _finite(run.plan.grams_per_kwh),
            "now_grams_per_kwh": _finite(run.plan.now_grams_per_kwh),
            "saving_percent": _finite(run.plan.saving_percent),
        }
    return {
        "version": 1,
        "project": run.project,
        "run_id": run.run_id,
        "command": list(run.command),
        "exit_status": run.exit_status,
        "started": _iso(run.started),
        "ended": _iso(run.ended),
        "duration_seconds": _finite(run.duration_seconds),
        "cpu_seconds": _finite(run.cpu_seconds),
        "energy_joules": joules,
        "emissions_grams": _finite(run.grams),
        "intensity": {"grams_per_kwh": _finite(run.grams_per_kwh),
                      "providers": list(run.providers), "zone": run.zone},
        "pue": run.pue,
        "measured_by": run.measured_by,
        "daemon": run.daemon,
        "cgroup": run.cgroup,
        "cgroup_removed": run.cgroup_removed,
        "greenest": plan,
        "notes": list(run.notes),
    }


@dataclass(frozen=True)
class HostFacts:
    """The host columns of a CodeCarbon row."""

    country_name: str = ""
    country_iso_code: str = ""  # ISO 3166 alpha-3, as CodeCarbon writes it
    region: str = ""
    cloud_provider: str = ""
    cloud_region: str = ""
    os: str = ""
    python_version: str = ""
    version: str = ""
    cpu_count: int = 0
    cpu_model: str = ""
    gpu_count: int = 0
    gpu_model: str = ""
    ram_total_gb: float = 0.0  # GiB, as CodeCarbon counts them
    ram_used_gb: float | None = None  # the host's, when the run ended (MemTotal - MemAvailable)


def codecarbon_row(run: RunSummary, host: HostFacts) -> dict[str, str]:
    """One emissions.csv row, as text cells."""
    return {key: csv_cell(value) for key, value in codecarbon_values(run, host).items()}


def codecarbon_values(run: RunSummary, host: HostFacts) -> dict[str, Any]:
    """One emissions.csv row's values in CodeCarbon's units: kg, kg/s, W, kWh ("" where
    unknown). Energy columns include the PUE, as CodeCarbon's own energy does; power columns
    are the run's mean power."""
    seconds = run.duration_seconds

    def kwh(component: str) -> float:
        return run.joules.get(component, 0.0) * run.pue / JOULES_PER_KWH

    def watts(component: str) -> float:
        return run.joules.get(component, 0.0) / seconds if seconds > 0 else 0.0

    kg = (run.grams or 0.0) / 1e3
    cpu_percent: float | str = ""
    if run.cpu_seconds is not None and seconds > 0 and host.cpu_count > 0:
        cpu_percent = 100.0 * run.cpu_seconds / (seconds * host.cpu_count)
    ram_percent: float | str = ""
    if host.ram_used_gb is not None and host.ram_total_gb > 0:
        ram_percent = 100.0 * host.ram_used_gb / host.ram_total_gb
    values: dict[str, Any] = {
        "timestamp": datetime.fromtimestamp(run.ended).strftime("%Y-%m-%dT%H:%M:%S"),
        "project_name": run.project,
        "run_id": run.run_id,
        "experiment_id": "",
        "duration": seconds,
        "emissions": kg,
        "emissions_rate": kg / seconds if seconds > 0 else 0.0,
        "cpu_power": watts("cpu"),
        "gpu_power": watts("gpu"),
        "ram_power": watts("dram"),
        "cpu_energy": kwh("cpu"),
        "gpu_energy": kwh("gpu"),
        "ram_energy": kwh("dram"),
        "energy_consumed": kwh("cpu") + kwh("gpu") + kwh("dram"),
        "water_consumed": 0.0,  # litres: energy x WUE, and carbond has no WUE (CodeCarbon's 0)
        "country_name": host.country_name,
        "country_iso_code": host.country_iso_code,
        "region": host.region,
        "cloud_provider": host.cloud_provider,
        "cloud_region": host.cloud_region,
        "os": host.os,
        "python_version": host.python_version,
        "codecarbon_version": host.version,
        "cpu_count": host.cpu_count,
        "cpu_model": host.cpu_model,
        "gpu_count": host.gpu_count,
        "gpu_model": host.gpu_model,
        "longitude": "",
        "latitude": "",
        "ram_total_size": round(host.ram_total_gb, 3),
        "tracking_mode": "process",
        # the run's own share of the host's CPUs (CodeCarbon samples the whole machine's)
        "cpu_utilization_percent": cpu_percent,
        # carbond does not sample GPU utilisation: 0 without a GPU, as CodeCarbon writes
        "gpu_utilization_percent": 0.0 if host.gpu_count == 0 else "",
        "ram_utilization_percent": ram_percent,
        "ram_used_gb": "" if host.ram_used_gb is None else round(host.ram_used_gb, 3),
        "on_cloud": "Y" if host.cloud_provider else "N",
        "pue": run.pue,
        "wue": 0.0,
    }
    return values


def csv_cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return os.fsencode(value).decode("utf-8", "backslashreplace") if isinstance(value, str) \
        else str(value)


class OutputFileError(Exception):
    """The --output file cannot take a row; the message says why."""


def check_output_file(path: str) -> None:
    """Before the run: the file can be appended to, and if it has a header, it is an
    emissions.csv one (CodeCarbon's columns in any order, newer ones too)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputFileError(f"cannot open {path}: {exc.strerror}") from None
    try:
        header = _header(fd)
    finally:
        os.close(fd)
    if header is not None and not set(header) >= REQUIRED_COLUMNS:
        raise OutputFileError(f"{path} is not an emissions.csv: its header lacks "
                              f"{', '.join(sorted(REQUIRED_COLUMNS - set(header)))}")


def _header(fd: int) -> list[str] | None:
    """The first CSV row of the file, or None when it is empty."""
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        if b"\n" in chunk or offset > 1 << 20:
            break
    text = b"".join(chunks).decode("utf-8", "replace")
    if not text.strip():
        return None
    return next(csv.reader(io.StringIO(text)), None)


def append_codecarbon_row(path: str, row: Mapping[str, str]) -> None:
    """Append under an exclusive lock: the header first when the file is new or empty; into a
    file with a header, the row follows that header's column order (columns it lacks stay
    empty), so CodeCarbon's newer layouts take carbond's rows too. Raises OutputFileError."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputFileError(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        header = _header(fd)
        out = io.StringIO()
        if header is None:
            columns = list(CODECARBON_COLUMNS)
            csv.writer(out, lineterminator="\n").writerow(columns)
        else:
            if not set(header) >= REQUIRED_COLUMNS:
                raise OutputFileError(f"{path} is not an emissions.csv")
            columns = header
            if os.fstat(fd).st_size and not _ends_with_newline(fd):
                out.write("\n")
        csv.writer(out, lineterminator="\n").writerow([row.get(c, "") for c in columns])
        data = out.getvalue().encode("utf-8")
        while data:
            written = os.write(fd, data)
            data = data[written:]
    except OSError as exc:
        raise OutputFileError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        os.close(fd)  # releases the lock


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"
