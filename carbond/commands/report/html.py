"""`carbond report --format html`: one self-contained page to send to a team or a
sustainability officer.

The page carries everything inline (CSS, SVG charts) and nothing active: no script, no
external asset, and a Content-Security-Policy that would block one anyway, so it can be mailed,
attached to a ticket or printed as it is. Every figure comes from the same `Report` that the
JSON and CSV formats render, plus the same period split by day (`--by day`), so its totals
equal theirs. Names come from the kernel and from users: every one is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone, tzinfo

from carbond import __version__
from carbond.commands.figures import ENERGY_UNITS, MASS_UNITS, decimal, unit_for
from carbond.commands.report.equivalence import PETROL, Equivalence
from carbond.commands.report.model import DayUsage, PageInfo, Report
from carbond.ledger.ledger import Usage

JOULES_PER_KWH = 3.6e6
TOP_N = 8  # the per-consumer chart: this many bars, then one for the rest
DAY_CHART_HEIGHT = 220  # px of plot area
MAX_NAME_CHARS = 40
COLUMN_TITLES = {"consumer": "Consumer", "kind": "Kind", "day": "Day", "project": "Project"}


# ---- numbers and text ---------------------------------------------------------------------------


def _printable(text: str) -> str:
    """Control and other non-printable characters (a kernel name may hold any) as escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _name(text: str, limit: int | None = None) -> str:
    """Printable, optionally shortened with an ellipsis, HTML-escaped."""
    shown = _printable(text)
    if limit is not None and len(shown) > limit:
        shown = shown[: limit - 1] + "\u2026"
    return html.escape(shown, quote=True)


def _fixed(value: float) -> str:
    """Three significant figures, thousands separated, never in exponent form."""
    return decimal(value) if math.isfinite(value) else "-"


@dataclass(frozen=True)
class Unit:
    symbol: str
    per_base: float  # base units (joules, grams) per one of this unit

    def show(self, base_value: float) -> str:
        return f"{_fixed(base_value / self.per_base)}\u00a0{self.symbol}"


def _unit_for(value: float, units: Sequence[tuple[str, float, float]]) -> Unit:
    """The unit `figures` would print `value` in: one per column, from its largest."""
    return Unit(*unit_for(value, units))


def energy_unit(joules: float) -> Unit:
    return _unit_for(joules, ENERGY_UNITS)


def mass_unit(grams: float) -> Unit:
    return _unit_for(grams, MASS_UNITS)


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _co2e(usage: Usage) -> float:
    return usage.grams + usage.embodied_grams


def _day_label(day: str) -> str:
    try:
        parsed = date.fromisoformat(day)
    except ValueError:
        return _name(day)
    return f"{parsed.day}\u00a0{parsed.strftime('%b')}"


def _long_date(instant: float, zone: tzinfo) -> str:
    moment = datetime.fromtimestamp(instant, zone)
    text = f"{moment.day} {moment.strftime('%B %Y')}"
    if (moment.hour, moment.minute, moment.second) != (0, 0, 0):
        text += f" {moment.strftime('%H:%M')}"
    return text


def _period(since: float, until: float, zone: tzinfo) -> tuple[str, str]:
    """First and last day as a reader counts them: a period that ends at midnight ends with
    the day before (`--until 2024-05-15` covers up to 14 May inclusive)."""
    end = datetime.fromtimestamp(until, zone)
    if (end.hour, end.minute, end.second, end.microsecond) == (0, 0, 0, 0) and until > since:
        last_day = datetime.fromtimestamp(until - 1, zone)
        return _long_date(since, zone), f"{last_day.day} {last_day.strftime('%B %Y')}"
    return _long_date(since, zone), _long_date(until, zone)


def _iso(instant: float, zone: tzinfo) -> str:
    return datetime.fromtimestamp(instant, zone).isoformat(timespec="seconds")


