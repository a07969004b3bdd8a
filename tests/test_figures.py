"""Figures for people (commands/figures.py): three significant digits in a scaled unit, never in
exponent form, in `carbond exec`'s summary, `carbond report`'s table and its html page; and
the page's everyday equivalence."""

from __future__ import annotations

import re
from datetime import timezone
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carbond.commands.exec.summary import RunSummary, format_summary
from carbond.commands.figures import decimal, human_grams, human_joules
from carbond.commands.report.equivalence import LITRES_PER_US_GALLON, PETROL
from carbond.commands.report.model import PageInfo, Report, ReportRow
from carbond.commands.report.render import render
from carbond.ledger.ledger import Usage

EXPONENT = re.compile(r"\d(?:\.\d*)?[eE][-+]?\d")
SCALE = {"J": 1.0, "kJ": 1e3, "Wh": 3600.0, "kWh": 3.6e6, "g": 1.0, "kg": 1e3, "t": 1e6}
H0 = 1_714_521_600  # 2024-05-01 00:00 UTC
DAY = 86400
# Anything from a subnormal-free nanojoule to far past a fleet's lifetime, and zero.
amounts = st.one_of(st.just(0.0), st.floats(min_value=1e-9, max_value=1e18))


def significant_digits(number: str) -> str:
    """'0.00509' -> '509', '1,230' -> '123', '13.0' -> '130'."""
    return number.replace(",", "").replace(".", "").lstrip("0")


@settings(max_examples=400, deadline=None)
@given(amounts, st.sampled_from(["energy", "mass"]))
def test_scaled_figures_have_three_digits_and_no_exponent(value: float, kind: str) -> None:
    text = human_joules(value) if kind == "energy" else human_grams(value)
    assert not EXPONENT.search(text), text
    number, unit = text.split(" ")
    assert unit in (("J", "kJ", "Wh", "kWh") if kind == "energy" else ("g", "kg", "t"))
    shown = float(number.replace(",", ""))
    if value == 0:
        assert number == "0"
        return
    digits = significant_digits(number)
    assert len(digits) >= 3 and set(digits[3:]) <= {"0"}, text  # 3 digits, then only zeros
    assert shown * SCALE[unit] == pytest.approx(value, rel=5.01e-3)
    # The smallest unit that keeps the figure under 1000 of it (kJ only up to 100 kJ).
    if unit not in ("kWh", "t"):
        assert shown < (100 if unit == "kJ" else 1000), text


@pytest.mark.parametrize(("joules", "text"), [
    (13.0, "13.0 J"), (999.4, "999 J"), (999.6, "1.00 kJ"), (99_960.0, "27.8 Wh"),
    (3_598_300.0, "1.00 kWh"), (5.59e-07 * 3.6e6, "2.01 J"), (1.234e10, "3,430 kWh"),
])
def test_energy_examples(joules: float, text: str) -> None:
    assert human_joules(joules) == text


@pytest.mark.parametrize(("grams", "text"), [
    (0.00509, "0.00509 g"), (999.96, "1.00 kg"), (1650.0, "1.65 kg"), (2.5e6, "2.50 t"),
    (None, "unknown"), (float("nan"), "unknown"),
])
def test_mass_examples(grams: float | None, text: str) -> None:
    assert human_grams(grams) == text


def test_decimal_never_uses_an_exponent() -> None:
    assert decimal(1.5e-7) == "0.000000150" and decimal(123456.0) == "123,000"


usages = st.builds(Usage, cpu_joules=amounts, dram_joules=amounts, gpu_joules=amounts,
                   grams=amounts, embodied_grams=amounts,
                   providers=st.sets(st.sampled_from(["static", "electricitymaps"])))


def report_of(usages_: list[Usage], by: str = "consumer") -> Report:
    keys = {"consumer": lambda i: (f"c{i}.service", "unit"), "kind": lambda i: (f"kind{i}",)}
    return Report(H0, H0 + 3 * DAY, by, "UTC", "ledger", "/var/lib/carbond/ledger.db",
                  [ReportRow(keys[by](i), usage) for i, usage in enumerate(usages_)])


@settings(max_examples=150, deadline=None)
@given(st.lists(usages, max_size=6), st.sampled_from(["consumer", "kind"]))
def test_no_number_in_the_table_is_in_exponent_form(rows: list[Usage], by: str) -> None:
    table = render(report_of(rows, by), "table", timezone.utc)
    assert not EXPONENT.search(table), table
    lines = table.splitlines()
    assert lines[-1].startswith("TOTAL") and len(lines) == 5 + len(rows)


class PageText(HTMLParser):
    """The text a reader sees (not the style sheet, not the data attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.equivalents: list[str] = []
        self._skip = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip = tag == "style"
        values = dict(attrs)
        if values.get("class") == "equiv":
            self.equivalents.append(values.get("data-amount") or "")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.texts.append(data)


def page_text(report: Report) -> PageText:
    page = PageText()
    page.feed(render(report, "html", timezone.utc, daily=None,
                     info=PageInfo(host="gpu-01", zone="DE", generated=H0)))
    page.close()
    return page


@settings(max_examples=60, deadline=None)
@given(st.lists(usages, max_size=5))
def test_no_number_on_the_html_page_is_in_exponent_form(rows: list[Usage]) -> None:
    text = " ".join(page_text(report_of(rows)).texts)
    assert not EXPONENT.search(text), EXPONENT.search(text)


def test_each_co2e_total_has_an_equivalence_with_its_factor_and_source() -> None:
    usage = Usage(cpu_joules=3.6e6, grams=4695.4, embodied_grams=2347.7)
    page = page_text(report_of([usage]))
    litres = [float(a) for a in page.equivalents]
    assert litres == pytest.approx([3.0, 2.0, 1.0], rel=1e-4)  # total, operational, embodied
    text = " ".join(page.texts)
    assert "\u2248 3.00\u00a0L of petrol burned" in text
    assert text.count("at 2,348 g CO2 per litre (8,887 g per US gallon), US EPA") == 3
    assert text.count("8,887 g CO2 per US gallon of gasoline") == 1  # in full, in the facts
    assert "EPA-420-F-11-041" in text and PETROL.url in text
    assert PETROL.grams_per_unit == pytest.approx(8887 / LITRES_PER_US_GALLON)


@settings(max_examples=150, deadline=None)
@given(amounts, amounts, amounts, st.one_of(st.none(), amounts),
       st.floats(min_value=0, max_value=1e7))
def test_exec_prints_the_same_scaled_figures(cpu: float, dram: float, gpu: float,
                                             grams: float | None, seconds: float) -> None:
    run = RunSummary(project="p", run_id="r", command=["x"], exit_status=0, started=H0,
                     ended=H0 + seconds, duration_seconds=seconds, cpu_seconds=seconds,
                     joules={"cpu": cpu, "dram": dram, "gpu": gpu}, grams=grams,
                     grams_per_kwh=400.0, providers=["static"], zone="DE", pue=1.0,
                     measured_by="exec")
    text = format_summary(run)
    assert not EXPONENT.search(text), text
    assert f"total {human_joules(cpu + dram + gpu)}" in text
    assert human_grams(grams) in text
