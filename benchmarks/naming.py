"""Cost of naming cgroups with `attribution.rules`: RE2 (carbond now) against Python's `re`.

Typical: the rules of docs/configuration.md plus two more, over 10,000 distinct realistic paths,
each named once by a fresh CgroupNamer (the cost a tick pays for new cgroups; known paths hit
the cache). Hostile: the two rules of issue 21 item 1 on the names that made `re` stall:
`(a+)+$` against `rp-` + N x `a` + `!` (exponential in N for `re`, so `re` is timed at small N
and its time for N = 40 extrapolated), and `^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\\.scope$` against
paths of 1,000 and 4,000 characters (cubic for `re`).
Run:  .venv/bin/python benchmarks/naming.py
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from carbond.workloads.naming import CgroupNamer, compile_rules

TYPICAL = [
    {"match": r"^system\.slice/jupyter-(?P<user>[^.]+)\.service$", "kind": "user",
     "name": "{user}"},
    {"match": r"^batch\.slice/batch-(?P<team>\w+)-(?P<run>\d+)\.scope$", "kind": "project",
     "name": "{team}-{run}"},
    {"match": r"^ci\.slice/runner-(?P<id>[0-9a-f]{8})\.service$", "kind": "job",
     "name": "ci/{id}"},
]
CATASTROPHIC = {"match": "(a+)+$", "kind": "project", "name": "never"}
CUBIC = {"match": r"^(?P<x>.*)-(?P<y>.*)-(?P<z>.*)\.scope$", "kind": "unit", "name": "{z}"}


def typical_paths(count: int) -> list[str]:
    shapes = ("system.slice/jupyter-user{i}.service", "batch.slice/batch-physics-{i}.scope",
              "ci.slice/runner-{i:08x}.service", "system.slice/app-{i}.service",
              "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{i:032x}.slice")
    return [shapes[i % len(shapes)].format(i=i) for i in range(count)]


def deep_path(chars: int) -> str:
    parts, left = [], chars
    while left > 0:
        size = min(200, left)
        parts.append(("a-" * size)[:size])
        left -= size + 1
    return "/".join(parts)[:chars - 1] + "!"


def seconds(fn, repeat: int = 5) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def with_re(rules: list[dict[str, str]], path: str) -> None:
    """What `Rule.apply` did before: Python's backtracking engine, first search that matches."""
    for rule in rules:
        if re.search(rule["match"], path):
            return


def main() -> None:
    paths = typical_paths(10_000)
    compiled = compile_rules(TYPICAL)
    re2_s = seconds(lambda: [CgroupNamer(compiled)(p) for p in paths])
    patterns = [re.compile(r["match"]) for r in TYPICAL]
    re_s = seconds(lambda: [next((m for m in (x.search(p) for x in patterns) if m), None)
                            for p in paths])
    ours = [rule.pattern for rule in compiled]
    ours_s = seconds(lambda: [next((m for m in (x.search(p) for x in ours) if m), None)
                              for p in paths])
    per_path = 1e6 / len(paths)
    print(f"typical, 3 rules x 10,000 new paths: rule search RE2 {ours_s * per_path:5.2f} us/path,"
          f" re {re_s * per_path:5.2f} us/path; the whole namer (RE2 rules, then built-ins) "
          f"{re2_s * per_path:5.2f} us/path")
    hostile = compile_rules([CATASTROPHIC, CUBIC])
    for n in (20, 22, 24, 40):
        name = "rp-" + "a" * n + "!"
        ours = seconds(lambda name=name: CgroupNamer(hostile)(name))
        if n <= 24:
            theirs = seconds(lambda name=name: with_re([CATASTROPHIC], name), repeat=1)
            print(f"(a+)+$ on rp-{n}a!: RE2 {ours * 1e6:8.1f} us   re {theirs:9.3f} s")
            last = theirs
        else:
            guess = last * 4 ** ((n - 24) / 2)  # measured: x4 per 2 more characters
            print(f"(a+)+$ on rp-{n}a!: RE2 {ours * 1e6:8.1f} us   re ~{guess / 3600:7.0f} h "
                  f"(extrapolated)")
    for chars in (1000, 4000):
        path = deep_path(chars)
        ours = seconds(lambda path=path: CgroupNamer(hostile)(path))
        theirs = seconds(lambda path=path: with_re([CUBIC], path), repeat=1)
        print(f"cubic rule on a {chars}-char path: RE2 {ours * 1e6:8.1f} us   re {theirs:8.3f} s")


if __name__ == "__main__":
    main()
