"""The Redfish meter against a stand-in BMC on 127.0.0.1 over TLS with a certificate made here:
energy counter, power only, power supplies; sessions and basic auth; a stale reading, a BMC
that hangs, 401s, NaN / negative / 10 MW answers, redirects elsewhere; the token never logged
and never sent to another origin."""

from __future__ import annotations

import logging
import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.carbon.intensity import FetchError
from carbond.carbon.providers.base import Secret
from carbond.meters.redfish import COUNTER, POWER_CONTROL, SUPPLIES, RedfishMeter
from carbond.meters.redfish_client import RedfishClient, resource_path
from tests.fakes.redfish_server import (
    PASSWORD,
    USERNAME,
    FakeBmc,
    Load,
    make_certificate,
    server_context,
)
from tests.helpers import wait_for

TIMEOUT_SECONDS = 1.0


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI")
    return make_certificate(tmp_path_factory.mktemp("bmc-tls"))


@pytest.fixture
def tls(certificate) -> ssl.SSLContext:
    return server_context(certificate)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bmcs(tls) -> Iterator[list[FakeBmc]]:
    """Every stand-in BMC a test starts, stopped after it even when it fails."""
    started: list[FakeBmc] = []
    yield started
    for bmc in started:
        bmc.stop()


def start(bmcs: list[FakeBmc], tls: ssl.SSLContext, clock: Clock, **kwargs) -> FakeBmc:
    bmc = FakeBmc(clock, **kwargs).start(tls)
    bmcs.append(bmc)
    return bmc


def client(bmc: FakeBmc, certificate, *, auth: str = "session", insecure: bool = False,
           timeout: float = TIMEOUT_SECONDS) -> RedfishClient:
    return RedfishClient(bmc.url, Secret(USERNAME), Secret(PASSWORD), auth=auth,
                         timeout_seconds=timeout, ca_file=None if insecure else str(certificate[0]),
                         insecure=insecure)


def meter(bmc: FakeBmc, certificate, clock: Clock, **kwargs) -> RedfishMeter:
    auth = kwargs.pop("auth", "session")
    return RedfishMeter(client(bmc, certificate, auth=auth), clock=clock, start_poller=False,
                        **kwargs)


def joules(m: RedfishMeter) -> float | None:
    devices = m.read().devices
    if not devices:
        return None
    (device,) = devices
    assert (device.device, device.component, device.source) == ("platform", "platform",
                                                                "redfish")
    return device.joules


def run(m: RedfishMeter, clock: Clock, seconds: float, every: float = 10.0) -> None:
    for _ in range(round(seconds / every)):
        clock.now += every
        m.poll()


# ------------------------------------------------------------------ what the BMC offers


@pytest.mark.parametrize("counter", ["EnergyJoules", "EnergykWh"])
def test_an_energy_counter_is_preferred_and_followed(bmcs, tls, certificate, clock,
                                                     counter) -> None:
    bmc = start(bmcs, tls, clock, variant="counter", counter_name=counter,
                load=Load([(0.0, 800.0)]))
    m = meter(bmc, certificate, clock)
    m.poll()
    assert m.plan is not None and m.plan.method == COUNTER and m.plan.counter_name == counter
    assert joules(m) == 0.0 and m.up()  # the counter's value so far is a baseline
    run(m, clock, 60)
    assert joules(m) == pytest.approx(48_000.0, rel=1e-9)
    clock.now += 5  # between polls: the power beside the counter, up to now
    assert joules(m) == pytest.approx(52_000.0, rel=1e-9)
    posts = [r for r in bmc.requests if r.method == "POST"]
    assert len(posts) == 1  # one session, reused by every poll
    gets = bmc.gets()
    assert gets and all("X-Auth-Token" in r.headers for r in gets)
    assert not any("Authorization" in r.headers for r in gets)
    m.close()
    assert bmc.deleted == ["1"]  # the session slot is given back


def test_only_power_control_is_integrated(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="power", load=Load([(0.0, 1000.0), (5030.0, 500.0)]))
    m = meter(bmc, certificate, clock)
    m.poll()
    assert m.plan is not None and m.plan.method == POWER_CONTROL
    run(m, clock, 60)  # 1000 W until 5030 s, then 500 W; polls every 10 s, trapezoid
    assert joules(m) == pytest.approx(10_000 + 10_000 + 7_500 + 3 * 5_000, rel=1e-9)


