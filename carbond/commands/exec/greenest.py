"""`carbond exec --greenest`: plan the start in the lowest-carbon window of the forecast and
wait for it, a signal cancelling the wait."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import IO

from carbond.carbon import ForecastUnsupported, IntensityFeed, fetch_forecast
from carbond.carbon.intensity import FetchError
from carbond.commands.exec.plan import Plan, plan_greenest
from carbond.commands.exec.supervise import FORWARDED, Signals, say
from carbond.commands.intensity import format_age


def _local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def describe_plan(plan: Plan, provider: str, zone: str, marginal: bool) -> str:
    kind = "marginal " if marginal else ""
    expected = (f"{plan.grams_per_kwh:.0f} gCO2e/kWh {kind}expected over the "
                f"{format_age(plan.duration_seconds)} run")
    source = f"({provider} forecast, zone {zone})"
    if plan.wait_seconds <= 0:
        return f"carbond exec: greenest start is now: {expected} {source}"
    return (f"carbond exec: greenest start {_local(plan.start)} (in "
            f"{format_age(plan.wait_seconds)}): {expected}, against "
            f"{plan.now_grams_per_kwh:.0f} starting now: {plan.saving_percent:.0f}% less "
            f"{source}; waiting (SIGINT or SIGTERM cancels)")


def greenest_start(feed: IntensityFeed, zone: str, deadline_seconds: float,
                   duration_seconds: float, signals: Signals,
                   err: IO[str]) -> tuple[Plan | None, int | None]:
    """Plan and wait. (plan or None, None) to go on; (_, status) when a signal cancelled."""
    now = time.time()
    try:
        forecast = fetch_forecast(feed.providers, now)
        plan = plan_greenest(forecast.points, now, deadline_seconds, duration_seconds)
    except ForecastUnsupported as exc:
        say(err, f"carbond exec: no forecast ({exc}): starting now")
        return None, None
    except FetchError as exc:
        say(err, f"carbond exec: forecast failed ({exc}): starting now")
        return None, None
    except ValueError as exc:
        say(err, f"carbond exec: forecast unusable ({exc}): starting now")
        return None, None
    say(err, describe_plan(plan, forecast.provider, zone, forecast.marginal))
    deadline = time.monotonic() + (plan.start - time.time())
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return plan, None
        info = signals.wait(remaining, FORWARDED)
        if info is not None:
            name = signal.Signals(info.si_signo).name
            say(err, f"carbond exec: {name} before the planned start: not running the command")
            return plan, 128 + info.si_signo