def _num(value: float) -> str:
    """A data attribute: the exact base-unit figure, for machines (and the tests)."""
    return repr(float(value)) if math.isfinite(value) else "NaN"


# ---- charts -----------------------------------------------------------------------------------


def _nice_step(maximum: float, ticks: int = 4) -> float:
    """A 1, 2, 2.5 or 5 times 10^n step that gives about `ticks` grid lines up to `maximum`."""
    if maximum <= 0 or not math.isfinite(maximum):
        return 1.0
    raw = maximum / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def day_chart(days: Sequence[DayUsage], mass: Unit) -> str:
    """One stacked bar (operational, embodied) per day. Coordinates across are percentages and
    heights are pixels, so the chart fills any width while its text keeps its size."""
    top, plot, bottom = 14, DAY_CHART_HEIGHT, 24
    peak = max((_co2e(d.usage) for d in days), default=0.0)
    step = _nice_step(peak)
    ceiling = step * max(1, math.ceil(peak / step - 1e-9)) if peak > 0 else step
    count = max(1, len(days))
    gutter = 7.0  # % at the left for the scale's labels
    slot = (100.0 - gutter) / count
    width = slot * (0.78 if count < 60 else 0.9)
    label_every = max(1, math.ceil(count / 7))

    def y(grams: float) -> float:
        return top + plot * (1 - grams / ceiling)

    parts = [f'<svg class="chart day-chart" role="img" width="100%" '
             f'height="{top + plot + bottom}" aria-labelledby="day-chart-title">']
    ticks = round(ceiling / step)
    labels = []
    for i in range(ticks + 1):
        level = y(i * step)
        parts.append(f'<line class="grid" x1="0" x2="100%" y1="{level:.1f}" y2="{level:.1f}"/>')
        if i:
            labels.append(f'<text class="tick" x="0" y="{level - 3:.1f}">'
                          f'{_fixed(i * step / mass.per_base)}\u00a0{mass.symbol}</text>')
    for index, entry in enumerate(days):
        usage = entry.usage
        x = gutter + index * slot + (slot - width) / 2
        op_top = y(usage.grams)
        total_top = y(_co2e(usage))
        title = (f"{_day_label(entry.day)}: {mass.show(_co2e(usage))} CO2e "
                 f"({mass.show(usage.grams)} operational, {mass.show(usage.embodied_grams)} "
                 f"embodied; {energy_unit(usage.joules).show(usage.joules)})")
        parts.append(
            f'<g class="bar" data-day="{_name(entry.day)}" data-grams="{_num(usage.grams)}" '
            f'data-embodied-grams="{_num(usage.embodied_grams)}" '
            f'data-joules="{_num(usage.joules)}"><title>{title}</title>'
            f'<rect class="operational" x="{x:.4f}%" width="{width:.4f}%" y="{op_top:.2f}" '
            f'height="{max(0.0, top + plot - op_top):.2f}"/>'
            f'<rect class="embodied" x="{x:.4f}%" width="{width:.4f}%" y="{total_top:.2f}" '
            f'height="{max(0.0, op_top - total_top):.2f}"/></g>')
        if index % label_every == 0:
            parts.append(f'<text class="day-label" x="{gutter + index * slot + slot / 2:.4f}%" '
                         f'y="{top + plot + 16}" text-anchor="middle">'
                         f'{_day_label(entry.day)}</text>')
    parts.append(f'<line class="axis" x1="0" x2="100%" y1="{top + plot}" y2="{top + plot}"/>')
    parts.extend(labels)  # last, over the bars (with a halo), so a tall first bar hides none
    parts.append("</svg>")
    return "".join(parts)


def _row_label(key: tuple[str, ...], by: str) -> str:
    if by == "consumer" and len(key) == 2:
        return f"{key[0]} ({key[1]})"
    return " ".join(key)