def test_power_supplies_are_summed(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="supplies", load=Load([(0.0, 900.0)]))
    m = meter(bmc, certificate, clock)
    m.poll()
    assert m.plan is not None and m.plan.method == SUPPLIES and len(m.plan.paths) == 2
    run(m, clock, 30)
    assert joules(m) == pytest.approx(27_000.0)
    assert "900.0 W" in m.report()[0].detail


def test_basic_auth_sends_no_session(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="env_power", auth="basic")
    m = meter(bmc, certificate, clock, auth="basic")
    m.poll()
    run(m, clock, 20)
    assert joules(m) == pytest.approx(20_000.0)
    assert not [r for r in bmc.requests if r.method == "POST"]
    assert all(r.headers.get("Authorization", "").startswith("Basic ") for r in bmc.gets())


def test_the_top_level_chassis_is_chosen_and_several_are_refused(bmcs, tls, certificate,
                                                                 clock) -> None:
    bmc = start(bmcs, tls, clock, variant="counter")
    bmc.chassis = ["1U", "GPU_Board"]  # GPU_Board is ContainedBy 1U
    m = meter(bmc, certificate, clock)
    m.poll()
    assert m.plan is not None and m.plan.chassis == "1U"
    configured = meter(bmc, certificate, clock, chassis="GPU_Board")
    configured.poll()
    assert configured.plan is not None and configured.plan.chassis == "GPU_Board"
    bmc.chassis = ["Blade1", "Blade2"]
    bmc.variant = "counter"
    several = meter(bmc, certificate, clock)
    several.poll()
    assert several.plan is None and "set meters.redfish.chassis" in several.last_error
    assert "Blade1" in several.report()[0].detail


# ------------------------------------------------------------------ a BMC that misbehaves


def test_a_stale_reading_is_not_power_and_its_spell_is_never_counted(bmcs, tls, certificate,
                                                                    clock) -> None:
    bmc = start(bmcs, tls, clock, variant="counter", load=Load([(0.0, 1000.0)]))
    m = meter(bmc, certificate, clock, interval_seconds=10.0, stale_after_seconds=60.0)
    m.poll()
    run(m, clock, 30)
    before = joules(m)
    assert before == pytest.approx(30_000.0)
    bmc.mode = "stale"  # counter and power frozen: a BMC whose sensor task hung
    run(m, clock, 90)
    assert joules(m) is None and not m.up()
    assert m.stale_total == 1 and "stale" in m.last_error
    assert "STALE" in m.report()[0].detail and not m.report()[0].ok
    bmc.mode = "ok"  # the counter jumps by the 90 s it did not show: not this tick's energy
    run(m, clock, 20)
    after = joules(m)
    assert after is not None and after - before < 30_000.0  # no spike: the estimate held
    run(m, clock, 30)
    assert joules(m) - after == pytest.approx(30_000.0)


def test_a_repeated_power_reading_goes_stale(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="power")
    m = meter(bmc, certificate, clock, stale_after_seconds=30.0)
    m.poll()
    bmc.mode = "stale"
    run(m, clock, 50)
    assert joules(m) is None and m.stale_total == 1


def test_a_hanging_bmc_never_holds_the_tick_and_goes_down(bmcs, tls, certificate,
                                                          clock) -> None:
    bmc = start(bmcs, tls, clock, variant="counter")
    m = meter(bmc, certificate, clock)
    m.poll()
    run(m, clock, 10)
    bmc.mode = "hang"
    poll = threading.Thread(target=m.poll, daemon=True)
    poll.start()
    assert wait_for(lambda: len(bmc.requests) > 0 and bmc.requests[-1].path.endswith(
        "EnvironmentMetrics") and bmc.mode == "hang")
    reads = threading.Thread(target=lambda: [m.read() for _ in range(100)], daemon=True)
    reads.start()
    reads.join(30)
    assert not reads.is_alive(), "read() waited on the network"
    poll.join(30)  # the request's own deadline ends the poll
    assert not poll.is_alive()
    assert "did not answer" in m.last_error
    clock.now += 31  # no good poll for longer than three intervals: down, never zero
    assert joules(m) is None and not m.up()


