"""How the daemon uses the resolver, part by part: the pipeline's `Names` renames a tick's
inputs without changing any sum, and gives GPUs to their holders; the publisher's
`carbond_consumer_info` is exactly the exported consumers' (bounded by max_consumers); a bug
in naming costs the names of a tick, never the tick. The resolver is the real
MetadataResolver, its source an in-memory table (the sockets are tested elsewhere)."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.attribution import GpuWeights
from carbond.exporter.collectors.consumers import consumer_info
from carbond.exporter.publisher import Health, Publisher
from carbond.pipeline.names import Names
from carbond.types import IDLE, OTHER, Consumer, TickRecord
from carbond.workloads.identity.metadata import Metadata
from carbond.workloads.identity.resolver import MetadataResolver


class Table:
    """A listing source answering a fixed table (what CriSource.fetch returns, parsed)."""

    name = "cri"
    per_id = False

    def __init__(self, table: dict[tuple[str, str], Metadata]) -> None:
        self.table = table

    def fetch(self, wanted: Collection[tuple[str, str]], timeout_seconds: float) -> Any:
        return dict(self.table)


def container(i: int) -> Consumer:
    return Consumer("container", f"containerd/{i:012x}")


def resolved(table: dict[tuple[str, str], Metadata], asked: list[Consumer]) -> Names:
    """Names over a resolver that has answered for every consumer in `asked`."""
    resolver = MetadataResolver([Table(table)], min_list_seconds=0.0)
    names = Names(resolver)
    for consumer in asked:
        names.name(consumer)  # asks
    resolver.round_now("cri")  # the source thread's list, here
    return names


# each of 12 containers belongs to one of 4 pods' containers (several IDs may share a name)
owners = st.dictionaries(st.integers(0, 11), st.sampled_from(["a", "b", "c", "d"]),
                         min_size=1)
seconds = st.dictionaries(st.integers(0, 11), st.floats(0.0, 10.0), min_size=1)


@given(owners, seconds)
def test_renaming_moves_every_cpu_second_and_copies_none(owned, usage_by_id):
    table = {("cri", f"{i:012x}"): Metadata(namespace="ns", pod="p", container=name,
                                            container_id=f"{i:012x}" * 2, runtime="containerd")
             for i, name in owned.items()}
    usage = {container(i): value for i, value in usage_by_id.items()}
    names = resolved(table, list(usage))
    named = names.usage(usage)
    assert math.fsum(named.values()) == math.fsum(usage.values()) or math.isclose(
        math.fsum(named.values()), math.fsum(usage.values()), rel_tol=1e-12)
    for i, value in usage_by_id.items():
        want = (Consumer("container", f"ns/p/{owned[i]}") if i in owned else container(i))
        assert want in named
        assert named[want] >= value
    labels = names.metadata({c: {"cpu": 1.0} for c in named})
    for consumer in named:
        if consumer.name.startswith("ns/p/"):
            assert labels[consumer]["container"] == consumer.name.rsplit("/", 1)[1]
        else:  # an ID nobody named: what the ID says
            assert labels[consumer] == {"container_id": consumer.name.split("/")[1],
                                        "runtime": "containerd"}


def test_an_id_named_later_is_renamed_from_then_on():
    """Before its source answered, a consumer keeps its ID name (and is asked again each
    tick); once answered, its name settles."""
    source = Table({})
    resolver = MetadataResolver([source], min_list_seconds=0.0, relist_seconds=0.0)
    names = Names(resolver)
    assert names.usage({container(3): 1.0}) == {container(3): 1.0}
    resolver.round_now("cri")  # the runtime did not list it yet
    assert names.usage({container(3): 1.0}) == {container(3): 1.0}
    assert not resolver.settled(container(3))
    source.table[("cri", f"{3:012x}")] = Metadata(namespace="ns", pod="p", container="c")
    resolver.round_now("cri")
    named = Consumer("container", "ns/p/c")
    assert names.usage({container(3): 1.0}) == {named: 1.0}
    assert resolver.settled(container(3))
    source.table.clear()
    for _ in range(3):  # relisted without it: the name stays
        resolver.round_now("cri")
        assert names.usage({container(3): 2.0}) == {named: 2.0}


def test_a_pod_and_its_pause_container_are_one_consumer_with_the_pods_labels():
    uid = "0b1c2d3e-0000-4000-8000-000000000001"
    pod_id, pause_id = Consumer("pod", f"pod/{uid}"), container(7)
    pod = Metadata(namespace="team-a", pod="web", pod_uid=uid)
    table = {("pod", uid): pod,
             ("cri", f"{7:012x}"): pod._replace(container_id="7" * 64, runtime="containerd")}
    names = resolved(table, [pause_id, pod_id])
    named = names.usage({pause_id: 1.0, pod_id: 2.0})
    assert named == {Consumer("pod", "team-a/web"): 3.0}
    assert names.metadata({c: {"cpu": v} for c, v in named.items()}) == {
        Consumer("pod", "team-a/web"): {
        "namespace": "team-a", "pod": "web", "pod_uid": uid}}


def test_gpu_weights_are_renamed_and_a_held_gpu_is_its_holders():
    class Gpu:
        def __init__(self, index: int, uuid: str) -> None:
            self.index, self.device, self.uuid, self.mig_instances = (
                index, f"gpu-{index}", uuid, ())

    table = {("cri", f"{i:012x}"): Metadata(namespace="ns", pod=f"p{i}", container="c",
                                            runtime="containerd") for i in (1, 2)}
    names = resolved(table, [container(1), container(2)])
    weights = {"gpu-0": GpuWeights(), "gpu-1": GpuWeights(sm={container(1): 60.0,
                                                              container(2): 20.0})}
    gpus = [Gpu(0, "GPU-0"), Gpu(1, "GPU-1")]
    assert names.gpus(weights, gpus)["gpu-0"] == GpuWeights()  # no holder listed yet
    held = Consumer("container", "ns/p9/c")
    result = Names(_Holders(names, {"GPU-0": (held,)})).gpus(weights, gpus)
    assert result["gpu-0"] == GpuWeights(sm={held: 1.0}, memory={held: 1.0})
    assert result["gpu-1"].sm == {Consumer("container", "ns/p1/c"): 60.0,
                                  Consumer("container", "ns/p2/c"): 20.0}
    assert Names(_Holders(names, {"GPU-0": (held,)})).gpus(weights, []) == {
        "gpu-0": GpuWeights(), "gpu-1": result["gpu-1"]}  # no GPU known: kubelet not asked


class _Holders:
    """A resolver whose kubelet has answered `holders` (lookups from `names`' resolver)."""

    def __init__(self, names: Names, holders: dict[str, tuple[Consumer, ...]]) -> None:
        self._names, self._holders = names, holders

    def lookup(self, consumer: Consumer) -> Any:
        return self._names.resolver.lookup(consumer)

    def settled(self, consumer: Consumer) -> bool:
        return self._names.resolver.settled(consumer)

    def gpu_holders(self) -> dict[str, tuple[Consumer, ...]]:
        return self._holders

    def errors(self) -> dict[str, int]:
        return {}


class Broken:
    """A resolver with a bug: every lookup raises."""

    def lookup(self, consumer: Consumer) -> Any:
        raise RuntimeError("bug")

    def settled(self, consumer: Consumer) -> bool:
        return False

    def gpu_holders(self) -> dict[str, tuple[Consumer, ...]]:
        return {}

    def errors(self) -> dict[str, int]:
        return {}


def test_a_bug_in_naming_costs_the_names_of_a_tick_not_the_tick(tmp_path):
    from carbond.attribution import Policy
    from carbond.pipeline.idle import IdleBaseline
    from carbond.pipeline.tick import Pipeline
    from carbond.workloads.cpu import CpuUsage

    class Cpu:
        def tick(self) -> CpuUsage:
            return CpuUsage({container(1): 1.0})

        def close(self) -> None:
            pass

    names = Names(Broken())
    pipeline = Pipeline([], Cpu(), None, None, Policy(model="off"), IdleBaseline(),
                        names=names)
    pipeline.prime()
    measurement = pipeline.tick()
    assert measurement.usage == {container(1): 1.0}  # the ID name stands
    assert names.failures == 1


def record(energy: dict[Consumer, float], metadata: dict[Consumer, dict[str, str]]
           ) -> TickRecord:
    return TickRecord(0.0, 1.0, {c: {"cpu": j} for c, j in energy.items()}, {}, {},
                      metadata=metadata)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.integers(0, 30), st.floats(0.0, 100.0)), min_size=1,
                max_size=8), st.integers(0, 10))
