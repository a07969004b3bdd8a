"""`carbond report --format html`: the page opened in a real headless Chromium over the DevTools
protocol (no console errors, nothing loaded from outside, one bar per day, totals equal the
JSON report's, fits a phone, prints), and hostile names escaped.

`python -m tests.test_report_html docs/report-example.png` regenerates the screenshot in docs/.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carbond.commands.report.html import TOP_N
from carbond.commands.report.model import PageInfo, Report, ReportRow
from carbond.commands.report.render import render
from carbond.ledger.ledger import Ledger, Usage
from carbond.ledger.periods import SECONDS_PER_HOUR
from carbond.types import Consumer
from tests import cdp
from tests.helpers import tick_record

H0 = 1_714_521_600  # 2024-05-01 00:00 UTC
DAY = 86400
KWH = 3.6e6
PUE = 1.2
EMBODIED_GRAMS_PER_HOUR = 1_500_000 / (4 * 365.25 * 24)  # 1.5 t over 4 years


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# watts per component while active, and when: a GPU server shared by a team
EXAMPLE: dict[Consumer, tuple[dict[str, float], tuple[int, int]]] = {
    Consumer("job", "slurm/48213"): ({"cpu": 95.0, "dram": 14.0, "gpu": 1380.0}, (2, 9)),
    Consumer("project", "climate-downscaling"): ({"cpu": 60.0, "dram": 9.0, "gpu": 610.0},
                                                 (0, 14)),
    Consumer("user", "alice"): ({"cpu": 28.0, "dram": 4.0, "gpu": 240.0}, (5, 12)),
    Consumer("container", "docker/3f2a9c1b7e4d"): ({"cpu": 41.0, "dram": 6.0}, (0, 14)),
    Consumer("unit", "postgresql.service"): ({"cpu": 22.0, "dram": 5.5}, (0, 14)),
    Consumer("pod", "pod/7c9e6679-7425-40de-944b-e07fc1f90ae7"): ({"cpu": 18.0, "dram": 2.5},
                                                                   (3, 14)),
    Consumer("unit", "nginx.service"): ({"cpu": 9.0, "dram": 1.5}, (0, 14)),
    Consumer("user", "bob"): ({"cpu": 12.0, "dram": 1.0, "gpu": 80.0}, (9, 13)),
    Consumer("process", "rsync"): ({"cpu": 6.0, "dram": 0.5}, (0, 14)),
    Consumer("unit", "prometheus-node-exporter.service"): ({"cpu": 1.2, "dram": 0.2}, (0, 14)),
    Consumer("other", "other"): ({"cpu": 3.0, "dram": 0.4}, (0, 14)),
    Consumer("idle", "idle"): ({"cpu": 110.0, "dram": 12.0, "gpu": 240.0}, (0, 14)),
}


def make_example_ledger(state_dir: str, days: int = 14, seed: int = 15,
                        extra: dict[Consumer, dict[str, float]] | None = None) -> None:
    """`days` days of hourly rows from 2024-05-01 UTC: a diurnal load, a grid that is cleaner
    at midday (electricitymaps, with one day on the static fallback), PUE 1.2, and the host's
    embodied carbon shared by energy."""
    rng = random.Random(seed)
    with Ledger.open(state_dir, clock=Clock(H0 + (days + 1) * DAY)) as ledger:
        for hour in range(days * 24):
            start = H0 + hour * SECONDS_PER_HOUR
            day, clock_hour = divmod(hour, 24)
            daytime = 0.5 + 0.5 * math.sin(math.pi * (clock_hour - 6) / 12)
            intensity = 420.0 - 190.0 * max(0.0, daytime - 0.2) + rng.uniform(-25, 25)
            provider = "static" if day == 6 else "electricitymaps"
            if provider == "static":
                intensity = 380.0
            energy: dict[tuple[str, str], dict[str, float]] = {}
            for consumer, (watts, (first, last)) in EXAMPLE.items():
                if not first <= day < last:
                    continue
                load = (0.6 + 0.8 * daytime if consumer.kind in ("unit", "pod", "user")
                        else 1.0) * rng.uniform(0.8, 1.2)
                energy[consumer] = {c: w * load * SECONDS_PER_HOUR for c, w in watts.items()}
            for consumer, components in (extra or {}).items():
                energy[consumer] = {c: j for c, j in components.items()}
            host = sum(sum(c.values()) for c in energy.values())
            grams = {k: sum(c.values()) / KWH * PUE * intensity for k, c in energy.items()}
            embodied = {k: EMBODIED_GRAMS_PER_HOUR * sum(c.values()) / host
                        for k, c in energy.items()}
            ledger.record(tick_record(start + 1800, 60.0, energy, grams, embodied, {}, intensity,
                          provider))


def carbond(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "carbond", *args], capture_output=True,
                          text=True, timeout=120)


def reports(state: str, *args: str) -> tuple[str, dict]:
    """The html page and the JSON report of the same period and grouping."""
    common = ["report", "--state-dir", state, "--since", "2024-05-01", "--until", "2024-05-15",
              *args]
    page = carbond(*common, "--format", "html")
    assert page.returncode == 0, page.stderr
    data = carbond(*common, "--format", "json")
    assert data.returncode == 0, data.stderr
    return page.stdout, json.loads(data.stdout)


@pytest.fixture(scope="module")
def browser() -> Iterator[cdp.Page]:
    if cdp.chromium_binary() is None:
        pytest.skip("no chromium: run scripts/test-deps.sh")
    with cdp.chromium() as page:
        yield page


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> str:
    state = str(tmp_path_factory.mktemp("example") / "state")
    make_example_ledger(state)
    return state


PAGE_FACTS = """(() => {
  const bars = sel => [...document.querySelectorAll(sel + ' g.bar')].map(g => ({
    day: g.dataset.day || null, grams: +g.dataset.grams, embodied: +g.dataset.embodiedGrams,
    heights: [...g.querySelectorAll('rect')].map(r => r.getBBox().height)}));
  const card = id => { const e = document.getElementById(id);
    return {grams: e.dataset.grams, joules: e.dataset.joules,
            text: e.querySelector('.value').textContent}; };
  return {
    dayBars: bars('#chart-days'), shareBars: bars('#chart-share'),
    co2e: card('total-co2e'), operational: card('total-operational'),
    embodied: card('total-embodied'), energy: card('total-energy'),
    rows: [...document.querySelectorAll('#rows tbody tr')].map(tr => ({
      keys: [...tr.querySelectorAll('td.key')].map(td => td.textContent),
      joules: tr.dataset.joules, grams: tr.dataset.grams})),
    scripts: document.scripts.length,
    external: [...document.querySelectorAll('[src],[href],link,img,iframe,object')].length,
    svgs: document.querySelectorAll('svg').length,
    overflow: document.documentElement.scrollWidth - window.innerWidth,
  };
})()"""


def shown_number(text: str) -> tuple[float, str]:
    """'1,234 kg' -> (1234.0, 'kg')."""
    match = re.fullmatch(r"([-0-9.,e+]+)\s+(\S+)", text.replace("\u00a0", " "))
    assert match, text
    return float(match.group(1).replace(",", "")), match.group(2)


SCALE = {"g": 1.0, "kg": 1e3, "t": 1e6, "J": 1.0, "kJ": 1e3, "Wh": 3600.0, "kWh": KWH}


def assert_shown(text: str, base_value: float) -> None:
    """The rounded figure on the page is the exact one to its three significant figures."""
    value, unit = shown_number(text)
    assert value * SCALE[unit] == pytest.approx(base_value, rel=0.01), (text, base_value)


def test_the_page_in_chromium_matches_the_json_report(browser: cdp.Page, example: str,
                                                      tmp_path: Path) -> None:
    page_html, doc = reports(example)
    path = tmp_path / "report.html"
    path.write_text(page_html)
    cdp.load(browser, str(path))
    assert browser.problems() == []
    assert browser.requests() == [f"file://{path}"]  # nothing fetched besides the page
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["scripts"] == 0 and facts["external"] == 0 and facts["svgs"] == 2

    days = [(date(2024, 5, 1) + timedelta(days=i)).isoformat() for i in range(14)]
    assert [bar["day"] for bar in facts["dayBars"]] == days  # one bar per day, in order
    by_day = {row["day"]: row for row in reports(example, "--by", "day")[1]["rows"]}
    for bar in facts["dayBars"]:
        assert bar["grams"] == by_day[bar["day"]]["grams"]
        assert bar["embodied"] == by_day[bar["day"]]["embodied_grams"]
        assert sum(bar["heights"]) > 0  # drawn, not just present
    total = doc["total"]
    assert math.fsum(b["grams"] for b in facts["dayBars"]) == pytest.approx(total["grams"],
                                                                           rel=1e-12)
    # Top N and the rest, largest first.
    consumers = len(doc["rows"])
    assert consumers > TOP_N
    assert len(facts["shareBars"]) == TOP_N + 1
    shown = [b["grams"] + b["embodied"] for b in facts["shareBars"][:TOP_N]]
    assert shown == sorted(shown, reverse=True)
    assert math.fsum(b["grams"] for b in facts["shareBars"]) == pytest.approx(total["grams"],
                                                                             rel=1e-12)

    # Totals: the exact figures equal the JSON report's; the text shown is them, rounded.
    assert float(facts["operational"]["grams"]) == total["grams"]
    assert float(facts["embodied"]["grams"]) == total["embodied_grams"]
    assert float(facts["co2e"]["grams"]) == total["grams"] + total["embodied_grams"]
    assert float(facts["energy"]["joules"]) == total["joules"]
    assert_shown(facts["operational"]["text"], total["grams"])
    assert_shown(facts["embodied"]["text"], total["embodied_grams"])
    assert_shown(facts["co2e"]["text"], total["grams"] + total["embodied_grams"])
    assert_shown(facts["energy"]["text"], total["joules"])
    # The table: every JSON row, same order, same figures.
    assert [row["keys"] for row in facts["rows"]] == [[r["consumer"], r["kind"]]
                                                      for r in doc["rows"]]
    for row, expected in zip(facts["rows"], doc["rows"], strict=True):
        assert float(row["joules"]) == expected["joules"]
        assert float(row["grams"]) == expected["grams"]


def test_the_page_fits_a_phone_and_prints(browser: cdp.Page, example: str,
                                          tmp_path: Path) -> None:
    page_html, _ = reports(example)
    path = tmp_path / "report.html"
    path.write_text(page_html)
    cdp.load(browser, str(path), width=375, height=740, mobile=True)
    assert browser.problems() == []
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["overflow"] <= 0  # no sideways scrolling of the page
    assert len(facts["dayBars"]) == 14
    # Text in the charts keeps a readable size at phone width (no viewBox shrinking).
    smallest = browser.evaluate(
        "Math.min(...[...document.querySelectorAll('svg text')].map("
        "t => t.getBoundingClientRect().height).filter(h => h > 0))")
    assert smallest >= 10
    pdf = cdp.print_pdf(browser)
    assert pdf.startswith(b"%PDF")
    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf))
    assert 1 <= pages <= 4
    assert browser.problems() == []


HOSTILE = [
    Consumer("cgroup", "<script>alert(1)</script>"),
    Consumer("unit", 'a"onmouseover="x.service'),
    Consumer("cgroup", "esc\x1b[31mred\x07\x00nul"),
    Consumer("process", "&amp;<!--"),
    Consumer("user", "\u202eevil"),
]


def test_hostile_names_are_escaped_in_chromium(browser: cdp.Page, tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    make_example_ledger(state, days=2, extra={c: {"cpu": 1e6 * (i + 1)}
                                              for i, c in enumerate(HOSTILE)})
    result = carbond("report", "--state-dir", state, "--since", "2024-05-01", "--until",
                     "2024-05-03", "--format", "html")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "report.html"
    path.write_text(result.stdout)
    cdp.load(browser, str(path))
    assert browser.problems() == []
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["scripts"] == 0
    names = {row["keys"][0] for row in facts["rows"]}
    assert "<script>alert(1)</script>" in names
    assert 'a"onmouseover="x.service' in names
    assert "esc\\x1b[31mred\\x07\\x00nul" in names  # control characters shown as escapes
    assert "&amp;<!--" in names
    assert "\\u202eevil" in names  # a bidi override is not printable: escaped too
    assert browser.evaluate("document.querySelectorAll('[onmouseover]').length") == 0


# ---- without a browser: the markup itself ------------------------------------------------------


class Outline(HTMLParser):
    """Tags, attributes and the text of table key cells, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.keys: list[str] = []
        self._in_key = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.tags.append((tag, found))
        self._in_key = tag == "td" and "key" in (found.get("class") or "").split()
        if self._in_key:
            self.keys.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_key = False

    def handle_data(self, data: str) -> None:
        if self._in_key:
            self.keys[-1] += data


