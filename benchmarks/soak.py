"""The soak of `overhead.py --soak DURATION` (issue 21): `carbond run` at `--interval` (100ms)
while --soak-cgroups (200) cgroups a second are made and removed again, each with a process that
joins it and uses a few microseconds of CPU; 100 sleepers in the walked root, process mode on,
the fake RAPL zones drawing 40 W each, a scrape every second. It prints RSS and open fds over
time, their growth after --soak-warmup (5m), the most named consumers any scrape showed against
max_consumers, and the tick failures. Run through overhead.py (root, gcc), see
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time

from benchmarks._host import BenchHost, rss_mib
from benchmarks.overhead import WATTS, Carbond, metric

CHURNER_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* churner ROOT RATE LIFETIME_MS [NAMES]: RATE cgroups a second, ROOT/churn-N, each with a
   process that joins it, uses a few microseconds of CPU and exits; each cgroup is removed
   LIFETIME_MS after it was made (so that ticks see it). With NAMES, N runs modulo NAMES (names
   come back); else every cgroup has a new name. Runs until killed; prints nothing. */
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    const char *root = argv[1];
    double rate = atof(argv[2]), lifetime = atof(argv[3]) / 1000.0;
    long ring = (long)(rate * lifetime) + 1, made = 0;
    long names = argc > 4 ? atol(argv[4]) : 0;
    char path[4096];
    double next = now();
    for (;;) {
        snprintf(path, sizeof path, "%s/churn-%ld", root, names > 0 ? made % names : made);
        if (mkdir(path, 0755) == 0) {
            pid_t child = fork();
            if (child == 0) {
                snprintf(path + strlen(path), sizeof path - strlen(path), "/cgroup.procs");
                int fd = open(path, O_WRONLY);
                if (fd >= 0 && write(fd, "0", 1) == 1) {
                    for (volatile unsigned i = 0; i < 20000; i++) {}
                }
                _exit(0);
            }
            if (child > 0) waitpid(child, 0, 0);
        }
        if (made >= ring) {
            long gone = made - ring;
            snprintf(path, sizeof path, "%s/churn-%ld", root, names > 0 ? gone % names : gone);
            for (int tries = 0; rmdir(path) != 0 && errno == EBUSY && tries < 100; tries++)
                usleep(1000);
        }
        made++;
        next += 1.0 / rate;
        double wait = next - now();
        if (wait > 0) {
            struct timespec pause = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
            nanosleep(&pause, 0);
        }
    }
}
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def named_consumers(text: str) -> int:
    """Distinct consumers with their own carbond_consumer_energy_joules_total series."""
    names = set()
    for line in text.splitlines():
        if line.startswith("carbond_consumer_energy_joules_total{"):
            labels = line[line.index("{") + 1:line.rindex("}")]
            consumer = labels.split('consumer="', 1)[1].split('"', 1)[0]
            names.add(consumer)
    return len(names - {"idle", "other"})


def draw(carbond: Carbond, stop: threading.Event) -> None:
    """The fake RAPL zones draw WATTS each in real time, so that consumers get energy."""
    last = time.monotonic()
    while not stop.wait(0.05):
        now = time.monotonic()
        for zone in carbond.power.zones.values():
            zone.advance_uj(int(WATTS * (now - last) * 1e6))
        last = now


def run_soak(args: argparse.Namespace, seconds: float) -> None:
    """`--interval` (100ms for issue 21) with --soak-cgroups cgroups a second made and removed
    again (each with a process that uses CPU), 100 sleepers in the walked root, process mode
    on, max_consumers --soak-max-consumers; a scrape every second. Prints RSS and open fds
    over time, the most named consumers any scrape showed, and the tick failures."""
    warmup = min(args.soak_warmup, seconds / 2)
    with BenchHost() as host:
        source, churner = f"{host.tmp}/churner.c", f"{host.tmp}/churner"
        with open(source, "w") as f:
            f.write(CHURNER_C)
        subprocess.run(["gcc", "-O1", "-o", churner, source], check=True)
        host.spawn_sleepers(100)
        limit = args.soak_max_consumers
        with Carbond(host, args.interval, {"processes": "on", "max_consumers": limit}) as carbond:
            churn = subprocess.Popen([churner, host.root, str(args.soak_cgroups), "500",
                                      str(args.soak_names)], stdin=subprocess.DEVNULL)
            host.procs.append(churn)
            stop = threading.Event()
            power = threading.Thread(target=draw, args=(carbond, stop), daemon=True)
            power.start()
            start = time.monotonic()
            carbond.next_tick()
            marks: list[tuple[float, float, int]] = []  # seconds, RSS MiB, open fds
            named_max = scrapes = 0
            failures = 0.0
            next_mark = 0.0
            while (elapsed := time.monotonic() - start) < seconds:
                if churn.poll() is not None:
                    raise RuntimeError(f"the churner exited with {churn.returncode}")
                text = carbond.scrape()
                scrapes += 1
                named_max = max(named_max, named_consumers(text))
                failures = metric(text, "carbond_tick_failures_total") or 0.0
                if elapsed >= next_mark:
                    marks.append((elapsed, rss_mib(carbond.pid), open_fds(carbond.pid)))
                    next_mark += args.soak_report
                    print(f"  soak {elapsed:7.0f} s  RSS {marks[-1][1]:6.1f} MiB  "
                          f"fds {marks[-1][2]:4d}  named <= {named_max}", flush=True)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - start - elapsed)))
            marks.append((time.monotonic() - start, rss_mib(carbond.pid), open_fds(carbond.pid)))
            text = carbond.scrape()
            exits = metric(text, "carbond_exited_tasks_total") or 0
            ticks = metric(text, "carbond_tick_duration_seconds_count") or 0
            failures = metric(text, "carbond_tick_failures_total") or 0.0
            named_max = max(named_max, named_consumers(text))
            churn.kill()
            stop.set()
            power.join()
    warm = min(marks, key=lambda m: abs(m[0] - warmup))
    after = [m for m in marks if m[0] >= warm[0]]
    rss_after = [m[1] for m in after]
    fds_after = [m[2] for m in after]
    print(f"soak {seconds / 60:.1f} min at a {args.interval * 1000:.0f} ms interval: "
          f"{ticks:.0f} ticks, {args.soak_cgroups} cgroups/s made and removed "
          f"({f'names from a pool of {args.soak_names}' if args.soak_names else 'new names'}), "
          f"{exits / seconds:.0f} exited tasks/s ({exits:.0f} in all)")
    at = f"{warm[0] / 60:.1f} min"
    print(f"RSS: start {marks[0][1]:.1f} MiB, at {at} {warm[1]:.1f} MiB, end "
          f"{marks[-1][1]:.1f} MiB, highest after {at} {max(rss_after):.1f} MiB: growth after "
          f"{at} {marks[-1][1] - warm[1]:+.1f} MiB (highest {max(rss_after) - warm[1]:+.1f} MiB;"
          f" target <= 5 MiB)")
    print(f"open fds: start {marks[0][2]}, at {at} {warm[2]}, end {marks[-1][2]}, "
          f"{min(fds_after)}..{max(fds_after)} after {at}")
    print(f"named consumers: at most {named_max} in {scrapes} scrapes (max_consumers {limit})")
    print(f"tick failures: {failures:.0f}")
