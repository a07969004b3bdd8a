"""The ledger: CPU of a flush of 200 consumers, and a generated 400-day ledger of 200
consumers (size on disk, `carbond report --since 30d --by consumer` on it, open and budget
seeding times); with --churn N, RSS while N distinct consumers come and go over simulated days.

Run: .venv/bin/python benchmarks/ledger.py [--rounds 200] [--days 400] [--consumers 200]
     .venv/bin/python benchmarks/ledger.py --churn 120000 [--keep-hours 6] (memory only)
Targets (issue 12): flush <= 20 ms CPU; ledger < 300 MB; report <= 1 s. Issue 21 defect 8:
memory does not grow with every consumer ever seen.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from carbond.config import Budget
from carbond.ledger.budgets import BudgetTracker
from carbond.ledger.ledger import LEDGER_FILE, Ledger
from carbond.ledger.periods import SECONDS_PER_HOUR, floor_hour
from carbond.types import Consumer, DeviceDelta, TickRecord

KINDS = ("unit", "container", "job", "user", "project")


def consumers(count: int) -> list[Consumer]:
    names = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        name = {"unit": f"service-{i}.service", "container": f"docker/{i:012x}",
                "job": f"slurm/{100000 + i}", "user": f"user{i}", "project": f"project-{i}"}[kind]
        names.append(Consumer(kind, name))
    return names


def tick(ledger: Ledger, who: list[Consumer], wall_time: float) -> None:
    energy = {c: {"cpu": random.uniform(1, 100), "dram": random.uniform(0.1, 10),
                  "gpu": random.uniform(0, 300)} for c in who}
    grams = {c: sum(parts.values()) / 3.6e6 * 350 for c, parts in energy.items()}
    embodied = {c: g * 0.1 for c, g in grams.items()}
    devices = tuple(DeviceDelta("cpu", f"package-{i}", "rapl", 100.0) for i in range(2))
    ledger.record(TickRecord(wall_time, 5.0, energy, grams, embodied, devices, 350.0,
                             "electricitymaps"))


def bench_flush(rounds: int, count: int) -> None:
    """Each round: one 5 s tick of `count` consumers recorded, then flushed; the flush is
    what runs every 30 s in the daemon (with six ticks pending it writes the same rows)."""
    root = tempfile.mkdtemp(prefix="carbond-bench-ledger-")
    try:
        who = consumers(count)
        with Ledger.open(root) as ledger:
            now = time.time()
            records, flushes = [], []
            for i in range(rounds):
                start = time.thread_time()
                tick(ledger, who, now + 5 * i)
                records.append(time.thread_time() - start)
                start = time.thread_time()
                assert ledger.flush()
                flushes.append(time.thread_time() - start)
        print(f"{count} consumers, {rounds} rounds")
        print(f"record CPU median {statistics.median(records) * 1e3:.3f} ms")
        print(f"flush  CPU median {statistics.median(flushes) * 1e3:.3f} ms, "
              f"p95 {sorted(flushes)[int(0.95 * len(flushes))] * 1e3:.3f} ms (target <= 20 ms)")
    finally:
        shutil.rmtree(root)


def generate(root: str, days: int, count: int) -> int:
    """Writes `days` of hourly rows for `count` consumers ending now, every column non-zero
    (the worst case for size: zeros take no space), through the ledger's own schema."""
    who = consumers(count)
    now = time.time()
    with Ledger.open(root) as ledger:  # creates the schema and the consumers
        tick(ledger, who, now)
        ledger.flush()
    import sqlite3

    conn = sqlite3.connect(os.path.join(root, LEDGER_FILE))
    ids = [i for (i,) in conn.execute("SELECT id FROM consumers ORDER BY id")]
    first = floor_hour(now) - days * 86400
    rows = 0
    rng = random.Random(1)
    conn.execute("BEGIN")
    for hour in range(first, floor_hour(now), SECONDS_PER_HOUR):
        batch = []
        for consumer_id in ids:
            cpu, dram, gpu = rng.uniform(1e3, 4e5), rng.uniform(1e2, 4e4), rng.uniform(1e3, 1e6)
            joules = cpu + dram + gpu
            grams = joules / 3.6e6 * rng.uniform(100, 500)
            batch.append((hour, consumer_id, cpu, dram, gpu, grams, grams * 0.1, joules,
                          joules * 350.0, 1))
        conn.executemany(
            "INSERT OR REPLACE INTO consumer_hours (hour, consumer, cpu_joules, dram_joules,"
            " gpu_joules, grams, embodied_grams, intensity_joules, intensity_weighted,"
            " providers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
        conn.executemany(
            "INSERT OR REPLACE INTO host_hours VALUES (?, 'cpu', ?, 'rapl', ?)",
            [(hour, f"package-{i}", rng.uniform(1e5, 1e6)) for i in range(2)])
        rows += len(batch)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return rows


def bench_history(days: int, count: int, runs: int) -> None:
    root = tempfile.mkdtemp(prefix="carbond-bench-ledger-")
    try:
        start = time.monotonic()
        rows = generate(root, days, count)
        print(f"generated {rows:,} hourly rows ({days} days x {count} consumers) "
              f"in {time.monotonic() - start:.0f} s")
        size = sum(os.path.getsize(os.path.join(root, name)) for name in os.listdir(root))
        print(f"ledger on disk {size / 1e6:.1f} MB (target < 300 MB)")
        command = [sys.executable, "-m", "carbond", "report", "--state-dir", root,
                   "--since", "30d", "--by", "consumer"]
        walls = []
        for _ in range(runs):
            start = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            walls.append(time.monotonic() - start)
        lines = result.stdout.count("\n")
        print(f"`carbond report --since 30d --by consumer`: wall median "
              f"{statistics.median(walls):.3f} s, max {max(walls):.3f} s over {runs} runs, "
              f"{lines} lines (target <= 1 s)")
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "import carbond.cli"], check=True)
        print(f"  of which starting Python and importing carbond.cli: "
              f"{time.monotonic() - start:.3f} s")
        start = time.monotonic()
        ledger = Ledger.open(root)
        opened = time.monotonic() - start
        budgets = [Budget(f"{p}", {}, p, 1e6) for p in ("day", "week", "month", "quarter",
                                                         "year")]
        start = time.monotonic()
        BudgetTracker(budgets, "UTC", ledger)
        seeded = time.monotonic() - start
        ledger.close()
        print(f"Ledger.open (quick_check, totals) {opened:.3f} s; budget seeding "
              f"(day..year, one-off at start) {seeded:.3f} s")
    finally:
        shutil.rmtree(root)


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_churn(count: int, keep_hours: float | None, alive_ticks: int = 4,
                new_per_tick: int = 100, tick_seconds: float = 300.0) -> None:
    """`count` distinct consumers, `new_per_tick` new ones each tick, each drawing for
    `alive_ticks` ticks (about 400 alive at once), a tick of simulated `tick_seconds` flushed
    after each. RSS after the first 10 % of the consumers and at the end; keep_hours None:
    whatever this ledger does by default (before defect 8: every consumer's totals kept)."""
    root = tempfile.mkdtemp(prefix="carbond-bench-ledger-")
    try:
        kinds = ("container", "job", "pod")
        who = [Consumer(kinds[i % 3], f"churn-{i:07d}/{'x' * 24}") for i in range(count)]
        ticks = count // new_per_tick + alive_ticks
        start_wall = time.time() - ticks * tick_seconds
        clock = [start_wall]
        options = {}
        if keep_hours is not None and "keep_seconds" in inspect.signature(Ledger.open).parameters:
            options["keep_seconds"] = keep_hours * 3600.0
        with Ledger.open(root, clock=lambda: clock[0], **options) as ledger:
            marks = {}
            cpu = time.process_time()
            for n in range(ticks):
                first = max(0, (n - alive_ticks + 1) * new_per_tick)
                alive = who[first:min(count, (n + 1) * new_per_tick)]
                clock[0] = start_wall + (n + 1) * tick_seconds
                energy = {c: {"cpu": 10.0, "dram": 1.0} for c in alive}
                grams = {c: 11.0 / 3.6e6 * 350 for c in alive}
                ledger.record(TickRecord(clock[0], tick_seconds, energy, grams, {}, (), 350.0,
                                         "static"))
                assert ledger.flush()
                if n + 1 == ticks // 10:
                    marks["10%"] = rss_bytes()
            cpu = time.process_time() - cpu
            held = getattr(ledger, "consumers_in_memory", None)
            marks["end"] = rss_bytes()
        label = f"keep {keep_hours:g} h" if options else "this ledger's default"
        growth = (marks["end"] - marks["10%"]) / 2**20
        print(f"churn {count:,} consumers over {ticks * tick_seconds / 3600:.0f} simulated h, "
              f"{label}: RSS {marks['10%'] / 2**20:.1f} MiB at 10 %, "
              f"{marks['end'] / 2**20:.1f} MiB at the end (+{growth:.1f} MiB); consumers in "
              f"memory at the end: {held if held is not None else 'all'}; CPU {cpu:.1f} s")
    finally:
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--consumers", type=int, default=200)
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument("--churn", type=int, default=0,
                        help="only the memory benchmark, with this many distinct consumers")
    parser.add_argument("--keep-hours", type=float, default=None)
    args = parser.parse_args()
    if args.churn:
        bench_churn(args.churn, args.keep_hours)
        return
    bench_flush(args.rounds, args.consumers)
    if not args.skip_history:
        bench_history(args.days, args.consumers, args.runs)


if __name__ == "__main__":
    main()