def page_of(report: Report, daily: Report | None = None) -> Outline:
    outline = Outline()
    outline.feed(render(report, "html", __import__("datetime").timezone.utc, daily=daily,
                        info=PageInfo(host="gpu-01", zone="DE", generated=H0)))
    outline.close()
    return outline


def bars(outline: Outline) -> list[dict[str, str | None]]:
    return [a for tag, a in outline.tags if tag == "g" and a.get("class") == "bar"
            and a.get("data-day") is not None]


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.text(max_size=30), st.text(max_size=10)), min_size=0, max_size=12,
                unique=True))
def test_any_names_stay_text(keys: list[tuple[str, str]]) -> None:
    rows = [ReportRow(key, Usage(cpu_joules=1000.0 * (i + 1), grams=float(i + 1)))
            for i, key in enumerate(keys)]
    outline = page_of(Report(H0, H0 + 3 * DAY, "consumer", "UTC", "ledger", "<x>", rows))
    assert not any(tag in ("script", "img", "iframe", "link", "object") for tag, _ in
                   outline.tags)
    assert not any(name.startswith("on") for _, attrs in outline.tags for name in attrs)
    cells = outline.keys[: 2 * len(keys)]
    expected = ["".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
                for key in keys for text in key]
    assert cells == expected
    assert len(bars(outline)) == 3


