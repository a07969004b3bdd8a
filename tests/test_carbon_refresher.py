"""The intensity feed: fallback after max_age, recovery, backoff, Retry-After, the disk cache,
and a background thread that never makes the tick wait."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from carbond.carbon.http import HttpClient
from carbond.carbon.providers import build_providers
from carbond.carbon.refresher import CACHE_FILE, IntensityFeed, backoff_seconds
from tests.fakes.intensity_server import EM_TOKEN, FakeIntensityServer

START = 1_717_000_000.0
DE_TABLE = 380.9  # carbond/carbon/data/grid-intensity-by-country.csv


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def server() -> Iterator[FakeIntensityServer]:
    fake = FakeIntensityServer(now=START, hang_seconds=3.0).start()
    yield fake
    fake.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_providers(server: FakeIntensityServer, tmp_path: Path, extra=(), timeout: float = 0.3):
    token = tmp_path / "em.token"
    token.write_text(EM_TOKEN)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    specs = [("electricitymaps", {"token_file": str(token), "url": server.url}), *extra]
    return build_providers(specs, "DE", http=HttpClient(timeout, opener))


def make_feed(server, tmp_path, clock, **kwargs) -> IntensityFeed:
    providers = kwargs.pop("providers", None) or make_providers(server, tmp_path)
    kwargs.setdefault("state_dir", tmp_path / "state")
    kwargs.setdefault("rng", random.Random(1))
    return IntensityFeed(providers, "DE", refresh_seconds=900, max_age_seconds=7200, clock=clock,
                         **kwargs)  # fmt: skip


def test_uses_the_first_provider_with_a_fresh_value(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock)
    before = feed.current()
    assert before is not None and before.provider == "static"  # nothing fetched yet
    assert before.grams_per_kwh == DE_TABLE
    assert feed.refresh_now() == {"electricitymaps": "ok"}
    value = feed.current()
    assert value is not None
    assert (value.provider, value.zone, value.grams_per_kwh) == ("electricitymaps", "DE", 123.0)
    assert value.age_seconds(clock.now) == START - (START - START % 3600)
    assert feed.fetch_errors() == {"electricitymaps": 0, "static": 0}


def test_outage_falls_back_after_max_age_and_recovers(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock)
    feed.refresh_now()
    server.modes["em_latest"] = "500"
    observed_at = feed.current().observed_at
    # Failing, but the last good value is still younger than max_age: keep using it.
    clock.now = observed_at + 7000
    server.now = clock.now
    assert feed.refresh_now() == {"electricitymaps": "http_500"}
    assert feed.current().provider == "electricitymaps"
    assert feed.current().grams_per_kwh == 123.0
    # Past max_age: the next provider in order, static with DE's table figure.
    clock.now = observed_at + 7201
    assert feed.refresh_now() == {"electricitymaps": "http_500"}
    value = feed.current()
    assert (value.provider, value.zone, value.grams_per_kwh) == ("static", "DE", DE_TABLE)
    assert feed.fetch_errors()["electricitymaps"] == 2
    # Recovery.
    server.modes["em_latest"] = "ok"
    server.now = clock.now
    server.em_grams_per_kwh = 150.0
    assert feed.refresh_now() == {"electricitymaps": "ok"}
    assert feed.current().provider == "electricitymaps"
    assert feed.current().grams_per_kwh == 150.0
    assert feed.fetch_errors()["electricitymaps"] == 2  # counters never go back


@pytest.mark.parametrize(
    "mode",
    ["garbage", "html", "truncated", "wrong_zone", "negative", "nan", "huge", "missing",
     "string_value", "timeout", "429"],
)  # fmt: skip
def test_a_bad_answer_never_replaces_the_value_in_use(server, tmp_path, clock, mode):
    feed = make_feed(server, tmp_path, clock)
    feed.refresh_now()
    server.modes["em_latest"] = mode
    server.em_grams_per_kwh = 999.0
    clock.advance(60)
    outcome = feed.refresh_now()
    assert outcome["electricitymaps"] != "ok"
    assert feed.current().grams_per_kwh == 123.0
    assert feed.fetch_errors()["electricitymaps"] == 1


def test_provider_order_and_second_network_provider(server, tmp_path, clock):
    providers = make_providers(server, tmp_path, extra=[("ukgrid", {"url": server.url})])
    feed = make_feed(server, tmp_path, clock, providers=providers)
    server.modes["em_latest"] = "500"
    feed.refresh_now()
    assert feed.current().provider == "ukgrid"
    assert [p.name for p in feed.providers] == ["electricitymaps", "ukgrid", "static"]


@given(
    failures=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.1, max_value=100),
    cap=st.floats(min_value=0.1, max_value=10_000),
    jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_is_exponential_capped_and_jittered(failures, base, cap, jitter):
    delay = backoff_seconds(failures, base, cap, jitter)
    full = min(cap, base * 2.0 ** min(failures - 1, 30))
    assert full / 2 - 1e-9 <= delay <= full + 1e-9
    assert backoff_seconds(failures + 1, base, cap, jitter) >= delay - 1e-9


def test_backoff_schedules_retries(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock, backoff_base_seconds=10)
    server.modes["em_latest"] = "500"
    assert feed.refresh_now(force=False) == {"electricitymaps": "http_500"}
    # Within the first backoff (5..10 s) nothing is tried.
    clock.advance(4.9)
    assert feed.refresh_now(force=False) == {}
    clock.advance(5.2)
    assert feed.refresh_now(force=False) == {"electricitymaps": "http_500"}
    # Second failure: 10..20 s.
    clock.advance(9.9)
    assert feed.refresh_now(force=False) == {}
    clock.advance(10.2)
    assert feed.refresh_now(force=False) == {"electricitymaps": "http_500"}
    assert feed.fetch_errors()["electricitymaps"] == 3


def test_success_schedules_the_refresh_period(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock)
    assert feed.refresh_now(force=False) == {"electricitymaps": "ok"}
    clock.advance(899)
    assert feed.refresh_now(force=False) == {}
    clock.advance(2)
    assert feed.refresh_now(force=False) == {"electricitymaps": "ok"}


def test_retry_after_is_honoured(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock, backoff_base_seconds=1)
    server.modes["em_latest"] = "429"
    server.retry_after = "300"
    assert feed.refresh_now(force=False) == {"electricitymaps": "rate_limited"}
    clock.advance(299)
    assert feed.refresh_now(force=False) == {}
    hits = server.routes_hit().count("em_latest")
    clock.advance(2)
    server.modes["em_latest"] = "ok"
    assert feed.refresh_now(force=False) == {"electricitymaps": "ok"}
    assert server.routes_hit().count("em_latest") == hits + 1


# ------------------------------------------------------------------ cache


def test_cache_is_reused_at_start_while_fresh(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock)
    feed.refresh_now()
    cache = json.loads((tmp_path / "state" / CACHE_FILE).read_text())
    assert cache["providers"]["electricitymaps"]["grams_per_kwh"] == 123.0
    # Restart while the API is down.
    server.modes["em_latest"] = "500"
    clock.advance(600)
    restarted = make_feed(server, tmp_path, clock)
    assert restarted.current().provider == "electricitymaps"
    assert restarted.current().grams_per_kwh == 123.0
    # The next fetch waits for one refresh period after the cached fetch: no restart storm.
    assert restarted.refresh_now(force=False) == {}
    # Once too old, the cache is not used.
    clock.advance(7200)
    again = make_feed(server, tmp_path, clock)
    assert again.current().provider == "static"


def test_cache_for_another_zone_is_ignored(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock)
    feed.refresh_now()
    other = IntensityFeed(
        build_providers([], "FR"), "FR", state_dir=tmp_path / "state", clock=clock
    )
    assert other.current().provider == "static" and other.current().zone == "FR"
    assert feed.current().provider == "electricitymaps"


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"version": 1, "zone": "DE", "providers": {"electricitymaps": '
     '{"grams_per_kwh": 99999, "zone": "DE", "provider": "electricitymaps", '
     '"observed_at": 1717000000, "fetched_at": 1717000000}}}', ""],
)  # fmt: skip
def test_corrupt_cache_is_ignored(server, tmp_path, clock, content, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE_FILE).write_text(content)
    feed = make_feed(server, tmp_path, clock)
    assert feed.current().provider == "static"
    assert feed.refresh_now() == {"electricitymaps": "ok"}  # and it overwrites it
    assert json.loads((state / CACHE_FILE).read_text())["version"] == 1


def test_unwritable_state_dir_degrades(server, tmp_path, clock, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    feed = make_feed(server, tmp_path, clock, state_dir=blocker / "state")  # not a directory
    caplog.set_level(logging.WARNING)
    assert feed.refresh_now() == {"electricitymaps": "ok"}
    assert feed.refresh_now() == {"electricitymaps": "ok"}
    assert feed.current().grams_per_kwh == 123.0
    warnings = [r for r in caplog.records if "cannot write intensity cache" in r.getMessage()]
    assert len(warnings) == 1  # said once, not every refresh


# ------------------------------------------------------------------ the thread


def test_thread_refreshes_and_ticks_never_wait(server, tmp_path):
    server.modes["em_latest"] = "timeout"  # hangs 3 s; client timeout 0.7 s
    providers = make_providers(server, tmp_path, timeout=0.7)
    feed = IntensityFeed(providers, "DE", refresh_seconds=0.2, max_age_seconds=7200,
                         state_dir=tmp_path / "state", backoff_base_seconds=0.05)  # fmt: skip
    feed.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # a fetch is hanging all this time
            started = time.monotonic()
            value = feed.current()
            assert time.monotonic() - started < 0.05
            assert value is not None and value.provider == "static"
            time.sleep(0.02)
        server.modes["em_latest"] = "ok"
        server.now = time.time()
        deadline = time.monotonic() + 10
        while feed.current().provider != "electricitymaps" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert feed.current().provider == "electricitymaps"
        assert feed.fetch_errors()["electricitymaps"] >= 1
    finally:
        started = time.monotonic()
        feed.stop()
        assert time.monotonic() - started < 2.2


def test_stop_returns_within_two_seconds_during_a_hanging_fetch(server, tmp_path):
    server.modes["em_latest"] = "timeout"
    server.hang_seconds = 8.0
    providers = make_providers(server, tmp_path, timeout=6.0)
    feed = IntensityFeed(providers, "DE", state_dir=tmp_path / "state")
    feed.start()
    deadline = time.monotonic() + 2
    while "em_latest" not in server.routes_hit() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "em_latest" in server.routes_hit()
    started = time.monotonic()
    feed.stop()
    assert time.monotonic() - started < 2.2
    server.stop()  # release the handler; the daemon thread then ends on its own


def test_stop_is_prompt_when_idle(server, tmp_path):
    server.now = time.time()
    feed = IntensityFeed(make_providers(server, tmp_path), "DE", refresh_seconds=3600)
    feed.start()
    deadline = time.monotonic() + 5
    while feed.current().provider != "electricitymaps" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert feed.current().provider == "electricitymaps"
    started = time.monotonic()
    feed.stop()
    assert time.monotonic() - started < 0.5
    assert not any(t.name == "carbond-intensity" and t.is_alive() for t in threading.enumerate())


def test_clock_stepped_back_does_not_stall_refreshes(server, tmp_path, clock):
    # The host clock ran a day ahead; NTP steps it back to the time the API also keeps.
    clock.advance(86400)
    feed = make_feed(server, tmp_path, clock)
    server.now = clock.now  # the API's answers follow the wrong clock: dated "now"
    assert feed.refresh_now(force=False) == {"electricitymaps": "ok"}
    clock.advance(-86400)
    server.now = clock.now
    # The figure now looks a day ahead: not fresh (it would stay so for a day), refetched.
    assert feed.current().provider == "static"
    assert feed.refresh_now(force=False) == {"electricitymaps": "ok"}
    assert feed.current().provider == "electricitymaps"
    assert feed.refresh_now(force=False) == {}  # and then back on the normal schedule


# ------------------------------------------------------------------ dates


Y2099 = 4_070_908_800.0  # 2099-01-01T00:00Z
Y2001 = 978_307_200.0  # 2001-01-01T00:00Z


def test_a_value_dated_in_the_future_is_a_fetch_error(server, tmp_path, clock):
    feed = make_feed(server, tmp_path, clock)
    assert feed.refresh_now() == {"electricitymaps": "ok"}
    server.em_observed_at = Y2099
    server.em_grams_per_kwh = 999.0
    clock.advance(60)
    assert feed.refresh_now() == {"electricitymaps": "future_date"}
    assert feed.current().grams_per_kwh == 123.0  # the good value stays in use
    assert feed.fetch_errors()["electricitymaps"] == 1
    assert "999" not in (tmp_path / "state" / CACHE_FILE).read_text()  # never cached
    # The provider then fails: the good value goes stale as usual, the 2099 one never existed.
    server.modes["em_latest"] = "500"
    clock.advance(7200)
    assert feed.refresh_now() == {"electricitymaps": "http_500"}
    assert feed.current().provider == "static"
    restarted = make_feed(server, tmp_path, clock)
    assert restarted.current().provider == "static"


def test_a_value_dated_2001_is_a_stale_date_error(server, tmp_path, clock, caplog):
    caplog.set_level(logging.WARNING)
    server.em_observed_at = Y2001
    feed = make_feed(server, tmp_path, clock)
    assert feed.refresh_now() == {"electricitymaps": "stale_date"}
    assert feed.fetch_errors()["electricitymaps"] == 1
    assert not (tmp_path / "state" / CACHE_FILE).exists()  # the rejected value is not kept
    assert feed.current().provider == "static"
    assert "2001-01-01T00:00:00Z" in caplog.text  # said, not ignored silently


@pytest.mark.parametrize(
    ("offset_seconds", "outcome"),
    [(-7199, "ok"), (-7201, "stale_date"), (0, "ok"), (1800, "ok"), (3599, "ok"),
     (3601, "future_date")],
)  # fmt: skip
def test_date_limits(server, tmp_path, clock, offset_seconds, outcome):
    # A current period's start may be a little ahead of a slow host clock: up to an hour.
    server.em_observed_at = START + offset_seconds
    feed = make_feed(server, tmp_path, clock)
    assert feed.refresh_now() == {"electricitymaps": outcome}
    assert (feed.current().provider == "electricitymaps") == (outcome == "ok")


@pytest.mark.parametrize(
    ("observed_at", "fetched_at", "reason"),
    [(Y2099, START, "ahead of now"), (START - 600, Y2099, "ahead of now"),
     (Y2001, Y2001, "older than max_age")],
)  # fmt: skip
def test_cached_values_get_the_same_date_checks(
    server, tmp_path, clock, caplog, observed_at, fetched_at, reason
):
    caplog.set_level(logging.INFO)
    state = tmp_path / "state"
    state.mkdir()
    entry = {"grams_per_kwh": 55.0, "zone": "DE", "provider": "electricitymaps",
             "observed_at": observed_at, "fetched_at": fetched_at}  # fmt: skip
    cache = {"version": 1, "zone": "DE", "providers": {"electricitymaps": entry}}
    (state / CACHE_FILE).write_text(json.dumps(cache))
    feed = make_feed(server, tmp_path, clock)
    assert feed.current().provider == "static"
    assert reason in caplog.text
    # and nothing in the cache puts the next fetch off
    assert feed.refresh_now(force=False) == {"electricitymaps": "ok"}
    assert feed.current().grams_per_kwh == 123.0


# ------------------------------------------------------------------ a server that drips


def test_a_dripping_provider_times_out_and_the_next_refresh_happens(server, tmp_path, caplog):
    deadline_seconds = 1.0
    server.modes["em_latest"] = "drip_body"
    server.drip_seconds = deadline_seconds / 4  # each read gets a byte long before its timeout
    providers = make_providers(server, tmp_path, timeout=deadline_seconds)
    feed = IntensityFeed(providers, "DE", refresh_seconds=0.2, max_age_seconds=7200,
                         state_dir=tmp_path / "state", backoff_base_seconds=0.05)  # fmt: skip
    feed.start()
    try:
        wait_until = time.monotonic() + deadline_seconds * 10
        # The failure is logged just after it is counted: wait for the line itself.
        timed_out = "intensity provider electricitymaps: timeout"
        while timed_out not in caplog.text and time.monotonic() < wait_until:
            time.sleep(0.02)
        assert timed_out in caplog.text
        server.modes["em_latest"] = "ok"
        server.now = time.time()
        wait_until = time.monotonic() + deadline_seconds * 10
        while feed.current().provider != "electricitymaps" and time.monotonic() < wait_until:
            time.sleep(0.02)
        assert feed.current().provider == "electricitymaps"
    finally:
        feed.stop()
        server.stop()  # lets a held fetch go, on code without the deadline
