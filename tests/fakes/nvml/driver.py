"""Child process for the NVML tests: carbond's real meter and usage code over the real pynvml.

Started by tests.fakes.nvml.Driver with LD_LIBRARY_PATH pointing at the compiled fake. Reads one
JSON command per line on stdin and answers one JSON line on stdout. Each command is one call on
the meter or the usage tracker; the daemon's own tick over them is tested through `carbond run`
(tests/test_nvml_daemon.py). A child process is needed because pynvml binds one library per
process, and the tests need several (with and without `_v3`, none at all) and a fake clock.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import traceback
from typing import Any

from carbond.attribution import gpu_basis
from carbond.meters.nvml import NvmlMeter
from carbond.types import Consumer
from carbond.workloads.gpu import (
    GpuUsageTracker,
    PidConsumers,
    consumer_weights,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cgroup_consumer(path: str) -> Consumer:
    return Consumer("cgroup", path.strip("/") or "/")


def label(consumer: Consumer) -> str:
    return f"{consumer.kind}:{consumer.name}"


def main() -> None:
    config = json.loads(sys.argv[1])
    clock = FakeClock() if config["fake_clock"] else None
    kwargs: dict[str, Any] = dict(config["meter"])
    if clock is not None:
        kwargs["clock"] = clock
    meter = NvmlMeter(**kwargs)
    tracker = GpuUsageTracker(meter)
    pid_to_consumer = PidConsumers(cgroup_consumer, "/", config["proc_root"])

    def usage_json(u: Any) -> dict[str, Any]:
        basis, weights = gpu_basis(u.sm, u.memory)  # the basis attribution will split by
        return {"basis": basis, "weights": {str(k): v for k, v in weights.items()},
                "gpu_instances": {str(k): v for k, v in u.gpu_instances.items()},
                "consumers": {label(c): w for c, w in
                              consumer_weights(weights, pid_to_consumer).items()},
                "error": u.error}

    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        try:
            if op == "read":
                r = meter.read()
                result: Any = {"devices": {d.device: d.joules for d in r.devices},
                               "sources": sorted({(d.component, d.source) for d in r.devices}),
                               "errors": r.errors, "wraps": r.wraps, "resets": r.resets,
                          "up": meter.up()}
            elif op == "usage":
                result = {k: usage_json(v) for k, v in tracker.sample().items()}
            elif op == "report":
                result = [dataclasses.astuple(line) for line in meter.report()]
            elif op == "gpus":
                result = [dataclasses.asdict(g) for g in meter.gpus()]
            elif op == "state":
                result = {"up": meter.up(), "errors": meter.errors_total, "reason": meter.reason,
                          "driver": meter.driver_version, "usage_errors": tracker.errors,
                          "threads": sorted(t.name for t in threading.enumerate())}
            elif op == "advance":
                assert clock is not None
                clock.now += float(command["seconds"])
                result = clock.now
            elif op == "sample_power":
                meter.sample_power()
                result = None
            elif op == "close":
                started = time.monotonic()
                meter.close()
                result = {"seconds": time.monotonic() - started,
                          "threads": sorted(t.name for t in threading.enumerate())}
            else:
                raise ValueError(f"unknown op {op}")
            answer = {"result": result}
        except Exception:
            answer = {"exception": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if op == "close":
            break


if __name__ == "__main__":
    main()
