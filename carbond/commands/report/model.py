"""What a report is, whichever source it comes from and however it is rendered."""

from __future__ import annotations

from dataclasses import dataclass, field

from carbond.ledger.ledger import OWNER_GROUPINGS, Usage

# namespace, account, user: by the owner metadata the ledger keeps per consumer (from the
# ledger only; consumers with no such owner make one UNKNOWN_OWNER row)
OWNERS = OWNER_GROUPINGS
GROUPS = ("consumer", "kind", "day", "project", *OWNERS)
FORMATS = ("table", "csv", "json", "html")
KEY_COLUMNS = {"consumer": ("consumer", "kind"), "kind": ("kind",), "day": ("day",),
               "project": ("project",), **{owner: (owner,) for owner in OWNERS}}


@dataclass(frozen=True)
class ReportRow:
    key: tuple[str, ...]  # values of KEY_COLUMNS[by]
    usage: Usage


@dataclass
class Report:
    since: float
    until: float
    by: str
    timezone: str
    source: str  # "ledger" or "prometheus"
    origin: str  # the ledger file or the Prometheus URL
    rows: list[ReportRow] = field(default_factory=list)

    @property
    def total(self) -> Usage:
        total = Usage()
        for row in self.rows:
            total.add(row.usage)
        return total



@dataclass(frozen=True)
class PageInfo:
    """What the page says besides the figures: where they come from."""

    host: str
    zone: str | None = None  # the configured or resolved intensity zone; None for a fleet
    zone_reason: str | None = None
    generated: float = 0.0  # epoch seconds
    embodied_kgco2e: float = 0.0  # the configured embodied figure (0: none)
    embodied_lifetime_seconds: float = 0.0


@dataclass(frozen=True)
class DayUsage:
    day: str  # ISO date in the report's time zone
    usage: Usage
