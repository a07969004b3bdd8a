"""The metadata resolver's cost on a node of 1,000 pods with 3,000 containers (issue 20).

A stand-in CRI server (tests/identity_servers.py, the vendored runtime.v1 protos, containerd's
answer shapes) on a Unix socket serves the pods. Measured, as thread CPU time (medians):

- one list call (ListPodSandbox + ListContainers) and its parse, on the source thread;
- building the cache: the first lookup of each of the 4,000 IDs (pods and containers);
- the per-tick cost: 4,000 lookups of known IDs, what a tick adds;
- with root and a cgroup v2 hierarchy: a real tree of the systemd driver's layout (1,000 pod
  cgroups, each with a sandbox and 3 container scopes, 5,000 cgroups) read by carbond's CPU
  collector, tick CPU without and with the lookups of every consumer;
- how long after its runtime lists it a new pod is named (wall time), at the default
  min_list_seconds;
- the whole daemon tick (`Daemon.tick()`: the CPU collector over that tree, a fake RAPL tree,
  renaming, attribution, accounting, budgets, the exporter's snapshot with
  carbond_consumer_info), metadata on against metadata off, process CPU time (the cgroup walk
  runs on a worker thread), interleaved; with a low-duty spinner in every tenth container so
  300 consumers have energy each tick; and how many ticks a new pod's container carries its
  ID name once its cgroup and its runtime's listing exist.

Run: .venv/bin/python benchmarks/identity.py [--pods 1000] [--rounds 30]
Everything it creates (server, socket, cgroups) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._host import UNIFIED, BenchHost, can_run
from carbond.commands.build import build_cpu_usage, build_daemon, build_meters
from carbond.config import Config
from carbond.types import Consumer
from carbond.workloads.cgroups import CgroupReader, cgroup_root
from carbond.workloads.cpu import CpuUsageCollector
from carbond.workloads.identity.cri import CriSource
from carbond.workloads.identity.resolver import MetadataResolver
from carbond.workloads.naming import CgroupNamer
from tests import powercap
from tests.identity_servers import CriServer, Pod, pod


def node(pods: int) -> list[Pod]:
    return [pod(f"team-{i % 20}", f"app-{i}", {"main": (), "sidecar": (), "proxy": ()})
            for i in range(pods)]


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def thread_cpu(action: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.thread_time()
        action()
        samples.append(time.thread_time() - start)
    return samples


def ids(pods: list[Pod]) -> list[Consumer]:
    found = [Consumer("pod", f"pod/{p.uid}") for p in pods]
    found += [Consumer("container", f"containerd/{c.id[:12]}") for p in pods
              for c in p.containers]
    return found


def pod_cgroups(host: BenchHost, p: Pod) -> list[str]:
    """The pod's container scopes (sandbox first) in the systemd driver's layout."""
    pod_dir = ("kubepods.slice/kubepods-burstable.slice/"
               f"kubepods-burstable-pod{p.uid.replace('-', '_')}.slice")
    made = []
    for ident in (p.sandbox_id, *(c.id for c in p.containers)):
        made.append(os.path.join(host.root, pod_dir, f"cri-containerd-{ident}.scope"))
        os.makedirs(made[-1])
    return made


def cgroup_tick(pods: list[Pod], resolver: MetadataResolver, rounds: int) -> None:
    why = can_run()
    if why:
        print(f"real cgroup tree: skipped ({why})")
        return
    with BenchHost(UNIFIED) as host:
        for p in pods:
            pod_cgroups(host, p)
        collector = CpuUsageCollector(CgroupReader(cgroup_root(host.root), CgroupNamer()))
        collector.tick()
        usage: dict[Consumer, float] = {}

        def off() -> None:
            usage.clear()
            usage.update(collector.tick().usage)

        def on() -> None:
            off()
            for consumer in usage:
                resolver.lookup(consumer)

        on()  # every consumer resolved once: the steady state
        without = thread_cpu(off, rounds)
        with_lookups = thread_cpu(on, rounds)
        print(f"real tree, {len(usage)} consumers: collector tick {ms(without):.2f} ms, "
              f"with lookups {ms(with_lookups):.2f} ms, ratio "
              f"{ms(with_lookups) / ms(without):.3f}")
        collector.close()


def daemon_ticks(pods: list[Pod], socket_path: str, rounds: int) -> None:
    """Whole daemon ticks, metadata off and on, over one real tree; then a new pod."""
    why = can_run()
    if why:
        print(f"daemon ticks: skipped ({why})")
        return
    with BenchHost(UNIFIED) as host:
        containers = [path for p in pods for path in pod_cgroups(host, p)[1:]]
        host.spawn([host.spinner()], len(containers) // 10, containers[::10])
        rapl = tempfile.mkdtemp(prefix="carbond-bench-rapl-")
        runners = []
        try:
            zones = powercap.intel_two_socket(rapl).zones.values()
            config = Config(powercap_root=rapl, cgroup_root=host.root, nvml_enabled="off",
                            model_enabled="off")
            daemons = {}
            for label, resolver in (("off", None), ("on", MetadataResolver(
                    [CriSource([socket_path])]))):
                cpu = build_cpu_usage(config, CgroupNamer(config.rules))
                daemon, runner = build_daemon(config, meters=build_meters(config), cpu=cpu,
                                              feed=None, ledger=None, resolver=resolver)
                runner.start()
                runners.append(runner)
                daemons[label] = daemon
            on = daemons["on"]
            named = Consumer("container", f"{pods[0].namespace}/{pods[0].name}/main")
            while not on.pipeline.names.labels(named).get("container"):
                on.tick()
                time.sleep(0.2)
            samples: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(rounds):
                for label, daemon in daemons.items():
                    for zone in zones:
                        zone.advance_uj(5_000_000)
                    started = time.process_time()
                    daemon.tick()
                    samples[label].append(time.process_time() - started)
            off_ms, on_ms = ms(samples["off"]), ms(samples["on"])
            paired = statistics.median(b / a for a, b in zip(samples["off"], samples["on"],
                                                             strict=True))
            exported = len(on.latest().consumer_info)
            print(f"daemon tick, {len(containers) + len(pods)} container scopes, "
                  f"{len(containers) // 10} with energy each tick: metadata off {off_ms:.1f} ms,"
                  f" on {on_ms:.1f} ms, ratio of medians {on_ms / off_ms:.3f}, median of "
                  f"paired ratios {paired:.3f} ({exported} consumer_info series)")

            new = pod("late", "new-1", {"main": ()})
            pods.append(new)  # the runtime lists it from now on...
            pod_cgroups(host, new)  # ... and its cgroups exist
            late = Consumer("container", "late/new-1/main")
            ticks = 0
            while not on.pipeline.names.labels(late).get("container"):
                ticks += 1
                on.tick()
                time.sleep(1.0)  # a 1 s interval, five times the default's pace
            print(f"new pod: {ticks - 1} tick(s) with its ID name at a 1 s interval, named "
                  f"from tick {ticks} after its runtime listed it")
        finally:
            for runner in runners:
                runner.stop()
            shutil.rmtree(rapl, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    pods = node(args.pods)
    directory = tempfile.mkdtemp(prefix="cbid-", dir="/tmp")
    socket_path = os.path.join(directory, "cri.sock")
    server = CriServer(socket_path, pods).start()
    try:
        source = CriSource([socket_path])
        table = source.fetch([], 30.0)
        walls = []
        for _ in range(5):
            started = time.monotonic()
            source.fetch([], 30.0)
            walls.append(time.monotonic() - started)
        lists = thread_cpu(lambda: source.fetch([], 30.0), 5)
        print(f"{args.pods} pods, {sum(len(p.containers) for p in pods)} containers: "
              f"{len(table)} table entries")
        print(f"one list call: {ms(walls):.1f} ms wall, {ms(lists):.1f} ms CPU on the source "
              f"thread; every 5 min = {ms(lists) / 60:.2f} ms per 5 s tick amortised")

        consumers = ids(pods)
        builds = []
        for _ in range(5):
            resolver = MetadataResolver([source], min_list_seconds=0.0)
            for consumer in consumers:
                resolver.lookup(consumer)  # asks for the list
            resolver.round_now("cri")
            started = time.thread_time()
            for consumer in consumers:
                resolver.lookup(consumer)
            builds.append(time.thread_time() - started)
        print(f"cache build, first lookup of {len(consumers)} IDs: {ms(builds):.2f} ms")

        def tick() -> None:
            for consumer in consumers:
                resolver.lookup(consumer)

        per_tick = thread_cpu(tick, args.rounds)
        print(f"per tick, {len(consumers)} lookups of known IDs: {ms(per_tick):.3f} ms "
              f"({ms(per_tick) * 1e3 / len(consumers):.3f} us each)")
        unknown = MetadataResolver([CriSource([os.path.join(directory, "none.sock")])])
        misses = thread_cpu(lambda: [unknown.lookup(c) for c in consumers], args.rounds)
        print(f"per tick, {len(consumers)} lookups with the source down: {ms(misses):.3f} ms")

        cgroup_tick(pods, resolver, args.rounds)
        daemon_ticks(pods, socket_path, args.rounds)

        live = MetadataResolver([CriSource([socket_path])])  # default: lists >= 1 s apart
        live.start()
        try:
            for consumer in consumers:
                live.lookup(consumer)
            while any(live.lookup(c).consumer == c for c in consumers):
                time.sleep(0.005)
            time.sleep(2.5)  # the lists the first lookups asked for are over
            for label, wait in (("1 s after the last list", 0.0), ("right after a list", 0.0)):
                time.sleep(wait)
                new = pod("late", f"new-{label[:5].strip()}", {"main": ()})
                pods.append(new)  # the runtime lists it from now on
                consumer = Consumer("container", f"containerd/{new.containers[0].id[:12]}")
                started = time.monotonic()
                while live.lookup(consumer).consumer == consumer:
                    time.sleep(0.005)
                print(f"new pod named {label}: {(time.monotonic() - started) * 1e3:.0f} ms "
                      "after the runtime listed it")
        finally:
            live.stop()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
