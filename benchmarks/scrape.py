"""Scrape latency and the scrape server under load, against a 500-consumer snapshot.

Run: .venv/bin/python benchmarks/scrape.py [--consumers 500] [--rounds 30]
         [--concurrent 200] [--slowloris 500]

1. Latency: one client on a keep-alive connection. "first" is the first scrape after a new
   snapshot (it encodes the exposition); "cached" the scrapes after it in the same tick.
2. Load: a child process holds `--slowloris` connections that trickle a request header one
   line a second (reopening any the server closes), then fires `--concurrent` scrapes at once,
   each on its own new connection, and reports how many succeeded and how long each took.
   The target: all succeed, each within 2 s. `--client --port P` runs only this part against
   a server already listening on 127.0.0.1:P.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prometheus_client import PlatformCollector, ProcessCollector

from carbond.exporter.app import MetricsApp, MetricsServer
from carbond.web.server import Request
from tests.snapshots import make_snapshot
from tests.web_helpers import Published

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def latency(published: Published, port: int, consumers: int, rounds: int) -> None:
    cases = {
        "text": {},
        "OpenMetrics": {"Accept": OPENMETRICS},
        "text+gzip": {"Accept-Encoding": "gzip"},
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for label, headers in cases.items():
        first, cached, size = [], [], 0
        for tick in range(rounds):
            published.snapshot = make_snapshot(consumers, tick=tick + 1)
            for attempt in range(11):
                start = time.perf_counter()
                connection.request("GET", "/metrics", headers=headers)
                response = connection.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - start
                assert response.status == 200
                size = len(body)
                (first if attempt == 0 else cached).append(elapsed)
        cached.sort()
        print(f"  {label:12s} {size:>8d} B  first median {ms(statistics.median(first))}"
              f" (max {ms(max(first))}); cached median {ms(statistics.median(cached))},"
              f" p99 {ms(cached[int(len(cached) * 0.99) - 1])}")
    connection.close()


def server_cpu(consumers: int, rounds: int) -> None:
    """Thread CPU time of the application alone (no sockets), as the old 13.6 ms was."""
    published = Published()
    app = MetricsApp(published.latest, live=ProcessCollector(registry=None),
                     static=PlatformCollector(registry=None))
    for label, headers in (("text", {}), ("OpenMetrics", {"accept": OPENMETRICS}),
                           ("text+gzip", {"accept-encoding": "gzip"})):
        request = Request("GET", "/metrics", "HTTP/1.1", headers)
        first, cached = [], []
        for tick in range(rounds):
            published.snapshot = make_snapshot(consumers, tick=tick + 1)
            for attempt in range(11):
                start = time.thread_time()
                app(request)
                (first if attempt == 0 else cached).append(time.thread_time() - start)
        print(f"  {label:12s} first median {ms(statistics.median(first))}; "
              f"cached median {ms(statistics.median(cached))}")


async def _slowloris(port: int, count: int, stop: asyncio.Event,
                     opened: list[int]) -> None:
    """Keep `count` connections open, each sending one header line a second."""

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            opened[0] += 1
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                line = 0
                while not stop.is_set() and not reader.at_eof():
                    line += 1
                    writer.write(b"X-Slow-%d: x\r\n" % line)
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(1), timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                opened[0] -= 1
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


async def _scrape(port: int) -> tuple[bool, float]:
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.close()
        ok = head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        ok = False
    return ok, time.perf_counter() - start


async def _load(port: int, slowloris: int, concurrent: int) -> dict[str, object]:
    stop = asyncio.Event()
    opened = [0]
    attackers = asyncio.ensure_future(_slowloris(port, slowloris, stop, opened))
    deadline = time.monotonic() + 60
    while opened[0] < slowloris and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    open_before = opened[0]
    results = await asyncio.gather(*(_scrape(port) for _ in range(concurrent)))
    open_after = opened[0]
    stop.set()
    await asyncio.wait_for(attackers, timeout=30)
    times = sorted(t for _, t in results)
    return {
        "slowloris_open_before": open_before, "slowloris_open_after": open_after,
        "ok": sum(ok for ok, _ in results), "total": len(results),
        "median_s": statistics.median(times), "p99_s": times[int(len(times) * 0.99) - 1],
        "max_s": times[-1],
    }


def client(port: int, slowloris: int, concurrent: int) -> None:
    raise_fd_limit()
    print(json.dumps(asyncio.run(_load(port, slowloris, concurrent))))


def load(port: int, slowloris: int, concurrent: int) -> dict[str, object]:
    peak = [threading.active_count()]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], threading.active_count())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        output = subprocess.run(
            [sys.executable, __file__, "--client", "--port", str(port),
             "--slowloris", str(slowloris), "--concurrent", str(concurrent)],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout
    finally:
        done.set()
        watcher.join()
    result = json.loads(output)
    result["server_threads_peak"] = peak[0] - 1  # without the watcher
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--consumers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--slowloris", type=int, default=500)
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.client:
        client(args.port, args.slowloris, args.concurrent)
        return 0
    raise_fd_limit()
    published = Published(make_snapshot(args.consumers))
    server = MetricsServer("127.0.0.1", 0, published.latest)
    server.start()
    try:
        print(f"{args.consumers} consumers (+ idle, other, one non-UTF-8 name), "
              f"{args.rounds} ticks x 10 cached scrapes, keep-alive, wall time per scrape:")
        latency(published, server.port, args.consumers, args.rounds)
        print("server CPU per scrape (the application on one thread, no sockets):")
        server_cpu(args.consumers, args.rounds)
        published.snapshot = make_snapshot(args.consumers, tick=args.rounds + 1)
        result = load(server.port, args.slowloris, args.concurrent)
    finally:
        server.stop()
    print(f"{result['total']} concurrent scrapes (new connection each, no gzip) with "
          f"{result['slowloris_open_before']} slowloris connections open "
          f"({result['slowloris_open_after']} still open after):")
    print(f"  {result['ok']}/{result['total']} succeeded; median {ms(result['median_s'])}, "
          f"p99 {ms(result['p99_s'])}, max {ms(result['max_s'])}; "
          f"server threads at peak {result['server_threads_peak']}")
    good = result["ok"] == result["total"] and result["max_s"] <= 2.0
    print("target (all succeed, each within 2 s):", "met" if good else "NOT met")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