def test_consumer_info_is_exactly_the_exported_consumers(ticks, max_consumers):
    clock = [0.0]
    publisher = Publisher(max_consumers, clock=lambda: clock[0])
    for tick in ticks:
        clock[0] += 1.0
        energy = {container(i): joules for i, joules in tick.items()}
        metadata = {c: {"namespace": "ns", "container": c.name[-3:]} for c in energy}
        snap = publisher.publish(record(energy, metadata), Health())
        exported = {sample.consumer for sample in snap.consumers} - {IDLE, OTHER}
        described = dict(snap.consumer_info)
        # the energy series' own set (bounded by max_consumers as they are), and every
        # exported consumer that was ever described still is
        assert set(described) == exported & {container(i) for t in ticks for i in t}
    busy = Publisher(3)
    for _ in range(3):
        snap = busy.publish(record({container(i): 1.0 + i for i in range(50)},
                                   {container(i): {"pod": str(i)} for i in range(50)}),
                            Health())
    assert {c for c, _labels in snap.consumer_info} == {container(i) for i in (47, 48, 49)}


def test_info_rows_carry_only_their_labels_escaped():
    family = consumer_info([
        (Consumer("container", "ns/p/c"), {"namespace": "ns", "pod": 'say "hi"\n'}),
        (Consumer("job", "slurm/1"), {"account": "physics", "not_a_label": "x"}),
    ])
    rows = [(s.labels, s.value) for s in family.samples]
    assert rows == [
        ({"kind": "container", "consumer": "ns/p/c", "namespace": "ns", "pod": 'say "hi"\n'},
         1.0),
        ({"kind": "job", "consumer": "slurm/1", "account": "physics"}, 1.0)]


