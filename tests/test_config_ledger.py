"""The configuration keys of issue 12: ledger, embodied, budgets_timezone, quarter budgets."""

from __future__ import annotations

import pytest

from carbond import config
from carbond.carbon.embodied import SECONDS_PER_YEAR
from carbond.types import ConfigError

DESIGN_EXAMPLE = """
embodied: {kgco2e: 1500, lifetime: 4y}
ledger: {flush: 30s, retention: 400d}
budgets_timezone: UTC
budgets:
  - {name: research, match: {kind: job}, period: month, limit: 250kg}
  - {name: team-a, match: {kind: user, consumer: 'alice*'}, period: week, limit: 5kg}
  - {name: q, match: {project: 'climate-*'}, period: quarter, limit: 1t}
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "carbond.yaml"
    path.write_text(text)
    return str(path)


def test_design_example_and_defaults(tmp_path):
    cfg = config.load(write(tmp_path, DESIGN_EXAMPLE), {})
    assert cfg.embodied_kgco2e == 1500
    assert cfg.embodied_lifetime_seconds == 4 * SECONDS_PER_YEAR
    assert cfg.ledger_flush_seconds == 30 and cfg.ledger_retention_seconds == 400 * 86400
    assert cfg.budgets_timezone == "UTC"
    assert [b.period for b in cfg.budgets] == ["month", "week", "quarter"]
    assert cfg.budgets[2].limit_grams == 1_000_000
    assert cfg.budgets[2].match == {"project": "climate-*"}
    default = config.load(None, {})
    assert default.embodied_kgco2e == 0.0 and default.ledger_flush_seconds == 30.0
    assert default.ledger_retention_seconds == 400 * 86400 and default.budgets_timezone == "UTC"


def test_long_durations(tmp_path):
    cfg = config.load(write(tmp_path, "ledger: {retention: 2w, flush: 1m}\n"
                                      "embodied: {kgco2e: 0, lifetime: 1.5y}\n"), {})
    assert cfg.ledger_retention_seconds == 14 * 86400 and cfg.ledger_flush_seconds == 60
    assert cfg.embodied_lifetime_seconds == 1.5 * SECONDS_PER_YEAR


@pytest.mark.parametrize(("text", "key", "words"), [
    ("ledger: {flush: never}\n", "ledger.flush", "cannot parse"),
    ("ledger: {flush: 2h}\n", "ledger.flush", "at most 1h"),
    ("ledger: {flush: 30s, retention: 10m}\n", "ledger.retention", "at least 1h"),
    ("ledger: {retention: 5 fortnights}\n", "ledger.retention", "unknown unit 'fortnights'"),
    ("ledger: {retention: 0y}\n", "ledger.retention", "positive"),
    ("ledger: {keep: 1d}\n", "ledger.keep", "unknown key"),
    ("embodied: {lifetime: 4y}\n", "embodied.kgco2e", "is required"),
    ("embodied: {kgco2e: lots}\n", "embodied.kgco2e", "expected a number"),
    ("embodied: {kgco2e: -5}\n", "embodied.kgco2e", ">= 0"),
    ("embodied: {kgco2e: 5, lifetime: 4 decades}\n", "embodied.lifetime", "unknown unit"),
    ("budgets_timezone: Mars/Olympus_Mons\n", "budgets_timezone", "unknown time zone"),
    ("budgets_timezone: ../../etc/passwd\n", "budgets_timezone", "unknown time zone"),
    ("budgets_timezone: 5\n", "budgets_timezone", "non-empty string"),
    ("budgets: [{name: a, limit: 1g, period: fortnight}]\n", "budgets[0].period", "quarter"),
    ("budgets: [{name: a, limit: 1g}, {name: a, limit: 2g}]\n", "budgets[1].name",
     "duplicate budget name 'a'"),
    ("budgets: [{name: a, limit: 1g, match: {kind: job, project: x}}]\n",
     "budgets[0].match.project", "kind project"),
])
def test_bad_values_name_the_key(tmp_path, text, key, words):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), {})
    assert caught.value.key == key
    assert words in str(caught.value)
