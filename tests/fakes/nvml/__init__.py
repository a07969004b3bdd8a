"""Build the stand-in libnvidia-ml.so.1, write its scenarios, and call carbond's NVML code on it.

pynvml loads "libnvidia-ml.so.1" once per process and keeps it in module globals, so every test
runs carbond in a child process (driver.py) whose LD_LIBRARY_PATH holds the compiled fake; the
test talks to it over stdin/stdout JSON lines and rewrites the scenario file between calls.
See scenario.md for the file format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fake_nvml.c"
DRIVER = HERE / "driver.py"
SONAME = "libnvidia-ml.so.1"


def build_fake(out_dir: Path, *, no_v3: bool = False) -> Path:
    """Compile the fake into out_dir/libnvidia-ml.so.1 and return out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = ["gcc", "-shared", "-fPIC", "-O1", "-Wall", f"-Wl,-soname,{SONAME}",
               "-o", str(out_dir / SONAME), str(SOURCE), "-lpthread"]
    if no_v3:
        command.insert(1, "-DNO_V3")
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out_dir


@dataclass
class FakeGpu:
    index: int
    uuid: str
    name: str = "NVIDIA Fake GPU"
    energy_millijoules: int = 0
    power_milliwatts: int = 0
    power_limit_milliwatts: int = 0  # 0: the enforced power limit is not supported
    mig: bool = False
    faults: set[str] = field(default_factory=set)  # lost, energy_not_supported, …


@dataclass
class FakeProcess:
    gpu: int
    pid: int
    memory_bytes: int = 0
    kind: str = "compute"  # or graphics
    gpu_instance: int | None = None
    compute_instance: int | None = None


@dataclass
class FakeSample:
    gpu: int
    pid: int
    timestamp_us: int
    sm: int
    mem: int = 0


@dataclass
class FakeMig:
    gpu: int
    slot: int
    uuid: str
    gpu_instance: int
    compute_instance: int = 0


@dataclass
class Scenario:
    """The whole fake machine; `write()` replaces the file atomically."""

    gpus: list[FakeGpu] = field(default_factory=list)
    processes: list[FakeProcess] = field(default_factory=list)
    samples: list[FakeSample] = field(default_factory=list)
    migs: list[FakeMig] = field(default_factory=list)
    driver_version: str = "550.54.15"
    driver_not_loaded: bool = False

    def gpu(self, index: int) -> FakeGpu:
        return next(g for g in self.gpus if g.index == index)

    def render(self) -> str:
        lines = ["# carbond fake NVML scenario", f'driver version="{self.driver_version}"']
        if self.driver_not_loaded:
            lines.append("driver_not_loaded")
        for g in self.gpus:
            lines.append(f'gpu {g.index} uuid={g.uuid} name="{g.name}" '
                         f"energy_mj={g.energy_millijoules} power_mw={g.power_milliwatts} "
                         f"power_limit_mw={g.power_limit_milliwatts} mig={int(g.mig)}")
            if g.faults:
                lines.append(f"fault {g.index} {' '.join(sorted(g.faults))}")
        for p in self.processes:
            extra = ""
            if p.gpu_instance is not None:
                extra += f" gi={p.gpu_instance}"
            if p.compute_instance is not None:
                extra += f" ci={p.compute_instance}"
            lines.append(f"proc {p.gpu} pid={p.pid} mem={p.memory_bytes} type={p.kind}{extra}")
        for s in self.samples:
            lines.append(f"sample {s.gpu} pid={s.pid} ts={s.timestamp_us} sm={s.sm} mem={s.mem}")
        for m in self.migs:
            lines.append(f"mig {m.gpu} slot={m.slot} uuid={m.uuid} gi={m.gpu_instance} "
                         f"ci={m.compute_instance}")
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        os.replace(tmp, path)


class Driver:
    """carbond's NVML meter and GPU usage tracker in a child process loaded with the fake."""

    def __init__(self, lib_dir: Path | None, scenario: Path, meter: dict[str, Any] | None = None,
                 *, fake_clock: bool = False, proc_root: str = "/proc") -> None:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = str(lib_dir) if lib_dir is not None else "/nonexistent"
        env["FAKE_NVML_SCENARIO"] = str(scenario)
        config = {"meter": meter or {}, "fake_clock": fake_clock, "proc_root": proc_root}
        self._proc = subprocess.Popen(
            [sys.executable, str(DRIVER), json.dumps(config)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def call(self, op: str, **args: Any) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            stderr = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(f"driver died during {op!r}: {stderr}")
        answer = json.loads(line)
        if "exception" in answer:
            raise RuntimeError(f"driver raised during {op!r}: {answer['exception']}")
        return answer["result"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self.call("close")
            finally:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.poll() is None:
            try:
                self.close()
            except Exception:
                self._proc.kill()
                self._proc.wait()


def samples_for(gpu: int, pid: int, sm: int, start_us: int, count: int,
                step_us: int = 166_667) -> Iterable[FakeSample]:
    """`count` utilisation samples for one pid, one NVML sampling period apart."""
    return (FakeSample(gpu, pid, start_us + i * step_us, sm) for i in range(count))
