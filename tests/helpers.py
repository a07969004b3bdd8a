"""Running the real `carbond` command and scraping it over HTTP."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from carbond.types import DeviceDelta, TickRecord

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def wait_for(condition: Callable[[], object], timeout: float = 15.0,
             interval: float = 0.05) -> bool:
    """Poll until `condition()` holds or `timeout` passes: synchronisation without guessing
    how long a loaded machine takes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def select(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        key: value for (metric, key), value in samples.items()
        if metric == name and all(dict(key).get(k) == v for k, v in labels.items())
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(select(samples, name, **labels).values())


class Carbond:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port

    def scrape(self) -> Samples:
        return scrape(self.port)

    def wait_ticks(self, ticks: int, timeout: float = 20.0) -> Samples:
        """Wait until the tick counter has advanced by `ticks` from now."""
        start = total(self.scrape(), "carbond_tick_duration_seconds_count")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.scrape()
            if total(samples, "carbond_tick_duration_seconds_count") >= start + ticks:
                return samples
            time.sleep(0.05)
        raise TimeoutError(f"carbond did not tick {ticks} times in {timeout}s")


@contextlib.contextmanager
def carbond_run(*args: str, env: dict[str, str] | None = None) -> Iterator[Carbond]:
    """`carbond run` on a free port; with a private state directory unless one is passed, so
    no test sees another's ledger."""
    port = free_port()
    state: list[str] = []
    if "--state-dir" not in args:
        state = [tempfile.mkdtemp(prefix="carbond-state-")]
        args = (*args, "--state-dir", state[0])
    process = subprocess.Popen(
        [sys.executable, "-m", "carbond", "run", "--listen", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"carbond exited: {process.stderr.read()}")
            try:
                scrape(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Carbond(process, port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for path in state:
            shutil.rmtree(path, ignore_errors=True)


def tick_record(wall_time: float, seconds: float, energy: Mapping[Any, Mapping[str, float]],
                grams: Mapping[Any, float], embodied_grams: Mapping[Any, float],
                devices: Mapping[tuple[str, str, str], float],
                grams_per_kwh: float | None = None, provider: str | None = None) -> TickRecord:
    """A TickRecord from the tuple-keyed maps tests write by hand."""
    return TickRecord(wall_time, seconds, energy, grams, embodied_grams,
                      tuple(DeviceDelta(c, d, s, j) for (c, d, s), j in devices.items()),
                      grams_per_kwh, provider)