def share_chart(rows: Sequence[tuple[str, Usage]], mass: Unit, top_n: int = TOP_N) -> str:
    """Horizontal bars, largest CO2e first: the top `top_n` and one bar for all the rest."""
    ranked = sorted(rows, key=lambda r: (-_co2e(r[1]), r[0]))
    shown = list(ranked[:top_n])
    rest = ranked[top_n:]
    if rest:
        folded = Usage()
        for _, usage in rest:
            folded.add(usage)
        shown.append((f"{len(rest)} others", folded))
    peak = max((_co2e(u) for _, u in shown), default=0.0)
    total = sum(_co2e(u) for _, u in ranked)
    row_height, bar_height = 42, 16
    parts = [f'<svg class="chart share-chart" role="img" width="100%" '
             f'height="{row_height * max(1, len(shown)) + 4}" '
             'aria-labelledby="share-chart-title">']
    for index, (label, usage) in enumerate(shown):
        base = index * row_height
        scale = 100.0 * 0.98 / peak if peak > 0 else 0.0
        op_width = usage.grams * scale
        emb_width = usage.embodied_grams * scale
        is_rest = bool(rest) and index == len(shown) - 1
        value = (f"{mass.show(_co2e(usage))} \u00b7 "
                 f"{_percent(_co2e(usage), total):.1f}\u00a0%")
        parts.append(
            f'<g class="bar{" rest" if is_rest else ""}" data-grams="{_num(usage.grams)}" '
            f'data-embodied-grams="{_num(usage.embodied_grams)}">'
            f'<title>{_name(label)}: {html.escape(value)}</title>'
            f'<text class="name" x="0" y="{base + 14}">{_name(label, MAX_NAME_CHARS)}</text>'
            f'<rect class="track" x="0" width="100%" y="{base + 20}" height="{bar_height}"/>'
            f'<rect class="operational" x="0" width="{op_width:.4f}%" y="{base + 20}" '
            f'height="{bar_height}"/>'
            f'<rect class="embodied" x="{op_width:.4f}%" width="{emb_width:.4f}%" '
            f'y="{base + 20}" height="{bar_height}"/>'
            # the figure inside a long bar, after a short one: never over the name
            + (f'<text class="value inside" x="{op_width:.4f}%" dx="-6" '
               f'y="{base + 32}" text-anchor="end">' if op_width > 60 else
               f'<text class="value" x="{op_width + emb_width:.4f}%" dx="6" '
               f'y="{base + 32}">')
            + f'{html.escape(value)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# ---- the page -----------------------------------------------------------------------------------

STYLE = """
:root{--ink:#1d2521;--muted:#5b665f;--line:#d9e0dc;--op:#2f7d4f;--emb:#a9c9a4;--bg:#f6f8f6;
--card:#fff;font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);line-height:1.45;
-webkit-text-size-adjust:100%}
main{max-width:1120px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:1.6rem;margin:0 0 4px}
h2{font-size:1.1rem;margin:0 0 12px}
.sub{color:var(--muted);margin:0 0 20px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:16px 18px;margin:0 0 18px;break-inside:avoid;page-break-inside:avoid}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;
background:none;border:0;padding:0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .label{display:block;color:var(--muted);font-size:.85rem}
.card .value{display:block;font-size:1.45rem;font-weight:650;margin:2px 0}
.card .note{display:block;color:var(--muted);font-size:.8rem}
.card .equiv{display:block;font-size:.85rem;margin-top:6px}
.card .equiv .factor{display:block;color:var(--muted);font-size:.72rem}
.card.main{border-color:var(--op);box-shadow:inset 4px 0 0 var(--op)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
.legend{display:flex;gap:16px;font-size:.85rem;color:var(--muted);margin:0 0 8px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
.swatch.op{background:var(--op)}.swatch.emb{background:var(--emb)}
.chart{display:block;overflow:visible}
.chart text{font-size:12px;fill:var(--ink)}
.chart .tick{fill:var(--muted);paint-order:stroke;stroke:#fff;stroke-width:3px}
.chart .day-label{fill:var(--muted);font-size:11px}
.chart .grid{stroke:var(--line);stroke-width:1}
.chart .axis{stroke:var(--muted);stroke-width:1}
.chart .operational{fill:var(--op)}.chart .embodied{fill:var(--emb)}
.chart .track{fill:#eef2ef}
.chart .rest .operational{fill:#7f8c84}.chart .rest .embodied{fill:#c9d1cc}
.chart .value{fill:var(--muted);font-size:11px}.chart .value.inside{fill:#fff}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9rem;font-variant-numeric:tabular-nums}
th,td{padding:6px 7px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{font-weight:600;color:var(--muted);border-bottom:2px solid var(--line)}
th.key,td.key{text-align:left}
td.key{white-space:normal;overflow-wrap:break-word;word-break:normal;min-width:7rem;
max-width:24rem}
td.key+td.key{white-space:nowrap;min-width:0}
tfoot td{font-weight:650;border-top:2px solid var(--line);border-bottom:0}
.share{position:relative;min-width:5.5rem}
.share .fill{position:absolute;right:8px;bottom:2px;height:3px;background:var(--op);
opacity:.55;border-radius:2px;max-width:calc(100% - 16px)}
.share span{position:relative;z-index:1}
.empty{color:var(--muted)}
footer{color:var(--muted);font-size:.8rem;margin-top:8px}
@media (max-width:640px){main{padding:14px 10px 28px}h1{font-size:1.3rem}
section{padding:12px}.card .value{font-size:1.2rem}.wide{display:none}
table{font-size:.8rem}th,td{padding:5px 4px}td.key{min-width:0;overflow-wrap:anywhere}
dl{grid-template-columns:1fr}dt{margin-top:6px}}
@media print{:root{--bg:#fff}body{font-size:10pt}main{max-width:none;padding:0}
section,.card{border-color:#bbb;box-shadow:none}
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}
.table-wrap{overflow:visible}tr{break-inside:avoid}thead{display:table-header-group}
table{font-size:7.5pt}th,td{padding:3px 3px}th{white-space:normal}
td.key{min-width:0;overflow-wrap:anywhere}
@page{margin:14mm}}
"""


def _card(ident: str, label: str, value: str, note: str, attrs: str, main: bool = False,
          equivalent: str = "") -> str:
    return (f'<div class="card{" main" if main else ""}" id="{ident}" {attrs}>'
            f'<span class="label">{label}</span><span class="value">{value}</span>'
            f'<span class="note">{note}</span>{equivalent}</div>')


def _equivalent(grams: float, equivalence: Equivalence = PETROL) -> str:
    """The card's everyday equivalence, its factor and source beside it."""
    return (f'<span class="equiv" data-amount="{_num(equivalence.amount(grams))}">'
            f"{html.escape(equivalence.text(grams))}"
            f'<span class="factor">at {html.escape(equivalence.brief)}</span></span>')


def _table(rows: Sequence[tuple[tuple[str, ...], Usage]], total: Usage, by: str,
           columns: Sequence[str], energy: Unit, mass: Unit) -> str:
    total_co2e = _co2e(total)
    has_gpu = total.gpu_joules > 0 or any(u.gpu_joules > 0 for _, u in rows)
    head = "".join(f'<th class="key{" wide" if i else ""}" scope="col">'
                   f'{COLUMN_TITLES.get(c, c.title())}</th>' for i, c in enumerate(columns))
    has_platform = total.platform_joules > 0  # the node beyond its parts (a platform meter)
    components = [("cpu", "CPU"), ("dram", "DRAM")] + ([("gpu", "GPU")] if has_gpu else []) \
        + ([("platform", "Platform")] if has_platform else [])
    head += "".join(f'<th class="wide" scope="col">{name} {energy.symbol}</th>'
                    for _, name in components)
    head += (f'<th scope="col">Energy {energy.symbol}</th>'
             f'<th scope="col">CO2e {mass.symbol}</th>'
             f'<th class="wide" scope="col">Embodied {mass.symbol}</th>'
             f'<th class="wide" scope="col">g/kWh</th><th scope="col">Share</th>')

    def cells(usage: Usage) -> str:
        per_kwh = usage.grams / (usage.joules / JOULES_PER_KWH) if usage.joules > 0 else None
        text = "".join(
            f'<td class="wide">{_fixed(getattr(usage, f"{c}_joules") / energy.per_base)}</td>'
            for c, _ in components)
        share = _percent(_co2e(usage), total_co2e)
        return text + (
            f'<td class="energy">{_fixed(usage.joules / energy.per_base)}</td>'
            f'<td class="grams">{_fixed(usage.grams / mass.per_base)}</td>'
            f'<td class="wide embodied">{_fixed(usage.embodied_grams / mass.per_base)}</td>'
            f'<td class="wide">{"-" if per_kwh is None else _fixed(per_kwh)}</td>'
            f'<td class="share"><div class="fill" style="width:{min(100.0, share) * 0.8:.1f}%">'
            f'</div><span>{share:.1f}\u00a0%</span></td>')

    body = []
    for key, usage in rows:
        keys = "".join(f'<td class="key{" wide" if i else ""}">{_name(k)}</td>'
                       for i, k in enumerate(key))
        body.append(f'<tr data-joules="{_num(usage.joules)}" data-grams="{_num(usage.grams)}" '
                    f'data-embodied-grams="{_num(usage.embodied_grams)}">{keys}'
                    f'{cells(usage)}</tr>')
    if not body:
        span = len(columns) + len(components) + 5
        body.append(f'<tr><td class="key empty" colspan="{span}">No energy recorded in this '
                    "period.</td></tr>")
    lead = '<td class="key">Total</td>' + '<td class="key wide"></td>' * (len(columns) - 1)
    return (f'<div class="table-wrap"><table id="rows" data-by="{html.escape(by)}"><thead><tr>'
            f'{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            f'<tfoot><tr id="total-row">{lead}{cells(total)}</tr></tfoot></table></div>')


def render_html(report_: Report, days: Sequence[DayUsage], zone: tzinfo, info: PageInfo,
                columns: Sequence[str], top_n: int = TOP_N) -> str:
    """The page. `days` covers every day of the period in order, zeros included."""
    total = report_.total
    energy = energy_unit(total.joules)
    mass = mass_unit(max(_co2e(total), max((_co2e(d.usage) for d in days), default=0.0)))
    first, last = _period(report_.since, report_.until, zone)
    title = f"Energy and carbon report: {info.host}, {first} to {last}"
    per_kwh = total.grams / (total.joules / JOULES_PER_KWH) if total.joules > 0 else None
    grid = total.grid_grams_per_kwh
    providers = ", ".join(sorted(total.providers)) or "none recorded"
    embodied_note = "hardware manufacture, amortised"
    if info.embodied_kgco2e > 0 and info.embodied_lifetime_seconds > 0:
        years = info.embodied_lifetime_seconds / (365.25 * 86400)
        embodied_note = f"{_fixed(info.embodied_kgco2e)} kg over {years:.3g} years, amortised"
    cards = "".join([
        _card("total-co2e", "Total CO2e", mass.show(_co2e(total)),
              "operational + embodied",
              f'data-grams="{_num(_co2e(total))}"', main=True,
              equivalent=_equivalent(_co2e(total))),
        _card("total-operational", "Operational CO2e", mass.show(total.grams),
              "electricity, PUE included", f'data-grams="{_num(total.grams)}"',
              equivalent=_equivalent(total.grams)),
        _card("total-embodied", "Embodied CO2e", mass.show(total.embodied_grams),
              html.escape(embodied_note), f'data-grams="{_num(total.embodied_grams)}"',
              equivalent=_equivalent(total.embodied_grams)),
        _card("total-energy", "Energy", energy.show(total.joules),
              f"CPU {energy.show(total.cpu_joules)} \u00b7 DRAM "
              f"{energy.show(total.dram_joules)}"
              + (f" \u00b7 GPU {energy.show(total.gpu_joules)}" if total.gpu_joules else "")
              + (f" \u00b7 platform {energy.show(total.platform_joules)}"
                 if total.platform_joules else ""),
              f'data-joules="{_num(total.joules)}"'),
        _card("intensity", "Grid intensity",
              "-" if grid is None else f"{_fixed(grid)}\u00a0g/kWh",
              "energy-weighted mean" + ("" if per_kwh is None else
                                        f"; {_fixed(per_kwh)} g/kWh with PUE"),
              f'data-grams-per-kwh="{_num(grid) if grid is not None else ""}"'),
    ])
    facts = [
        ("Period", f"{html.escape(first)} \u2013 {html.escape(last)} "
                   f"({html.escape(report_.timezone)}; {len(days)} days)"),
        ("Host", _name(info.host)),
        ("Data", f"{html.escape(report_.source)}: {_name(report_.origin)}"),
    ]
    if info.zone:
        facts.append(("Grid zone", _name(info.zone)
                      + (f' <span class="note">({_name(info.zone_reason)})</span>'
                         if info.zone_reason else "")))
    facts.append(("Intensity sources", _name(providers)))
    facts.append(("Grouped by", html.escape(report_.by)))
    facts.append(("Everyday equivalence", f"CO2 from burning petrol: "
                  f"{html.escape(PETROL.factor)}, {html.escape(PETROL.source)}, "
                  f"{html.escape(PETROL.url)} (tailpipe CO2 only)"))
    fact_html = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    legend = ('<div class="legend"><span><i class="swatch op"></i>operational</span>'
              '<span><i class="swatch emb"></i>embodied</span></div>')
    by = report_.by
    share_section = ""
    if by != "day":
        noun = COLUMN_TITLES.get(by, by).lower()
        share_rows = [(_row_label(row.key, by), row.usage) for row in report_.rows]
        share_section = (f'<section id="chart-share"><h2 id="share-chart-title">CO2e by {noun}'
                         f'{f" (top {top_n} and the rest)" if len(share_rows) > top_n else ""}'
                         f"</h2>{legend}{share_chart(share_rows, mass, top_n)}</section>")
    generated = info.generated or datetime.now(timezone.utc).timestamp()
    return "".join([
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">",
        f'<meta name="generator" content="carbond {html.escape(__version__)}">',
        f"<title>{_name(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>Energy and carbon report</h1><p class=\"sub\">{_name(info.host)} \u00b7 "
        f"{html.escape(first)} \u2013 {html.escape(last)}</p>",
        f'<section class="cards" id="totals">{cards}</section>',
        f'<section id="about"><h2>About these figures</h2><dl>{fact_html}</dl></section>',
        f'<section id="chart-days"><h2 id="day-chart-title">CO2e per day</h2>{legend}'
        f"{day_chart(days, mass)}</section>",
        share_section,
        f'<section id="table"><h2>By {html.escape(COLUMN_TITLES.get(by, by).lower())}</h2>'
        f"{_table([(r.key, r.usage) for r in report_.rows], total, by, columns, energy, mass)}"
        "</section>",
        f"<footer>Generated by carbond {html.escape(__version__)} on "
        f"{html.escape(_iso(generated, zone))}. Operational CO2e is energy \u00d7 PUE \u00d7 "
        "the grid intensity valid when the energy was used; embodied CO2e is the host's "
        "manufacturing footprint spread over its lifetime and shared by use. Shares are of "
        "total CO2e.</footer>",
        "</main></body></html>\n",
    ])