def test_401_is_an_error_without_a_login_storm(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="counter")
    m = meter(bmc, certificate, clock)
    m.poll()
    bmc.mode = "401"
    run(m, clock, 50)
    posts = [r for r in bmc.requests if r.method == "POST"]
    assert len(posts) <= 1 + 5  # at most one new login per failed poll
    assert m.errors_total == 5 and "401" in m.last_error
    assert joules(m) is None


def test_refused_credentials_are_one_login_per_poll(bmcs, tls, certificate, clock,
                                                    caplog) -> None:
    caplog.set_level(logging.DEBUG)
    bmc = start(bmcs, tls, clock, variant="counter")
    m = RedfishMeter(RedfishClient(bmc.url, Secret(USERNAME), Secret("wrong-password-1b7"),
                                   timeout_seconds=TIMEOUT_SECONDS, ca_file=str(certificate[0])),
                     clock=clock, start_poller=False)
    run(m, clock, 30)
    assert len([r for r in bmc.requests if r.method == "POST"]) == 3
    assert m.plan is None and "401" in m.last_error and not m.report()[0].ok
    assert "wrong-password-1b7" not in caplog.text + m.report()[0].detail


def test_an_expired_session_logs_in_again(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="counter", load=Load([(0.0, 500.0)]))
    m = meter(bmc, certificate, clock)
    m.poll()
    bmc.mode = "expire"
    run(m, clock, 10)
    assert m.errors_total == 0 and m.client.logins_total == 2  # type: ignore[attr-defined]
    run(m, clock, 10)
    assert joules(m) == pytest.approx(10_000.0)


def wobbling(start_seconds: float, watts: float = 1000.0) -> Load:
    """A real node's power is never perfectly still: a watt or two up and down."""
    return Load([(start_seconds + 5.0 * i, watts + i % 3) for i in range(100)])


@pytest.mark.parametrize("mode", ["nan", "nan_string", "negative", "huge", "null", "down"])
@pytest.mark.parametrize("variant", ["counter", "power"])
def test_readings_that_are_not_power_are_errors(bmcs, tls, certificate, clock, mode,
                                                variant) -> None:
    bmc = start(bmcs, tls, clock, variant=variant, load=wobbling(clock.now))
    m = meter(bmc, certificate, clock)
    m.poll()
    run(m, clock, 10)
    good = joules(m)
    bmc.mode = mode
    run(m, clock, 40)
    assert m.errors_total >= 4
    assert joules(m) is None  # 40 s without a good reading: down
    bmc.mode = "ok"
    run(m, clock, 10)
    run(m, clock, 10)
    assert joules(m) - good <= 10_010.0  # the bad spell never became energy


def test_a_redirect_to_another_origin_is_not_followed(bmcs, tls, certificate, clock) -> None:
    bmc = start(bmcs, tls, clock, variant="counter")
    other = start(bmcs, tls, clock, variant="counter")
    m = meter(bmc, certificate, clock)
    m.poll()
    bmc.mode = "redirect"
    bmc.redirect_location = f"{other.url}/redfish/v1/Chassis/1U/EnvironmentMetrics"
    m.poll()
    assert other.requests == []  # nothing at all reached the other origin
    assert "redirect" in m.last_error and "another origin" in m.last_error


def test_the_token_and_password_are_never_logged(bmcs, tls, certificate, clock,
                                                 caplog) -> None:
    caplog.set_level(logging.DEBUG)
    bmc = start(bmcs, tls, clock, variant="counter")
    m = meter(bmc, certificate, clock)
    for mode in ("ok", "expire", "401", "nan", "hang", "redirect", "ok"):
        bmc.mode = mode
        bmc.redirect_location = "https://127.0.0.1:1/elsewhere"
        clock.now += 10
        m.poll()
    m.close()
    tokens = list(bmc.sessions) + [r.headers.get("X-Auth-Token", "") for r in bmc.requests]
    tokens = [t for t in tokens if t]
    assert tokens  # sessions were made, so there was something to leak
    text = caplog.text + " ".join(line.detail for line in m.report()) + m.last_error
    for secret in [*tokens, PASSWORD]:
        assert secret not in text
    assert repr(Secret(PASSWORD)) == "Secret('***')"


