"""Issue 21 item 9: named consumer series stay within `max_consumers` at every scrape whatever
the churn. A newcomer that displaced the weakest member left the member's frozen series on
top of the limit (53 named with max_consumers 50). Real cgroups and processes, the real
`carbond run`; the pure part under Hypothesis."""

from __future__ import annotations

import math
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.exporter.series import ConsumerSeries
from carbond.types import IDLE, OTHER, Consumer
from tests.cgroup_helpers import TestTree
from tests.helpers import carbond_run, select, total
from tests.powercap import ConstantPower

CONSUMER = "carbond_consumer_energy_joules_total"
LIMIT = 50
WEAK = "i=0; while :; do i=0; while [ $i -lt 100 ]; do i=$((i+1)); done; sleep 1; done"
STRONG = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"


def named(samples) -> set[str]:
    return {dict(key)["consumer"] for key in select(samples, CONSUMER)} - {"idle", "other"}


@pytest.mark.parametrize("tree", ["v2"], indirect=True)
def test_300_short_lived_cgroups_never_name_more_than_max_consumers(tree: TestTree,
                                                                    tmp_path) -> None:
    """50 long-lived cgroups that use a little CPU fill the named set; then 250 short-lived
    ones, 25 at a time, each using more than any of them, so every batch displaces members.
    Every scrape, one per tick, names at most 50."""
    config = tmp_path / "carbond.yaml"
    config.write_text(f"attribution: {{max_consumers: {LIMIT}, processes: off, "
                      "idle_watts: {cpu: 0}}\n")
    weak: list[subprocess.Popen[bytes]] = []
    scrapes = []
    try:
        with ConstantPower(str(tmp_path / "powercap")), carbond_run(
            "--config", str(config), "--powercap-root", str(tmp_path / "powercap"),
            "--cgroup-root", tree.root, "--interval", "500ms",
        ) as daemon:
            for index in range(LIMIT):
                tree.make(f"steady-{index}")
                procs = tree.procs(f"steady-{index}")
                weak.append(subprocess.Popen(
                    ["/bin/sh", "-c", f"echo $$ > {procs}; {WEAK}"]))
            for _ in range(40):
                scrapes.append(daemon.wait_ticks(1))
                if len(named(scrapes[-1])) == LIMIT:
                    break
            assert len(named(scrapes[-1])) == LIMIT
            for batch in range(10):
                rels = [f"churn-{batch * 25 + i}" for i in range(25)]
                for rel in rels:
                    tree.make(rel)
                burners = [subprocess.Popen(
                    ["/bin/sh", "-c", f"echo $$ > {tree.procs(rel)}; {STRONG}"]) for rel in rels]
                for burner in burners:
                    burner.wait(timeout=60)
                scrapes.append(daemon.wait_ticks(1))
                scrapes.append(daemon.wait_ticks(1))
                for rel in rels:
                    tree.remove(rel)
            scrapes.append(daemon.wait_ticks(2))
    finally:
        for process in weak:
            process.kill()
            process.wait(timeout=10)
    for samples in scrapes:
        assert len(named(samples)) <= LIMIT, sorted(named(samples))
    churned = set().union(*(named(s) for s in scrapes))
    assert any("churn-" in name for name in churned)  # newcomers did displace members
    assert any("steady-" in name for name in churned)
    last = scrapes[-1]
    assert total(last, "carbond_tick_failures_total") == 0
    assert total(last, CONSUMER, consumer="other") > 0


def unit(i: int) -> Consumer:
    return Consumer("unit", f"u{i}.service")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


TICKS = st.lists(
    st.tuples(
        st.floats(0.1, 400.0),  # seconds since the last tick
        st.dictionaries(st.integers(0, 40), st.floats(0.0, 100.0), max_size=20),
        st.one_of(st.none(), st.integers(0, 12)),  # a reload's max_consumers
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 12), TICKS,
       st.dictionaries(st.integers(0, 40), st.floats(0.0, 1000.0), max_size=30),
       st.floats(0.0, 1200.0))
def test_named_series_within_the_limit_counters_continue_and_nothing_is_lost(
        limit, ticks, restored, idle_seconds) -> None:
    """Whatever the ticks, restores and reloads: named series <= max_consumers after every
    tick (idle and other on top); a counter never goes backwards, also when a consumer comes
    back after its series went; and every joule fed is in some consumer's last exported
    total (nothing remembered is forgotten with a large enough memory)."""
    clock = Clock()
    fold = ConsumerSeries(max_consumers=limit, clock=clock, retention_seconds=600,
                          smoothing_seconds=30, remember=10_000)
    fold.restore({unit(i): {"cpu": j} for i, j in restored.items()},
                 idle_seconds={unit(i): idle_seconds for i in restored})
    seen: dict[tuple[Consumer, str], float] = {
        (unit(i), "cpu"): j for i, j in restored.items()}
    fed = math.fsum(restored.values())
    for seconds, energy, reload in ticks:
        clock.now += seconds
        if reload is not None:
            fold.max_consumers = reload
        tick = {unit(i): {"cpu": j} for i, j in energy.items()}
        tick[IDLE] = {"cpu": 1.0}
        fed += math.fsum(energy.values()) + 1.0
        fold.update(tick, seconds)
        samples = fold.samples()
        assert len({s.consumer for s in samples} - {IDLE, OTHER}) <= fold.max_consumers
        assert fold.active <= {s.consumer for s in samples}
        for sample in samples:
            key = (sample.consumer, sample.component)
            assert sample.joules_total >= seen.get(key, 0.0) - 1e-9 * max(1.0, fed)
            seen[key] = sample.joules_total
    assert math.isclose(math.fsum(seen.values()), fed, rel_tol=1e-9, abs_tol=1e-9)


def test_a_swap_hands_the_weakest_members_slot_to_the_newcomer() -> None:
    """The displaced member's series goes at once instead of staying frozen on top of the
    limit; its energy goes to `other` meanwhile, and its counter continues when it is named
    again."""
    clock = Clock()
    fold = ConsumerSeries(max_consumers=2, clock=clock, smoothing_seconds=5)
    for _ in range(3):
        clock.now += 1
        fold.update({unit(1): {"cpu": 5.0}, unit(2): {"cpu": 1.0}}, 1.0)
    before = {s.consumer: s.joules_total for s in fold.samples()}[unit(2)]
    clock.now += 1
    fold.update({unit(1): {"cpu": 5.0}, unit(2): {"cpu": 1.0}, unit(3): {"cpu": 50.0}}, 1.0)
    exported = {s.consumer: s.joules_total for s in fold.samples()}
    assert set(exported) == {unit(1), unit(3), OTHER} and exported[OTHER] == 1.0
    for _ in range(3):  # unit(1) finishes and its frozen series holds its slot; unit(3)
        clock.now += 1  # finishes too; unit(2) is named again, by the free slot
        fold.update({unit(2): {"cpu": 1.0}}, 1.0)
    clock.now += 601
    fold.update({unit(2): {"cpu": 1.0}}, 1.0)
    clock.now += 1
    fold.update({unit(2): {"cpu": 1.0}}, 1.0)
    exported = {s.consumer: s.joules_total for s in fold.samples()}
    assert set(exported) == {unit(2), OTHER} and exported[unit(2)] == before + 1.0
