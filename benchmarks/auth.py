"""Authenticated scrapes while clients send wrong passwords (issue 21 item 4).

A MetricsServer with basic auth (one user, a real bcrypt hash of --cost, 12 by default) on
127.0.0.1. `--attackers` threads (8) each loop: a new connection, a wrong password for that
user, read the answer. Meanwhile one scraper, whose password verified once (so it is cached),
scrapes /metrics --scrapes times (200) on new connections, 50 ms apart; the scrape latencies'
p50/p99/max are reported with how the attackers were answered, and the server process's CPU.
Then, with no load, the time of one uncached wrong attempt for the known user and for an
unknown one (median of 10 each): they should be equal.
--daemon (root): the same against the real `carbond run --web.config.file` in its own process
(a fake RAPL tree, an empty cgroup v2 subtree, 1 s ticks), so the attackers' client threads
share no interpreter with the server and the scrapes render a live snapshot; the CPU printed
is then the daemon's.
Run:  .venv/bin/python benchmarks/auth.py [--cost 12] [--attackers 8] [--scrapes 200] [--daemon]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

# The repository root in place of this directory: benchmarks/platform.py must not shadow the
# standard library's `platform` (prometheus_client imports it).
sys.path.remove(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bcrypt

from benchmarks._host import BenchHost, process_cpu_seconds
from carbond.exporter.app import MetricsServer
from tests import powercap
from tests.web_helpers import Published

PASSWORD = "correct horse battery staple"


def attempt(port: int, user: str, password: str) -> tuple[int, float]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        connection.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cost", type=int, default=12)
    parser.add_argument("--attackers", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--daemon", action="store_true",
                        help="against `carbond run` in its own process")
    args = parser.parse_args()
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=args.cost)).decode()
    with tempfile.TemporaryDirectory() as directory:
        web = os.path.join(directory, "web.yml")
        with open(web, "w") as handle:
            handle.write(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
        if args.daemon:
            with BenchHost() as host, daemon(directory, web, host.root) as (port, pid):
                run(port, args, lambda: process_cpu_seconds(pid))
            return
        server = MetricsServer("127.0.0.1", 0, Published().latest, web_config=web)
        server.start()
        try:
            run(server.port, args, time.process_time)  # the server runs in this process
        finally:
            server.stop()


@contextlib.contextmanager
def daemon(directory: str, web: str, cgroup_root: str) -> Iterator[tuple[int, int]]:
    """`carbond run` on a fake RAPL tree and an empty cgroup subtree (not the whole host's),
    with basic auth from `web`; (port, pid)."""
    powercap.intel_two_socket(os.path.join(directory, "powercap"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "carbond", "run", "--listen", f"127.0.0.1:{port}",
         "--interval", "1s", "--powercap-root", os.path.join(directory, "powercap"),
         "--state-dir", os.path.join(directory, "state"), "--web.config.file", web,
         "--cgroup-root", cgroup_root,
         "--log-level", "warning"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if attempt(port, "prometheus", PASSWORD)[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("carbond did not serve authenticated scrapes")
            time.sleep(0.1)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(port: int, args: argparse.Namespace, cpu_seconds: Callable[[], float]) -> None:
    assert attempt(port, "prometheus", PASSWORD)[0] == 200  # verified once: cached from now
    quiet = [attempt(port, "prometheus", PASSWORD)[1] for _ in range(20)]
    stop = threading.Event()
    answers: dict[int, int] = {}
    lock = threading.Lock()

    def attacker(index: int) -> None:
        count = 0
        while not stop.is_set():
            code, _ = attempt(port, "prometheus", f"wrong-{index}-{count}")
            count += 1
            with lock:
                answers[code] = answers.get(code, 0) + 1

    threads = [threading.Thread(target=attacker, args=(i,), daemon=True)
               for i in range(args.attackers)]
    cpu_before = cpu_seconds()
    wall_before = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the attack is under way
    latencies, failures = [], 0
    for _ in range(args.scrapes):
        code, seconds = attempt(port, "prometheus", PASSWORD)
        latencies.append(seconds)
        failures += code != 200
        time.sleep(0.05)
    stop.set()
    cpu = (cpu_seconds() - cpu_before) / (time.perf_counter() - wall_before)
    for thread in threads:
        thread.join(timeout=120)
    print(f"cost {args.cost}, {args.attackers} wrong-password clients"
          f"{', carbond run' if args.daemon else ', in-process server'}")
    print(f"  authenticated scrapes, quiet: p50 {statistics.median(quiet) * 1e3:.1f} ms")
    print(f"  authenticated scrapes under attack ({args.scrapes}): p50 "
          f"{statistics.median(latencies) * 1e3:.1f} ms, p99 "
          f"{percentile(latencies, 0.99) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms, "
          f"{failures} not 200")
    whose = "carbond's" if args.daemon else "this process's (server and clients)"
    print(f"  attackers answered: {dict(sorted(answers.items()))}; {whose} CPU "
          f"{cpu * 100:.0f}% of a core")
    known = [attempt(port, "prometheus", f"no-{i}")[1] for i in range(10)]
    unknown = [attempt(port, "nobody", f"no-{i}")[1] for i in range(10)]
    print(f"  one wrong attempt, no load: known user {statistics.median(known) * 1e3:.0f} ms, "
          f"unknown user {statistics.median(unknown) * 1e3:.0f} ms (medians of 10)")


if __name__ == "__main__":
    main()
