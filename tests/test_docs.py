"""The project documents itself: docs/metrics.md lists exactly what the exporter exports,
docs/configuration.md exactly the keys the configuration accepts, and every relative link in
README.md and docs/ resolves inside the repository (a clone has nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

from carbond.config import key_paths
from carbond.exporter.collectors import snapshot_families
from tests.snapshots import make_snapshot

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `([^`]+)` \|(.*)$")


def table_rows(path: Path) -> dict[str, list[str]]:
    """First-column `name` -> the other cells, for every table row that starts with code."""
    rows = {}
    for line in path.read_text().splitlines():
        found = ROW.match(line)
        if found:
            rows[found[1]] = [cell.strip() for cell in found[2].split("|")]
    return rows


def test_metrics_doc_lists_exactly_the_exported_metrics() -> None:
    documented = table_rows(ROOT / "docs" / "metrics.md")
    exported = {}
    for family in snapshot_families(make_snapshot()):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        exported[name] = (family.type, labels)
    assert set(documented) == set(exported)
    for name, (kind, labels) in exported.items():
        cells = documented[name]
        assert cells[0] == kind, name
        assert set(re.findall(r"`([a-z_]+)`", cells[1])) == labels, name


def test_configuration_doc_lists_exactly_the_accepted_keys() -> None:
    documented = set(table_rows(ROOT / "docs" / "configuration.md"))
    assert documented == set(key_paths())


def test_every_relative_link_resolves_inside_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), (page.name, target)
            assert resolved.exists(), (page.name, target)
