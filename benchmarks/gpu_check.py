"""Real-GPU check of carbond's NVML meter and per-process GPU attribution.

Needs an NVIDIA GPU, its driver, nvidia-ml-py and PyTorch with CUDA. While a child process runs a
matrix-multiply loop on one GPU for `--seconds`, this script reads carbond's NvmlMeter and
GpuUsageTracker every `--interval` seconds (as the daemon would each tick) and, independently,
integrates nvmlDeviceGetPowerUsage at 10 Hz. It prints carbond's GPU energy against the
independent figure and the share of the GPU's energy attributed to the loop's pid.

    .venv/bin/python benchmarks/gpu_check.py --seconds 60 --gpu 0

Exit status: 0 when carbond's energy is within --tolerance of the independent integral and the
loop got at least --min-share of its GPU's energy; 1 otherwise; 2 when no GPU/torch is present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from carbond.attribution import GpuWeights, Policy, TickInput, attribute, gpu_basis
from carbond.meters.nvml import NvmlMeter, load_pynvml
from carbond.types import Consumer, DeviceDelta
from carbond.workloads.gpu import (
    GpuUsageTracker,
    consumer_weights,
    pid_cgroup,
)

LOOP = """
import sys, time, torch
device = torch.device(f"cuda:{int(sys.argv[1])}")
seconds = float(sys.argv[2])
a = torch.randn(8192, 8192, device=device)
b = torch.randn(8192, 8192, device=device)
torch.cuda.synchronize(device)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(10):
        c = a @ b
    torch.cuda.synchronize(device)
print("done", flush=True)
"""


class PowerIntegrator:
    """Independent reference: nvmlDeviceGetPowerUsage integrated (trapezoid) at a fixed rate."""

    def __init__(self, nvml: Any, index: int, hz: float = 10.0) -> None:
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._period_s = 1.0 / hz
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._joules = 0.0
        self._last: tuple[float, float] | None = None  # (time, watts)
        self._thread = threading.Thread(target=self._run, name="reference-power", daemon=True)

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def _sample(self) -> None:
        watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        now = time.monotonic()
        with self._lock:
            if self._last is not None:
                self._joules += (self._last[1] + watts) / 2.0 * (now - self._last[0])
            self._last = (now, watts)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self._sample()

    def joules(self) -> float:
        """Energy integrated up to now (samples once more so the window edge is current)."""
        self._sample()
        with self._lock:
            return self._joules

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to load")
    parser.add_argument("--interval", type=float, default=1.0, help="carbond tick, seconds")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="allowed relative difference to the 10 Hz power integral")
    parser.add_argument("--min-share", type=float, default=0.9,
                        help="least share of the GPU's energy the loop must get")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)

    nvml = load_pynvml()
    try:
        import torch
    except ImportError:
        print("gpu_check: PyTorch is not installed", file=sys.stderr)
        return 2
    if nvml is None or not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU / nvidia-ml-py here", file=sys.stderr)
        return 2

    meter = NvmlMeter(nvml)
    if not meter.read().devices:
        print("gpu_check: nvml meter down: " + "; ".join(r.detail for r in meter.report()),
              file=sys.stderr)
        return 2
    for line in meter.report():
        print(f"  {line.device:8} {'ok ' if line.ok else 'BAD'} {line.detail}")
    device = f"gpu-{args.gpu}"
    tracker = GpuUsageTracker(meter)
    reference = PowerIntegrator(nvml, args.gpu)
    reference.start()

    # CUDA index and NVML index agree when CUDA_DEVICE_ORDER=PCI_BUS_ID (set for the child).
    child = subprocess.Popen(
        [sys.executable, "-c", LOOP, str(args.gpu), str(args.seconds)], text=True,
        stdout=subprocess.PIPE, env={**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        print("gpu_check: the matmul loop did not start", file=sys.stderr)
        child.kill()
        return 2

    def to_consumer(pid: int) -> Consumer:
        return Consumer("process", "matmul-loop" if pid == child.pid else f"pid-{pid}")

    # Baseline: first read and usage sample, then one per tick while the loop runs.
    last = {d.device: d.joules for d in meter.read().devices}
    tracker.sample()
    reference_start = reference.joules()
    started = time.monotonic()
    carbond_joules = 0.0
    per_consumer: dict[str, float] = {}
    bases: dict[str, int] = {}
    ticks = 0
    while child.poll() is None:
        time.sleep(args.interval)
        reading = meter.read()
        usage = tracker.sample()
        for energy in reading.devices:
            previous = last.get(energy.device)
            last[energy.device] = energy.joules
            if energy.device != device or previous is None:
                continue
            delta = energy.joules - previous
            carbond_joules += delta
            gpu_usage = usage.get(device)
            weights = GpuWeights()
            if gpu_usage:
                weights = GpuWeights(consumer_weights(gpu_usage.sm, to_consumer),
                                     consumer_weights(gpu_usage.memory, to_consumer))
            basis, _ = gpu_basis(weights.sm, weights.memory)
            bases[str(basis)] = bases.get(str(basis), 0) + 1
            tick = TickInput(args.interval, [DeviceDelta("gpu", device, "nvml", delta)], {},
                             {device: weights})
            for consumer, parts in attribute(tick, Policy()).energy.items():
                joules = parts.get("gpu", 0.0)
                per_consumer[consumer.name] = per_consumer.get(consumer.name, 0.0) + joules
        ticks += 1
    elapsed = time.monotonic() - started
    reference_joules = reference.joules() - reference_start
    reference.stop()
    loop_cgroup = pid_cgroup(child.pid)  # gone by now; shown for completeness
    meter.close()

    loop_joules = per_consumer.get("matmul-loop", 0.0)
    share = loop_joules / carbond_joules if carbond_joules > 0 else 0.0
    relative = (carbond_joules - reference_joules) / reference_joules if reference_joules else 0.0
    info = next((g for g in meter.gpus() if g.device == device), None)
    result = {
        "device": device, "gpu": info.name if info else "", "uuid": info.uuid if info else "",
        "method": info.method if info else "", "seconds": round(elapsed, 2), "ticks": ticks,
        "carbond_joules": round(carbond_joules, 3), "reference_joules": round(reference_joules, 3),
        "relative_difference": round(relative, 5),
        "mean_watts": round(carbond_joules / elapsed, 2) if elapsed else 0.0,
        "loop_pid": child.pid, "loop_cgroup": loop_cgroup, "loop_joules": round(loop_joules, 3),
        "loop_share": round(share, 4), "bases": bases,
        "consumers": {k: round(v, 3) for k, v in sorted(per_consumer.items())},
    }
    ok = abs(relative) <= args.tolerance and share >= args.min_share
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{device} {result['gpu']} ({result['uuid']}) via {result['method']}")
        print(f"  window            {elapsed:8.2f} s, {ticks} ticks of {args.interval} s")
        print(f"  carbond energy    {carbond_joules:10.1f} J  ({result['mean_watts']} W mean)")
        print(f"  10 Hz power sum   {reference_joules:10.1f} J  (difference {relative:+.2%})")
        print(f"  matmul loop pid {child.pid}: {loop_joules:.1f} J = {share:.1%} of {device}")
        print(f"  usage basis per tick: {bases}")
        print(f"  consumers: {result['consumers']}")
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
