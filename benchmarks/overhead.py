"""carbond's own cost on a realistic host: CPU per tick and per scrape, RSS, against the floor.

Each scenario builds real cgroups (a private subtree of the v2 hierarchy) with real processes
in them plus a fake two-socket RAPL tree, starts `carbond run` on that subtree
(`--cgroup-root`), and once per interval, half-way between two ticks: advances the fake energy
counters, reads carbond's CPU clock, scrapes /metrics, reads the CPU clock again, reads its
VmRSS, and runs the floor: a bare loop that only reads the files carbond must read (every
cpu.stat of the tree; in process mode also cgroup.procs and every /proc/PID/stat; with GPUs
also the NVML calls and each GPU process's /proc/PID/cgroup), once opening each file and once
with pread on descriptors kept open, as carbond does. CPU per tick is the growth of carbond's
whole-process CPU clock from after one scrape to before the next (one tick, plus its idle
threads); per scrape, the growth across the request. All figures are medians.

Scenarios (--scenario, repeatable; default: cgroups large procs consumers idle5s gpu):
  cgroups    --procs N sleeping processes over --cgroups M cgroups (default 1,000 in 100)
  large      10,000 sleeping processes in 1,000 cgroups (a big Kubernetes or Slurm node)
  procs      --procs N sleeping processes in the root of the walked tree (process mode on)
  consumers  --consumers 500 cgroups, each with a process using a little CPU every tick, so
             each is a consumer with energy and its own series (max_consumers = that number)
  idle5s     1,000 processes in 100 cgroups at the default 5 s interval, one scrape per 15 s:
             mean share of one core over the run
  gpu        `cgroups` plus what the GPU and carbon issues added, enabled: 8 GPUs of the stand-in
             libnvidia-ml.so.1 (tests/fakes/nvml, loaded by the real pynvml), each running 4 of
             the processes with fresh utilisation samples every interval, and a live Electricity
             Maps feed from a local fake server refreshed every 15 s (gcc needed)
--matrix: `cgroups` for every N in 100, 1,000, 5,000 and M in 10, 100, 500.
--soak 30m: --interval 100ms with 200 cgroups a second made and removed (each with a process
           that uses CPU), process mode, 100 sleepers: RSS and open fds over time, the most
           named consumers a scrape showed (one a second), tick failures.

Run as root from the repository root:  .venv/bin/python benchmarks/overhead.py
Everything it creates (cgroups, processes, temp dirs) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._host import (
    BenchHost,
    can_run,
    process_cpu_seconds,
    read_file,
    rss_mib,
)
from carbond.config.units import parse_seconds
from carbond.workloads.processes import read_pids
from tests import powercap
from tests.fakes.intensity_server import EM_TOKEN, FakeIntensityServer
from tests.fakes.nvml import SONAME, FakeGpu, FakeProcess, FakeSample, Scenario, build_fake

WATTS = 40.0  # what the fake RAPL zones draw, each
GPU_WATTS = 300.0  # what each fake GPU draws


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


class FakeGpus:
    """Busy GPUs of the stand-in libnvidia-ml.so.1: each runs some of the host's processes and
    reports a fresh utilisation sample per process every interval, as NVML does under load."""

    def __init__(self, tmp: str, pids: list[int], count: int = 8, per_gpu: int = 4) -> None:
        self.lib = build_fake(Path(tmp) / "nvml")
        self.path = Path(tmp) / "nvml.scenario"
        self.scenario = Scenario(
            gpus=[FakeGpu(i, f"GPU-{i:08x}-0000-4000-8000-000000000000", "NVIDIA H100 80GB HBM3",
                          energy_millijoules=1_000_000, power_milliwatts=int(GPU_WATTS * 1e3))
                  for i in range(count)],
            processes=[FakeProcess(i, pids[(i * per_gpu + k) * 7 % len(pids)], 8 << 30)
                       for i in range(count) for k in range(per_gpu)],
        )
        self.advance(0.0)

    def env(self) -> dict[str, str]:
        return {"LD_LIBRARY_PATH": str(self.lib), "FAKE_NVML_SCENARIO": str(self.path),
                "FAKE_NVML_RELOAD": "changed"}  # parse only a new file: measure carbond, not it

    def advance(self, seconds: float) -> None:
        now_us = int(time.time() * 1e6)
        for gpu in self.scenario.gpus:
            gpu.energy_millijoules += int(GPU_WATTS * seconds * 1e3)
        self.scenario.samples = [FakeSample(p.gpu, p.pid, now_us, sm=10 + 20 * (p.pid % 4))
                                 for p in self.scenario.processes]
        self.scenario.write(self.path)


class Carbond:
    """`carbond run` on the host's subtree and a fake RAPL tree, as a child process."""

    def __init__(self, host: BenchHost, interval: float, attribution: dict[str, object],
                 profile: str | None = None, *, gpus: FakeGpus | None = None,
                 intensity: dict[str, Any] | None = None) -> None:
        self.interval = interval
        self.power = powercap.intel_two_socket(f"{host.tmp}/powercap")
        self.gpus = gpus
        config = f"{host.tmp}/carbond.yaml"
        settings: dict[str, Any] = {"attribution": {"idle_watts": {"cpu": 0}, **attribution}}
        if intensity:
            settings["intensity"] = intensity
        with open(config, "w") as f:  # JSON is YAML
            json.dump(settings, f)
        self.port = free_port()
        self.log = open(f"{host.tmp}/carbond.log", "w+b")  # noqa: SIM115
        argv = [
            sys.executable, "-m", "carbond", "run", "--config", config,
            "--listen", f"127.0.0.1:{self.port}", "--interval", f"{interval}s",
            "--powercap-root", f"{host.tmp}/powercap", "--cgroup-root", host.root,
            "--state-dir", f"{host.tmp}/state", "--log-level", "warning",
        ]
        env = {**os.environ, **(gpus.env() if gpus else {})}
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        self.profiler: subprocess.Popen[bytes] | None = None
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if profile:
            self.profiler = subprocess.Popen(
                ["py-spy", "record", "--nonblocking", "-r", "250", "-f", "flamegraph",
                 "-o", profile, "--pid", str(self.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"carbond exited: {self.output()}")
            try:
                self.scrape()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("carbond did not answer on /metrics within 60 s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.read().decode()

    def next_tick(self) -> float:
        """Monotonic time just after the next tick. Ticks run on a thread of their own and the
        main thread only waits for signals (issue 21), so the tick count is polled."""
        before = metric(self.scrape(), "carbond_tick_duration_seconds_count")
        deadline = time.monotonic() + 3 * self.interval + 5
        while time.monotonic() < deadline:
            time.sleep(0.005)
            if metric(self.scrape(), "carbond_tick_duration_seconds_count") != before:
                return time.monotonic()
        raise RuntimeError("no tick seen")

    def advance_energy(self) -> None:
        for zone in self.power.zones.values():
            zone.advance_uj(int(WATTS * self.interval * 1e6))
        if self.gpus:
            self.gpus.advance(self.interval)

    def __enter__(self) -> Carbond:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                self.profiler.wait()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclass
class Result:
    name: str
    tick_ms: list[float] = field(default_factory=list)
    scrape_ms: list[float] = field(default_factory=list)
    floor_ms: list[float] = field(default_factory=list)
    pread_floor_ms: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    series: int = 0
    mean_tick_wall_ms: float = 0.0
    core_percent: float | None = None
    notes: list[str] = field(default_factory=list)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(carbond: Carbond, name: str, seconds: float, floor: Floor,
            scrape_every: int = 1, warmup_ticks: int = 2) -> Result:
    """Sample once per interval, half-way between ticks; see the module docstring."""
    interval = carbond.interval
    result = Result(name)
    tick = carbond.next_tick()
    for _ in range(warmup_ticks - 1):
        tick = carbond.next_tick()
    when = tick + interval / 2
    rounds = max(2, round(seconds / interval))
    after_scrape: float | None = None
    first_cpu = first_time = 0.0
    text = ""
    for k in range(rounds + 1):
        time.sleep(max(0.0, when - time.monotonic()))
        carbond.advance_energy()
        before = process_cpu_seconds(carbond.pid)
        if k == 0:
            first_cpu, first_time = before, time.monotonic()
        if after_scrape is not None:
            result.tick_ms.append((before - after_scrape) * 1e3)
        after_scrape = before
        if k % scrape_every == 0:
            text = carbond.scrape()
            after_scrape = process_cpu_seconds(carbond.pid)
            result.scrape_ms.append((after_scrape - before) * 1e3)
        result.rss.append(rss_mib(carbond.pid))
        start = time.thread_time()
        floor.by_path()
        middle = time.thread_time()
        floor.kept_open()
        result.floor_ms.append((middle - start) * 1e3)
        result.pread_floor_ms.append((time.thread_time() - middle) * 1e3)
        when += interval
    floor.close()
    end_cpu, end_time = process_cpu_seconds(carbond.pid), time.monotonic()
    result.core_percent = 100 * (end_cpu - first_cpu) / (end_time - first_time)
    text = carbond.scrape()
    result.series = sum(
        1 for line in text.splitlines() if line.startswith("carbond_consumer_energy_joules_total{")
    )
    count = metric(text, "carbond_tick_duration_seconds_count") or 1
    wall = metric(text, "carbond_tick_duration_seconds_sum") or 0.0
    result.mean_tick_wall_ms = wall / count * 1e3
    return result


class NvmlFloor:
    """The NVML calls a tick can't avoid, on the same stand-in library: per GPU the energy
    counter, both process lists and the utilisation samples since the last call."""

    def __init__(self, gpus: FakeGpus) -> None:
        self._env = {k: v for k, v in gpus.env().items() if k.startswith("FAKE_NVML_")}
        os.environ.update(self._env)  # the fake reads these on every call
        # pynvml's dlopen("libnvidia-ml.so.1") then finds this library by its soname
        ctypes.CDLL(str(gpus.lib / SONAME), mode=ctypes.RTLD_GLOBAL)
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                        for i in range(pynvml.nvmlDeviceGetCount())]
        self.last_seen_us = [0] * len(self.handles)

    def read(self) -> list[int]:
        """The pids running on the GPUs, whose /proc/PID/cgroup a tick must read."""
        nvml, pids = self.nvml, []
        for i, handle in enumerate(self.handles):
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            pids += [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            pids += [p.pid for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)]
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(handle, self.last_seen_us[i])
            except nvml.NVMLError:  # NotFound: nothing new
                samples = []
            self.last_seen_us[i] = max([s.timeStamp for s in samples] + [self.last_seen_us[i]])
        return pids

    def close(self) -> None:
        self.nvml.nvmlShutdown()
        for key in self._env:
            os.environ.pop(key, None)


class Floor:
    """The bare reads a tick can't avoid: every cpu.stat of the tree, with `processes` the
    root's cgroup.procs and each listed /proc/PID/stat, and with `nvml` its calls and the
    /proc/PID/cgroup of each GPU process.

    `by_path()` opens, reads and closes each file (the floor the targets refer to);
    `kept_open()` re-reads descriptors opened once with pread, as carbond itself does.
    """

    def __init__(self, host: BenchHost, processes: bool = False,
                 nvml: NvmlFloor | None = None) -> None:
        self.files = host.counter_files()
        self.procs_file = f"{host.root}/cgroup.procs" if processes else None
        self.nvml = nvml
        self._fds: dict[str, int] = {}

    def _paths(self) -> list[str]:
        pids = read_pids(self.procs_file) if self.procs_file else []
        gpu_pids = self.nvml.read() if self.nvml else []
        return (self.files + [f"/proc/{pid}/stat" for pid in pids]
                + [f"/proc/{pid}/cgroup" for pid in gpu_pids])

    def by_path(self) -> None:
        for path in self._paths():
            read_file(path)

    def kept_open(self) -> None:
        for path in self._paths():
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            os.pread(fd, 4096, 0)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.nvml:
            self.nvml.close()


def run_cgroups(args: argparse.Namespace, procs: int, cgroups: int) -> Result:
    with BenchHost() as host:
        host.make_cgroups(cgroups)
        host.spawn_sleepers(procs, host.cgroups)
        with Carbond(host, args.interval, {"processes": "off"},
                     _profile(args, "cgroups")) as carbond:
            return measure(carbond, f"{procs:,} processes in {cgroups} cgroups", args.seconds,
                           Floor(host))


def run_procs(args: argparse.Namespace) -> Result:
    with BenchHost() as host:
        host.spawn_sleepers(args.procs)
        with Carbond(host, args.interval, {"processes": "on"}, _profile(args, "procs")) as carbond:
            return measure(carbond, f"{args.procs:,} processes in the root cgroup (process mode)",
                           args.seconds, Floor(host, processes=True))


def run_consumers(args: argparse.Namespace) -> Result:
    with BenchHost() as host:
        host.make_cgroups(args.consumers)
        host.spawn([host.spinner()], args.consumers, host.cgroups)
        with Carbond(host, args.interval, {"processes": "off", "max_consumers": args.consumers},
                     _profile(args, "consumers")) as carbond:
            return measure(carbond, f"{args.consumers} consumers, each using CPU", args.seconds,
                           Floor(host), warmup_ticks=3)


def run_idle5s(args: argparse.Namespace) -> Result:
    with BenchHost() as host:
        host.make_cgroups(100)
        host.spawn_sleepers(1000, host.cgroups)
        with Carbond(host, 5.0, {"processes": "off"}, _profile(args, "idle5s")) as carbond:
            return measure(carbond, "1,000 processes in 100 cgroups, 5 s interval, scrape 15 s",
                           max(args.seconds, 30), Floor(host), scrape_every=3,
                           warmup_ticks=1)


def run_gpu(args: argparse.Namespace) -> Result:
    feed = FakeIntensityServer().start()
    try:
        with BenchHost() as host:
            host.make_cgroups(100)
            host.spawn_sleepers(1000, host.cgroups)
            gpus = FakeGpus(host.tmp, [proc.pid for proc in host.procs])
            token = f"{host.tmp}/em-token"
            with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(EM_TOKEN)
            intensity = {"zone": "DE", "refresh": "15s", "providers": [
                {"electricitymaps": {"token_file": token, "url": feed.url}}]}
            with Carbond(host, args.interval, {"processes": "off"}, _profile(args, "gpu"),
                         gpus=gpus, intensity=intensity) as carbond:
                result = measure(carbond, "1,000 processes in 100 cgroups, 8 GPUs, live intensity",
                                 args.seconds, Floor(host, nvml=NvmlFloor(gpus)))
                lines = carbond.scrape().splitlines()
    finally:
        feed.stop()
    if not any(line.startswith("carbond_grid_intensity_grams_per_kwh{")
               and 'provider="electricitymaps"' in line for line in lines):
        result.notes.append("intensity NOT from electricitymaps")
    gpu_series = [line for line in lines
                  if line.startswith("carbond_consumer_energy_joules_total{")
                  and 'component="gpu"' in line]
    result.notes.append(f"{len(gpu_series)} GPU consumer series")
    return result


def _profile(args: argparse.Namespace, name: str) -> str | None:
    if not args.profile:
        return None
    os.makedirs(args.profile, exist_ok=True)
    return os.path.abspath(f"{args.profile}/{name}.svg")


def print_table(results: list[Result]) -> None:
    print()
    print("| scenario | CPU/tick ms | floor ms | ratio | pread floor ms | ratio | scrape ms "
          "| series | RSS MiB | mean tick wall ms | core % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        tick, floor, kept = med(r.tick_ms), med(r.floor_ms), med(r.pread_floor_ms)
        core = f"{r.core_percent:.3f}" if r.core_percent is not None else ""
        print(f"| {r.name} | {tick:.2f} | {floor:.2f} | {tick / floor:.2f} | "
              f"{kept:.2f} | {tick / kept:.2f} | "
              f"{med(r.scrape_ms):.2f} | {r.series} | {max(r.rss):.1f} | "
              f"{r.mean_tick_wall_ms:.2f} | {core} |")
    print()


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM cleans up like Ctrl-C: through every `with` and `finally`."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--scenario", action="append",
                        choices=["cgroups", "large", "procs", "consumers", "idle5s", "gpu"])
    parser.add_argument("--matrix", action="store_true", help="cgroups for every N x M")
    parser.add_argument("--seconds", type=parse_seconds, default=60.0,
                        help="measured time per scenario (default 60s)")
    parser.add_argument("--interval", type=parse_seconds, default=1.0)
    parser.add_argument("--procs", type=int, default=1000)
    parser.add_argument("--cgroups", type=int, default=100)
    parser.add_argument("--consumers", type=int, default=500)
    parser.add_argument("--soak", type=parse_seconds, metavar="DURATION",
                        help="soak mode instead: e.g. 30m (use with --interval 100ms)")
    parser.add_argument("--soak-cgroups", type=int, default=200,
                        help="cgroups made and removed a second in the soak (default 200)")
    parser.add_argument("--soak-max-consumers", type=int, default=200)
    parser.add_argument("--soak-names", type=int, default=0,
                        help="reuse cgroup names from a pool of this many (default: all new)")
    parser.add_argument("--soak-warmup", type=parse_seconds, default=300.0,
                        help="growth is measured from this point (default 5m)")
    parser.add_argument("--soak-report", type=parse_seconds, default=60.0,
                        help="how often RSS and fds are printed (default 1m)")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy flame graphs of carbond per scenario (skews timings)")
    args = parser.parse_args()
    problem = can_run()
    if problem:
        print(f"overhead.py: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, interrupted)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    if args.soak:
        from benchmarks.soak import run_soak  # it builds on this module's Carbond

        run_soak(args, args.soak)
        return 0
    scenarios = args.scenario or ([] if args.matrix else ["cgroups", "large", "procs",
                                                          "consumers", "idle5s", "gpu"])
    runs: list[Callable[[], Result]] = []
    if args.matrix:
        for procs in (100, 1000, 5000):
            for cgroups in (10, 100, 500):
                runs.append(lambda p=procs, c=cgroups: run_cgroups(args, p, c))
    for name in scenarios:
        runs.append({
            "cgroups": lambda: run_cgroups(args, args.procs, args.cgroups),
            "large": lambda: run_cgroups(args, 10_000, 1_000),
            "procs": lambda: run_procs(args),
            "consumers": lambda: run_consumers(args),
            "idle5s": lambda: run_idle5s(args),
            "gpu": lambda: run_gpu(args),
        }[name])
    results = []
    for run in runs:
        result = run()
        results.append(result)
        print(f"  {result.name}: tick {med(result.tick_ms):.2f} ms, floor "
              f"{med(result.floor_ms):.2f} ms, scrape {med(result.scrape_ms):.2f} ms, "
              f"RSS {max(result.rss):.1f} MiB {'; '.join(result.notes)}", flush=True)
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