def test_every_day_has_a_bar_even_without_energy() -> None:
    """A period of 5 days with energy on one: five bars, four of them empty."""
    daily = Report(H0, H0 + 5 * DAY, "day", "UTC", "ledger", "x",
                   [ReportRow(("2024-05-03",), Usage(cpu_joules=KWH, grams=300.0))])
    outline = page_of(Report(H0, H0 + 5 * DAY, "consumer", "UTC", "ledger", "x", []), daily)
    assert [b["data-day"] for b in bars(outline)] == [
        "2024-05-01", "2024-05-02", "2024-05-03", "2024-05-04", "2024-05-05"]
    assert [b["data-grams"] for b in bars(outline)] == ["0.0", "0.0", "300.0", "0.0", "0.0"]
    # An empty period still renders, and says so.
    empty = page_of(Report(H0, H0 + DAY, "consumer", "UTC", "ledger", "x", []))
    assert len(bars(empty)) == 1
    assert empty.keys[0].startswith("No energy recorded")


def test_html_by_kind_and_by_day(example: str) -> None:
    page_html, doc = reports(example, "--by", "kind")
    outline = Outline()
    outline.feed(page_html)
    assert [k for k in outline.keys if k] == [*(r["kind"] for r in doc["rows"]), "Total"]
    page_html, doc = reports(example, "--by", "day")
    outline = Outline()
    outline.feed(page_html)
    assert len(bars(outline)) == 14 == len(doc["rows"])
    assert not any(a.get("id") == "chart-share" for _, a in outline.tags)


def main(target: str) -> None:
    """Render the example report and screenshot it in Chromium (desktop width)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        state = os.path.join(scratch, "state")
        make_example_ledger(state)
        config = os.path.join(scratch, "carbond.yaml")
        with open(config, "w") as handle:
            handle.write("intensity: {zone: DE}\nembodied: {kgco2e: 1500, lifetime: 4y}\n")
        result = carbond("report", "--config", config, "--state-dir", state, "--since",
                         "2024-05-01", "--until", "2024-05-15", "--format", "html")
        assert result.returncode == 0, result.stderr
        page_html = result.stdout.replace(socket.gethostname(), "gpu-07")
        path = os.path.join(scratch, "report.html")
        with open(path, "w") as handle:
            handle.write(page_html.replace(state, "/var/lib/carbond"))
        with cdp.chromium() as page:
            cdp.load(page, path, width=1100, height=900)
            assert page.problems() == [], page.problems()
            cdp.screenshot(page, target)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/report-example.png")