def test_metadata_errors_continue_across_a_restart():
    """carbond_metadata_errors_total never goes back: the count exported at the stop is
    carried in the ledger's state and added to the next run's."""
    first = Publisher(10)
    first.publish(record({}, {}), Health(metadata_errors_total={"cri": 2, "slurm": 0}))
    state = first.state()
    assert state["carried"]["metadata_errors"] == {"cri": 2, "slurm": 0}
    second = Publisher(10)
    second.restore({}, {}, {}, {}, {}, 0.0, state)
    snap = second.publish(record({}, {}), Health(metadata_errors_total={"cri": 1, "slurm": 0}))
    assert snap.metadata_errors_total == {"cri": 3.0, "slurm": 0.0}


def test_other_continues_across_a_restart_with_what_was_folded_into_it():
    """With more consumers than max_consumers, `other` holds the folded ones: at a restart it
    continues from its exported value (the ledger's state), not from the ledger's own
    `other` consumer, which holds only attribution's; a malformed state starts from that."""
    first = Publisher(1, clock=lambda: 1.0)
    for _ in range(3):
        snap = first.publish(record({container(i): 10.0 + i for i in range(5)}, {}), Health())
    def other_joules(snap):
        return sum(s.joules_total for s in snap.consumers if s.consumer == OTHER)
    before = other_joules(snap)
    assert before > 0  # four of five consumers were folded into it
    state = first.state()
    ledger_other = {OTHER: {"cpu": 1.0}}  # what the ledger holds under the name `other`
    second = Publisher(1, clock=lambda: 2.0)
    second.restore(ledger_other, {}, {}, {}, {}, 0.0, state)
    after = other_joules(second.publish(record({}, {}), Health()))
    assert after >= before
    third = Publisher(1, clock=lambda: 2.0)
    third.restore(ledger_other, {}, {}, {}, {}, 0.0,
                  dict(state, other={"joules": {"cpu": "nan"}}))
    assert other_joules(third.publish(record({}, {}), Health())) == 1.0