def test_the_certificate_is_verified(bmcs, tls, certificate, clock, caplog) -> None:
    bmc = start(bmcs, tls, clock, variant="counter")
    untrusted = RedfishMeter(RedfishClient(bmc.url, Secret(USERNAME), Secret(PASSWORD),
                                           timeout_seconds=TIMEOUT_SECONDS),
                             clock=clock, start_poller=False)
    untrusted.poll()  # the system store does not know this BMC's certificate
    assert untrusted.plan is None and "network" in untrusted.last_error
    assert bmc.requests == []  # the credentials never left the client
    caplog.set_level(logging.WARNING)
    insecure = RedfishMeter(client(bmc, certificate, insecure=True), clock=clock,
                            start_poller=False)
    insecure.poll()
    assert insecure.plan is not None
    assert "NOT verified" in caplog.text


def test_the_polling_thread_runs_on_its_own_cadence(bmcs, tls, certificate) -> None:
    import time

    bmc = start(bmcs, tls, time.monotonic, variant="counter")
    m = RedfishMeter(client(bmc, certificate), interval_seconds=0.2, stale_after_seconds=5.0)
    try:
        assert wait_for(lambda: (joules(m) or 0.0) > 0.0, timeout=30)
        assert any(t.name == "carbond-redfish-poller" for t in threading.enumerate())
    finally:
        m.close()
    assert wait_for(lambda: not any(t.name == "carbond-redfish-poller"
                                    for t in threading.enumerate()), timeout=10)
    assert bmc.deleted  # logged out at close


# ------------------------------------------------------------------ counter vs integrated power


def test_counter_and_integrated_power_agree_over_ten_minutes(bmcs, tls, certificate,
                                                             clock) -> None:
    """Issue 22, done when: the same node's energy counter and its integrated power agree
    within 1 % over 10 minutes of fed load (a simulated clock drives BMC and meters)."""
    steps, now = [], clock.now
    for index in range(20):  # load changing every 30 s between 300 W and 1400 W
        steps.append((now + 30.0 * index, 300.0 + (index * 370) % 1100))
    load = Load(steps)
    counter_bmc = start(bmcs, tls, clock, variant="counter", load=load, integer_watts=True)
    power_bmc = start(bmcs, tls, clock, variant="power", load=load, integer_watts=True)
    counter, power = meter(counter_bmc, certificate, clock), meter(power_bmc, certificate, clock)
    for m in (counter, power):
        m.poll()
    start_joules = (joules(counter), joules(power))
    for tick in range(1, 121):  # 5 s ticks, polls every 10 s
        clock.now += 5.0
        if tick % 2 == 0:
            counter.poll()
            power.poll()
        counter.read()
        power.read()
    counted = joules(counter) - start_joules[0]
    integrated = joules(power) - start_joules[1]
    exact = load.joules_until(clock.now) - load.joules_until(now)
    assert counted == pytest.approx(exact, rel=0.01)
    assert integrated == pytest.approx(counted, rel=0.01)


# ------------------------------------------------------------------ links from the BMC


@settings(max_examples=300)
@given(st.text(max_size=80) | st.sampled_from(["//evil.example/x", "https://evil/redfish/v1",
                                               "/redfish/v1/../../etc", "/redfish//x"]))
def test_a_link_is_a_path_under_redfish_or_refused(link) -> None:
    try:
        path = resource_path({"@odata.id": link})
    except FetchError:
        return
    assert path.startswith("/redfish/") and "//" not in path and path.isprintable()


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["Reading", "PowerWatts", "EnergyJoules", "EnergykWh", "PowerControl",
                         "PowerConsumedWatts", "InputPowerWatts", "Members", "@odata.id",
                         "ReadingTime", "x"]), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=400)
@given(json_values)
def test_any_answer_parses_or_is_refused(document) -> None:
    """Whatever JSON a BMC sends, the parsers give a checked number or one of the two errors
    the meter counts; never another exception, never NaN or a negative power."""
    from carbond.meters.integrate import ReadingError
    from carbond.meters.redfish import (
        counter_name,
        environment_power,
        environment_sample,
        members,
        power_control_watts,
        supply_watts,
    )

    calls = [lambda: environment_sample(document, counter_name(document) or "EnergyJoules"),
             lambda: environment_power(document), lambda: power_control_watts(document),
             lambda: supply_watts(document), lambda: members(document, 4)]
    for call in calls:
        try:
            result = call()
        except (FetchError, ReadingError):
            continue
        values = [result] if isinstance(result, float) else (
            [v for v in (result.joules, result.watts) if v is not None]
            if hasattr(result, "watts") else [])
        assert all(0 <= v < float("inf") for v in values)
