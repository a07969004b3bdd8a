"""Budgets by owner (issue 20): `match` on namespace, account and user, with globs, against the
metadata a lookup passes in; metadata that arrives after a consumer first appeared counts from
then on; the configuration accepts and validates the new keys."""

from __future__ import annotations

import pytest

from carbond import config
from carbond.config import Budget
from carbond.ledger.budgets import BudgetTracker, matches
from carbond.ledger.ledger import Ledger
from carbond.types import ConfigError, Consumer
from tests.test_budgets import HOUR, Clock, at, book

JOB = Consumer("job", "slurm/4242")
POD = Consumer("pod", "ml-train/trainer-0")
CONTAINER = Consumer("container", "ml-train/trainer-0/pytorch")
JOB_LABELS = {"user": "alice", "account": "physics", "partition": "gpu"}
POD_LABELS = {"namespace": "ml-train", "pod": "trainer-0"}


@pytest.mark.parametrize(("match", "consumer", "labels", "expected"), [
    ({"namespace": "ml-*"}, POD, POD_LABELS, True),
    ({"namespace": "ml-*"}, CONTAINER, POD_LABELS | {"container": "pytorch"}, True),
    ({"namespace": "team-a"}, POD, POD_LABELS, False),
    ({"namespace": "ml-*"}, POD, {}, False),  # not known (yet): no match
    ({"account": "physics"}, JOB, JOB_LABELS, True),
    ({"account": "phys*", "kind": "job"}, JOB, JOB_LABELS, True),
    ({"account": "physics", "kind": "pod"}, JOB, JOB_LABELS, False),
    ({"account": "chem*"}, JOB, JOB_LABELS, False),
    ({"user": "ali[cz]e"}, JOB, JOB_LABELS, True),
    ({"user": "alice"}, Consumer("user", "alice"), {}, True),  # a user slice is its user
    ({"user": "alice"}, Consumer("unit", "alice.service"), {}, False),
    ({"user": "Alice"}, JOB, JOB_LABELS, False),  # case matters, as for `consumer`
    ({"kind": "user", "consumer": "alice*"}, Consumer("user", "alice-dev"), {}, True),
    ({"namespace": "*"}, Consumer("idle", "idle"), {}, False),
])
def test_owner_matching(match, consumer, labels, expected):
    assert matches(match, consumer, labels) is expected


def test_tracker_counts_by_owner_through_the_lookup(tmp_path):
    """Seeded from the ledger and fed per tick, through the metadata lookup passed in; a
    job whose account is known only from its second tick counts from that tick on."""
    start = at("2024-05-02T00:00:00")
    clock = Clock(start + 2 * HOUR)
    known: dict[tuple[str, str], dict[str, str]] = {POD: POD_LABELS}
    budgets = [Budget("ml", {"namespace": "ml-*"}, "day", 100.0),
               Budget("physics", {"account": "physics"}, "day", 100.0)]
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        book(ledger, start + 1800, {POD: 3.0, JOB: 5.0})
        tracker = BudgetTracker(budgets, "UTC", ledger, clock=clock,
                                metadata=lambda c: known.get(c, {}))
    ml, physics = tracker.status()
    assert (ml.used_grams, physics.used_grams) == (pytest.approx(3.0), 0.0)
    tracker.add(clock.now, 5.0, {POD: 1.0, JOB: 2.0})
    known[JOB] = JOB_LABELS  # Slurm answered
    tracker.add(clock.now + 5, 5.0, {POD: 1.0, JOB: 2.0})
    ml, physics = tracker.status(clock.now + 5)
    assert ml.used_grams == pytest.approx(5.0)
    assert physics.used_grams == pytest.approx(2.0)


def test_the_configuration_takes_owner_keys(tmp_path):
    path = tmp_path / "carbond.yaml"
    path.write_text("budgets:\n"
                    "  - {name: ml-platform, match: {namespace: 'ml-*'}, period: month, "
                    "limit: 2t}\n"
                    "  - {name: physics, match: {account: physics, user: 'a*'}, limit: 1t}\n")
    loaded = config.load(str(path), {})
    assert [b.match for b in loaded.budgets] == [{"namespace": "ml-*"},
                                                 {"account": "physics", "user": "a*"}]
    path.write_text("budgets: [{name: x, match: {acount: physics}, limit: 1kg}]\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {})
    assert info.value.key == "budgets[0].match.acount"
    assert "did you mean 'account'" in str(info.value)
    path.write_text("budgets: [{name: x, match: {namespace: 7}, limit: 1kg}]\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {})
    assert info.value.key == "budgets[0].match.namespace"


def test_the_configuration_takes_the_metadata_section(tmp_path):
    path = tmp_path / "carbond.yaml"
    path.write_text("metadata: {timeout: 1s, cri: {socket: off}, slurm: {scontrol: off}}\n")
    loaded = config.load(str(path), {})
    assert loaded.metadata.timeout_seconds == 1.0 and loaded.metadata.cri_socket == "off"
    assert config.load(None, {}).metadata.enabled is True
    path.write_text("metadata: {podman: {sockett: /run/podman/podman.sock}}\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {})
    assert info.value.key == "metadata.podman.sockett"


def test_after_a_restart_owners_of_ended_jobs_come_from_the_ledger(tmp_path):
    """The daemon's owner lookup (commands/build.owners): a job that ended before the restart
    is known to no resolver any more; its account, kept in the ledger, still counts it."""
    import dataclasses

    from carbond.commands.build import owners
    from carbond.types import TickRecord

    start = at("2024-05-02T00:00:00")
    clock = Clock(start + 2 * HOUR)
    budget = Budget("physics", {"account": "physics"}, "day", 100.0)
    cfg = dataclasses.replace(config.load(None, {}), budgets=(budget,))
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        ledger.record(TickRecord(start + 1800, 60.0, {JOB: {"cpu": 1.0}, POD: {"cpu": 1.0}},
                                 {JOB: 7.0, POD: 3.0}, {}, metadata={JOB: JOB_LABELS}))
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        nothing_live = owners(cfg, ledger, lambda consumer: {})
        (physics,) = BudgetTracker([budget], "UTC", ledger, clock=clock,
                                   metadata=nothing_live).status()
        assert physics.used_grams == pytest.approx(7.0)
        without = BudgetTracker([budget], "UTC", ledger, clock=clock,
                                metadata=lambda consumer: {}).status()
    assert without[0].used_grams == 0.0  # what the lookup adds: the ledger's owners
    plain = dataclasses.replace(cfg, budgets=(Budget("all", {}, "day", 1.0),))
    live = lambda consumer: {}  # noqa: E731
    with Ledger.open(str(tmp_path), clock=clock) as ledger:
        assert owners(plain, ledger, live) is live  # no owner budget: the ledger is not read
