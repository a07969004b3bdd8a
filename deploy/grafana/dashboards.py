"""carbond's Grafana dashboards as code: `make dashboards` writes deploy/grafana/*.json.

Built with grafana-foundation-sdk (Grafana 10.1 schema; Grafana 10 and later import it). The
JSON files are committed so operators need none of this; tests/test_deploy_grafana.py checks
they equal what this script produces and that every query returns data from a real
Prometheus scraping two carbond instances.

Every dashboard takes its data source from the `datasource` variable and filters by `zone`
(which narrows `instance`) and `instance`; consumer panels also by `kind`. The Fleet dashboard
reads the recording rules of deploy/prometheus/recording.yml for its zone and kind panels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["carbond", "energy", "carbon"]

# Units (Grafana unit ids; "suffix:" makes a custom one).
WATTS = "watt"
KWH = "kwatth"
GRAMS = "massg"
KG = "masskg"
GRAMS_PER_HOUR = "suffix: g/h"
GRAMS_PER_KWH = "suffix: g/kWh"
SECONDS = "s"

# The measured parts, cpu + dram + gpu: psys (component "platform") overlaps cpu + dram.
HOST = 'component!="platform"'
# A whole-node meter: where one measured, it is the host total and the parts are inside it.
PLATFORM_METER = 'component="platform", source=~"acpi|ipmi|redfish"'
PERCENT = "percentunit"


RANGE, RATE = "increase({}[$__range])", "rate({}[$__rate_interval])"
BY_COMPONENT = ("What the consumers were attributed, which sums to the host total: cpu, "
                "dram, gpu as measured and, where a platform meter works, platform for the "
                "rest of the node.")


def host_total(metric: str, selector: str, wrap: str = "{}") -> str:
    """Per host (instance, job): the platform meter's figure where it measured (> 0), else the
    parts, as carbond counts them and as deploy/prometheus/recording.yml records them.
    `wrap` puts a range function around each selector, e.g. "rate({}[5m])"."""
    platform = wrap.format(f"{metric}{{{selector}, {PLATFORM_METER}}}")
    parts = wrap.format(f"{metric}{{{selector}, {HOST}}}")
    return f"(sum by (instance, job) ({platform}) > 0) or sum by (instance, job) ({parts})"


class Layout:
    """Panel ids and query refIds, so the JSON is stable and every target is addressable."""

    def __init__(self) -> None:
        self.next_id = 1

    def take(self) -> int:
        panel_id, self.next_id = self.next_id, self.next_id + 1
        return panel_id


def query(expr: str, legend: str = "", *, instant: bool = False,
          fmt: PromQueryFormat | None = None) -> prometheus.Dataquery:
    target = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    if instant:
        target = target.instant()
    if fmt is not None:
        target = target.format(fmt)
    return target


def _targets(panel: Any, targets: list[prometheus.Dataquery]) -> Any:
    for index, target in enumerate(targets):
        panel = panel.with_target(target.ref_id(chr(ord("A") + index)))
    return panel


def series(layout: Layout, title: str, unit: str, targets: list[prometheus.Dataquery], *,
           description: str = "", stacked: bool = False, bars: bool = False,
           width: int = 12, height: int = 8, interval: str = "") -> timeseries.Panel:
    panel = (
        timeseries.Panel().id(layout.take()).title(title).description(description)
        .datasource(DATASOURCE).unit(unit).span(width).height(height)
        .fill_opacity(60 if bars else (25 if stacked else 10)).line_width(1)
        .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM).show_legend(True))
    )
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL))
    if bars:
        panel = panel.draw_style(GraphDrawStyle.BARS)
    if interval:
        panel = panel.interval(interval)
    return _targets(panel, targets)


def single(layout: Layout, title: str, unit: str, targets: list[prometheus.Dataquery], *,
           description: str = "", width: int = 4, height: int = 4, decimals: int | None = None,
           text_mode: BigValueTextMode = BigValueTextMode.AUTO,
           mappings: list[Any] | None = None, thresholds: list[Threshold] | None = None,
           ) -> stat.Panel:
    panel = (
        stat.Panel().id(layout.take()).title(title).description(description)
        .datasource(DATASOURCE).unit(unit).span(width).height(height)
        .graph_mode(BigValueGraphMode.NONE).color_mode(BigValueColorMode.VALUE)
        .text_mode(text_mode)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    if mappings:
        panel = panel.mappings(mappings)
    if thresholds:
        panel = panel.thresholds(
            dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(thresholds))
    return _targets(panel, targets)


def bars(layout: Layout, title: str, unit: str, targets: list[prometheus.Dataquery], *,
         description: str = "", width: int = 12, height: int = 8, maximum: float | None = None,
         thresholds: list[Threshold] | None = None) -> bargauge.Panel:
    panel = (
        bargauge.Panel().id(layout.take()).title(title).description(description)
        .datasource(DATASOURCE).unit(unit).span(width).height(height)
        .orientation(VizOrientation.HORIZONTAL).display_mode(BarGaugeDisplayMode.GRADIENT)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .min(0)
    )
    if maximum is not None:
        panel = panel.max(maximum)
    if thresholds:
        panel = panel.thresholds(
            dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(thresholds))
    return _targets(panel, targets)


def grid(layout: Layout, title: str, targets: list[prometheus.Dataquery],
         rename: dict[str, str], *, description: str = "", width: int = 24,
         height: int = 8, unit: str = "") -> table.Panel:
    """A table of instant queries merged on their labels; `rename` picks and names columns."""
    panel = (
        table.Panel().id(layout.take()).title(title).description(description)
        .datasource(DATASOURCE).span(width).height(height).show_header(True)
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True},
            "indexByName": {name: index for index, name in enumerate(rename)},
            "renameByName": rename,
        }))
    )
    if unit:
        panel = panel.unit(unit)
    return _targets(panel, [t.instant().format(PromQueryFormat.TABLE) for t in targets])


def row(layout: Layout, title: str) -> dashboard.Row:
    return dashboard.Row(title).id(layout.take())


# ---- variables ----------------------------------------------------------------------------


def datasource_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def query_variable(name: str, label: str, definition: str, *, multi: bool = True,
                   all_value: str | None = ".*") -> dashboard.QueryVariable:
    variable = (
        dashboard.QueryVariable(name).label(label).datasource(DATASOURCE)
        .query({"query": definition, "refId": f"{name}-variable"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        .multi(multi).include_all(multi)
    )
    if multi and all_value is not None:
        variable = variable.all_value(all_value)
    return variable


def zone_variable() -> dashboard.QueryVariable:
    return query_variable("zone", "Zone",
                          "label_values(carbond_grid_intensity_grams_per_kwh, zone)")


def instance_variable(*, multi: bool = True) -> dashboard.QueryVariable:
    # No custom "All" value: All expands to the instances of the chosen zones.
    return query_variable(
        "instance", "Instance",
        'label_values(carbond_grid_intensity_grams_per_kwh{zone=~"$zone"}, instance)',
        multi=multi, all_value=None)


def kind_variable(instance_matcher: str) -> dashboard.QueryVariable:
    return query_variable(
        "kind", "Consumer kind",
        f"label_values(carbond_consumer_energy_joules_total{{{instance_matcher}}}, kind)")


def base(title: str, uid: str, description: str, time_from: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title).uid(uid).description(description).tags(TAGS)
        .editable().tooltip(DashboardCursorSync.CROSSHAIR).refresh("1m")
        .time(time_from, "now").timezone("browser")
        .with_variable(datasource_variable())
        .with_variable(zone_variable())
    )


# ---- dashboards ---------------------------------------------------------------------------


def fleet() -> dashboard.Dashboard:
    lay = Layout()
    inst = 'instance=~"$instance"'
    d = (
        base("carbond / Fleet", "carbond-fleet",
             "Power, energy and CO2e of every host running carbond; zones and consumer kinds "
             "from the recording rules in deploy/prometheus/recording.yml.", "now-24h")
        .with_variable(instance_variable())
        .with_variable(kind_variable(inst))
        .with_row(row(lay, "Fleet now"))
        .with_panel(single(lay, "Power", WATTS, [query(
            f"sum({host_total('carbond_host_power_watts', inst)})")],
            description="Mean over each host's last tick: its platform meter where one "
                        "measures the whole node, else cpu + dram + gpu (psys excluded, it "
                        "overlaps cpu + dram)."))
        .with_panel(single(lay, "CO2e rate", GRAMS_PER_HOUR, [query(
            f"sum(rate(carbond_host_emissions_grams_total{{{inst}}}[$__rate_interval])) * 3600")]))
        .with_panel(single(lay, "Energy in range", KWH, [query(
            f"sum({host_total('carbond_host_energy_joules_total', inst, RANGE)}) / 3.6e6",
            instant=True)]))
        .with_panel(single(lay, "CO2e in range", KG, [query(
            f"sum(increase(carbond_host_emissions_grams_total{{{inst}}}[$__range])) / 1000",
            instant=True)]))
        .with_panel(single(lay, "Effective intensity", GRAMS_PER_KWH, [query(
            f"sum(rate(carbond_host_emissions_grams_total{{{inst}}}[$__rate_interval])) / "
            f"(sum({host_total('carbond_host_energy_joules_total', inst, RATE)}) / 3.6e6)")],
            description="CO2e per kWh the fleet actually drew, PUE included."))
        .with_panel(single(lay, "Hosts", "none", [query(
            f"count(carbond_build_info{{{inst}}})")]))
        .with_row(row(lay, "Power, energy and emissions"))
        .with_panel(series(lay, "Power by zone", WATTS, [query(
            'zone:carbond_host_power_watts:sum{zone=~"$zone"}', "{{zone}}")], stacked=True))
        .with_panel(series(lay, "CO2e rate by zone", GRAMS_PER_HOUR, [query(
            'zone:carbond_host_emissions_grams:rate5m{zone=~"$zone"} * 3600', "{{zone}}")],
            stacked=True))
        .with_panel(series(lay, "Energy per interval", KWH, [query(
            f"sum by (component) (increase(carbond_consumer_energy_joules_total{{{inst}}}"
            "[$__interval])) / 3.6e6", "{{component}}")], stacked=True, bars=True,
            interval="1h", description=BY_COMPONENT))
        .with_panel(series(lay, "Grid intensity by zone", GRAMS_PER_KWH, [query(
            f'max by (zone, provider) (carbond_grid_intensity_grams_per_kwh{{zone=~"$zone", '
            f"{inst}}})", "{{zone}} ({{provider}})")]))
        .with_panel(series(lay, "Power by consumer kind", WATTS, [query(
            'kind:carbond_consumer_power_watts:sum{kind=~"$kind"}', "{{kind}}")],
            stacked=True))
        .with_panel(series(lay, "Power by component", WATTS, [query(
            f"sum by (component) (carbond_consumer_power_watts{{{inst}}})",
            "{{component}}")], stacked=True, description=BY_COMPONENT))
        .with_row(row(lay, "Top hosts and consumers"))
        .with_panel(bars(lay, "Top hosts by power", WATTS, [query(
            f"topk(10, sum by (instance) ({host_total('carbond_host_power_watts', inst)}))",
            "{{instance}}", instant=True)]))
        .with_panel(bars(lay, "Top hosts by CO2e in range", KG, [query(
            f"topk(10, sum by (instance) (increase(carbond_host_emissions_grams_total{{{inst}}}"
            "[$__range]))) / 1000", "{{instance}}", instant=True)]))
        .with_panel(bars(lay, "Top consumers by power", WATTS, [query(
            f'topk(10, sum by (consumer, kind) (carbond_consumer_power_watts{{{inst}, '
            'kind=~"$kind", kind!="idle"}))', "{{consumer}} ({{kind}})", instant=True)],
            description="Summed over hosts: a job or project on several hosts is one bar."))
        .with_panel(bars(lay, "Top consumers by CO2e in range", GRAMS, [query(
            f'topk(10, sum by (consumer, kind) (increase(carbond_consumer_emissions_grams_total'
            f'{{{inst}, kind=~"$kind", kind!="idle"}}[$__range])))', "{{consumer}} ({{kind}})",
            instant=True)]))
        .with_panel(bars(lay, "Hosts by carbond version", "none", [query(
            f"count by (version) (carbond_build_info{{{inst}}})", "{{version}}",
            instant=True)], width=24, height=5))
    )
    return d


def host() -> dashboard.Dashboard:
    lay = Layout()
    inst = 'instance=~"$instance"'
    up_mapping = ValueMap({"0": ValueMappingResult(text="down", color="red", index=0),
                           "1": ValueMappingResult(text="up", color="green", index=1)})
    d = (
        base("carbond / Host", "carbond-host",
             "One host: power by component and device, who used it, GPUs, grid intensity, "
             "meter health and carbond's own cost.", "now-6h")
        .with_variable(instance_variable(multi=False))
        .with_variable(kind_variable(inst))
        .with_row(row(lay, "Now"))
        .with_panel(single(lay, "Power", WATTS, [query(
            f"sum({host_total('carbond_host_power_watts', inst)})")]))
        .with_panel(single(lay, "CO2e rate", GRAMS_PER_HOUR, [query(
            f"sum(rate(carbond_host_emissions_grams_total{{{inst}}}[$__rate_interval])) * 3600")]))
        .with_panel(single(lay, "Grid intensity", GRAMS_PER_KWH, [query(
            f"carbond_grid_intensity_grams_per_kwh{{{inst}}}", "{{zone}} via {{provider}}")],
            text_mode=BigValueTextMode.VALUE_AND_NAME))
        .with_panel(single(lay, "PUE", "none", [query(f"carbond_pue_ratio{{{inst}}}")],
                           decimals=2))
        .with_panel(single(lay, "Last tick", SECONDS, [query(
            f"time() - carbond_last_tick_timestamp_seconds{{{inst}}}")],
            description="Seconds since the last successful tick.",
            thresholds=[Threshold(None, "green"), Threshold(60, "orange"),
                        Threshold(300, "red")]))
        .with_panel(single(lay, "Version", "none", [query(
            f"carbond_build_info{{{inst}}}", "{{version}}")], text_mode=BigValueTextMode.NAME))
        .with_row(row(lay, "Power"))
        .with_panel(series(lay, "Power by component and device", WATTS, [query(
            f"carbond_host_power_watts{{{inst}}}", "{{component}} {{device}} ({{source}})")],
            description="psys (component platform, source rapl) covers package + DRAM + "
                        "platform: it overlaps the others and is not part of the host total. "
                        "A platform meter (source acpi, ipmi or redfish) is the whole node: "
                        "the others are inside it, and it is the host total."))
        .with_panel(series(lay, "Energy per interval", KWH, [query(
            f"sum by (component) (increase(carbond_consumer_energy_joules_total{{{inst}}}"
            "[$__interval])) / 3.6e6", "{{component}}")], stacked=True, bars=True,
            interval="5m", description=BY_COMPONENT))
        .with_panel(series(lay, "Coverage: measured parts / platform", PERCENT, [query(
            f"carbond_host_coverage_ratio{{{inst}}}", "coverage")], width=24, height=6,
            description="cpu + dram + gpu as measured, over the platform meter's reading, "
                        "where a platform meter works (docs/attribution.md). It moves with "
                        "load; a step down is a part meter lost, above 100 % the platform "
                        "meter reads low. The rest is component platform of the consumers."))
        .with_row(row(lay, "Consumers"))
        .with_panel(series(lay, "Power by consumer", WATTS, [query(
            f'topk(15, sum by (consumer, kind) (carbond_consumer_power_watts{{{inst}, '
            'kind=~"$kind"}))', "{{consumer}} ({{kind}})")], stacked=True))
        .with_panel(series(lay, "Power by kind and component", WATTS, [query(
            f'sum by (kind, component) (carbond_consumer_power_watts{{{inst}, kind=~"$kind"}})',
            "{{kind}} {{component}}")], stacked=True))
        .with_panel(series(lay, "CO2e rate by consumer", GRAMS_PER_HOUR, [query(
            f'topk(15, sum by (consumer, kind) (rate(carbond_consumer_emissions_grams_total'
            f'{{{inst}, kind=~"$kind"}}[$__rate_interval]))) * 3600', "{{consumer}} ({{kind}})")],
            stacked=True, width=24))
        .with_panel(grid(lay, "Consumers in range", [
            query(f'sum by (consumer, kind) (increase(carbond_consumer_energy_joules_total'
                  f'{{{inst}, kind=~"$kind"}}[$__range])) / 3.6e6'),
            query(f'sum by (consumer, kind) (increase(carbond_consumer_emissions_grams_total'
                  f'{{{inst}, kind=~"$kind"}}[$__range]))'),
            query(f'sum by (consumer, kind) (increase(carbond_consumer_embodied_grams_total'
                  f'{{{inst}, kind=~"$kind"}}[$__range]))'),
        ], {"consumer": "Consumer", "kind": "Kind", "Value #A": "Energy (kWh)",
            "Value #B": "CO2e (g)", "Value #C": "Embodied CO2e (g)"},
            description="Embodied CO2e appears where `embodied` is configured."))
        .with_row(row(lay, "GPUs"))
        .with_panel(series(lay, "GPU power", WATTS, [query(
            f'carbond_host_power_watts{{{inst}, component="gpu"}} * on (instance, job, device) '
            f"group_left (name) carbond_gpu_info{{{inst}}}", "{{device}} {{name}}")]))
        .with_panel(series(lay, "GPU power by consumer", WATTS, [query(
            f'topk(10, sum by (consumer, kind) (carbond_consumer_power_watts{{{inst}, '
            'component="gpu"}))', "{{consumer}} ({{kind}})")], stacked=True))
        .with_panel(grid(lay, "GPUs", [query(f"carbond_gpu_info{{{inst}}}")],
                         {"device": "Device", "name": "Model", "uuid": "UUID"}, height=5))
        .with_row(row(lay, "Grid intensity"))
        .with_panel(series(lay, "Grid intensity and provider", GRAMS_PER_KWH, [query(
            f"carbond_grid_intensity_grams_per_kwh{{{inst}}}", "{{zone}} via {{provider}}")],
            width=8))
        .with_panel(series(lay, "Intensity age", SECONDS, [query(
            f"carbond_grid_intensity_age_seconds{{{inst}}}", "{{provider}}")], width=8))
        .with_panel(series(lay, "Intensity fetch errors", "none", [query(
            f"sum by (provider) (increase(carbond_intensity_fetch_errors_total{{{inst}}}"
            "[$__rate_interval]))", "{{provider}}")], bars=True, width=8))
        .with_row(row(lay, "Meters and ticks"))
        .with_panel(single(lay, "Meters", "none", [query(
            f"carbond_meter_up{{{inst}}}", "{{meter}}")], mappings=[up_mapping], width=8, height=8,
            text_mode=BigValueTextMode.VALUE_AND_NAME,
            description="nvml is down on hosts without NVIDIA GPUs; model is up only while "
                        "it stands in for a missing hardware counter."))
        .with_panel(series(lay, "Meter errors", "none", [query(
            f"sum by (meter) (increase(carbond_meter_errors_total{{{inst}}}[$__rate_interval]))",
            "{{meter}}")], bars=True, width=8))
        .with_panel(series(lay, "Counter wraps and resets", "none", [query(
            "sum by (device, event) ("
            f'label_replace(increase(carbond_counter_wraps_total{{{inst}}}[$__rate_interval]), '
            '"event", "wrap", "", "") or '
            f'label_replace(increase(carbond_counter_resets_total{{{inst}}}[$__rate_interval]), '
            '"event", "reset", "", ""))', "{{device}} {{event}}")], bars=True, width=8,
            description="Wraps are expected (RAPL wraps every few minutes under load); a "
                        "reset is a counter that went backwards (driver reload)."))
        .with_panel(series(lay, "Tick duration", SECONDS, [
            query("histogram_quantile(0.99, sum by (le) (rate(carbond_tick_duration_seconds_"
                  f"bucket{{{inst}}}[$__rate_interval])))", "p99"),
            query("histogram_quantile(0.5, sum by (le) (rate(carbond_tick_duration_seconds_"
                  f"bucket{{{inst}}}[$__rate_interval])))", "p50"),
            query(f"rate(carbond_tick_duration_seconds_sum{{{inst}}}[$__rate_interval]) / "
                  f"rate(carbond_tick_duration_seconds_count{{{inst}}}[$__rate_interval])",
                  "mean"),
        ], width=8))
        .with_panel(series(lay, "Failures", "none", [
            query(f"increase(carbond_tick_failures_total{{{inst}}}[$__rate_interval])",
                  "failed ticks"),
            query(f"increase(carbond_ledger_errors_total{{{inst}}}[$__rate_interval])",
                  "ledger errors"),
            query(f"increase(carbond_exit_records_lost_total{{{inst}}}[$__rate_interval])",
                  "exit records lost"),
            query(f"sum by (source) (increase(carbond_metadata_errors_total{{{inst}}}"
                  "[$__rate_interval]))", "metadata {{source}}"),
        ], bars=True, width=8, description="Metadata errors: a source of names (CRI, kubelet, "
                                           "Docker, Podman, Slurm) that failed; ID names stand."))
        .with_panel(series(lay, "Exited tasks", "short", [query(
            f"rate(carbond_exited_tasks_total{{{inst}}}[$__rate_interval])", "exits/s")],
            width=8, description="Tasks whose final CPU time came from taskstats exit "
                                 "records."))
        .with_row(row(lay, "carbond itself"))
        .with_panel(series(lay, "CPU", "percentunit", [query(
            f"rate(process_cpu_seconds_total{{{inst}}}[$__rate_interval])", "CPU (cores)")],
            width=8))
        .with_panel(series(lay, "Memory", "bytes", [query(
            f"process_resident_memory_bytes{{{inst}}}", "resident")], width=8))
        .with_panel(series(lay, "Open files", "short", [query(
            f"process_open_fds{{{inst}}}", "open")], width=8))
    )
    return d


def budgets() -> dashboard.Dashboard:
    lay = Layout()
    sel = 'instance=~"$instance", budget=~"$budget"'
    share = [Threshold(None, "green"), Threshold(0.8, "orange"), Threshold(1, "red")]
    d = (
        base("carbond / Budgets", "carbond-budgets",
             "Emission budgets (carbond.yaml `budgets`): CO2e used in the current period, "
             "its limit, the projection to the period's end and the burn rate.", "now-7d")
        .with_variable(instance_variable())
        .with_variable(query_variable(
            "budget", "Budget",
            'label_values(carbond_budget_limit_grams{instance=~"$instance"}, budget)'))
        .with_row(row(lay, "Now"))
        .with_panel(bars(lay, "Used, share of limit", "percentunit", [query(
            f"max by (instance, budget) (carbond_budget_used_grams{{{sel}}}) / "
            f"max by (instance, budget) (carbond_budget_limit_grams{{{sel}}})",
            "{{budget}} on {{instance}}", instant=True)], maximum=1.5, thresholds=share))
        .with_panel(bars(lay, "Projected at period end, share of limit", "percentunit", [query(
            f"max by (instance, budget) (carbond_budget_projected_grams{{{sel}}}) / "
            f"max by (instance, budget) (carbond_budget_limit_grams{{{sel}}})",
            "{{budget}} on {{instance}}", instant=True)], maximum=1.5, thresholds=share))
        .with_panel(grid(lay, "Budgets", [
            query(f"carbond_budget_used_grams{{{sel}}} / 1000"),
            query(f"carbond_budget_limit_grams{{{sel}}} / 1000"),
            query(f"carbond_budget_projected_grams{{{sel}}} / 1000"),
        ], {"budget": "Budget", "instance": "Instance", "Value #A": "Used (kg)",
            "Value #B": "Limit (kg)", "Value #C": "Projected (kg)"}))
        .with_row(row(lay, "Over time"))
        .with_panel(series(lay, "Used, limit and projection", GRAMS, [
            query(f"carbond_budget_used_grams{{{sel}}}", "{{budget}} used ({{instance}})"),
            query(f"carbond_budget_limit_grams{{{sel}}}", "{{budget}} limit ({{instance}})"),
            query(f"carbond_budget_projected_grams{{{sel}}}",
                  "{{budget}} projected ({{instance}})"),
        ]))
        .with_panel(series(lay, "Burn rate", GRAMS_PER_HOUR, [query(
            f"clamp_min(deriv(carbond_budget_used_grams{{{sel}}}[1h]), 0) * 3600",
            "{{budget}} ({{instance}})")],
            description="How fast each budget is being used, over the last hour."))
    )
    return d


def by_owner(label: str, metric: str, selector: str, window: str) -> str:
    """`metric`'s increase over `window` summed by an owner label of carbond_consumer_info
    (namespace, account), joined with group_left on the consumer. The info of every consumer
    seen in the window counts (max_over_time), also one that has ended since; an ID series
    and its named successor carry the same owner only once named, so nothing is counted
    twice (docs/attribution.md)."""
    owners = (f"max by (instance, kind, consumer, {label}) (max_over_time("
              f'carbond_consumer_info{{{selector}, {label}=~"${label}", {label}!=""}}[{window}]))')
    return (f"sum by ({label}) (increase({metric}{{{selector}}}[{window}]) "
            f"* on (instance, kind, consumer) group_left ({label}) {owners})")


def owner_panels(d: dashboard.Dashboard, lay: Layout, label: str, title: str,
                 inst: str) -> dashboard.Dashboard:
    """A row of energy and CO2e per owner: a table and bars over the range, and a series."""
    energy, grams = "carbond_consumer_energy_joules_total", "carbond_consumer_emissions_grams_total"
    legend = "{{" + label + "}}"
    return (
        d.with_row(row(lay, f"{title}s"))
        .with_panel(grid(lay, f"{title}s in range", [
            query(f"{by_owner(label, energy, inst, '$__range')} / 3.6e6"),
            query(f"{by_owner(label, grams, inst, '$__range')} / 1000"),
        ], {label: title, "Value #A": "Energy (kWh)", "Value #B": "CO2e (kg)"}, width=12))
        .with_panel(bars(lay, f"CO2e per {label} in range", GRAMS, [query(
            f"sort_desc({by_owner(label, grams, inst, '$__range')})", legend, instant=True)]))
        .with_panel(series(lay, f"CO2e per {label} per interval", GRAMS, [query(
            by_owner(label, grams, inst, "$__interval"), legend)], stacked=True, bars=True,
            interval="1h", width=24))
    )


def projects() -> dashboard.Dashboard:
    lay = Layout()
    inst = 'instance=~"$instance"'
    proj = f'{inst}, kind="project", consumer=~"$project"'
    kind = f'{inst}, kind=~"$kind"'
    d = (
        base("carbond / Projects", "carbond-projects",
             "Energy and CO2e per project (`carbond exec --project`), per Kubernetes "
             "namespace and Slurm account (carbond_consumer_info) and per consumer kind "
             "over the chosen time range, from the counters.", "now-30d")
        .with_variable(instance_variable())
        .with_variable(kind_variable(inst))
        .with_variable(query_variable(
            "project", "Project",
            f'label_values(carbond_consumer_energy_joules_total{{{inst}, kind="project"}}, '
            "consumer)"))
        .with_variable(query_variable(
            "namespace", "Namespace",
            f'label_values(carbond_consumer_info{{{inst}, namespace!=""}}, namespace)'))
        .with_variable(query_variable(
            "account", "Account",
            f'label_values(carbond_consumer_info{{{inst}, account!=""}}, account)'))
        .with_row(row(lay, "Projects"))
        .with_panel(grid(lay, "Projects in range", [
            query(f"sum by (consumer) (increase(carbond_consumer_energy_joules_total{{{proj}}}"
                  "[$__range])) / 3.6e6"),
            query(f"sum by (consumer) (increase(carbond_consumer_emissions_grams_total"
                  f"{{{proj}}}[$__range])) / 1000"),
            query(f"sum by (consumer) (increase(carbond_consumer_embodied_grams_total"
                  f"{{{proj}}}[$__range])) / 1000"),
        ], {"consumer": "Project", "Value #A": "Energy (kWh)", "Value #B": "CO2e (kg)",
            "Value #C": "Embodied CO2e (kg)"}, width=12))
        .with_panel(bars(lay, "CO2e per project in range", GRAMS, [query(
            f"sort_desc(sum by (consumer) (increase(carbond_consumer_emissions_grams_total"
            f"{{{proj}}}[$__range])))", "{{consumer}}", instant=True)]))
        .with_panel(series(lay, "CO2e per project per interval", GRAMS, [query(
            f"sum by (consumer) (increase(carbond_consumer_emissions_grams_total{{{proj}}}"
            "[$__interval]))", "{{consumer}}")], stacked=True, bars=True, interval="1h",
            width=24))
        .with_row(row(lay, "Consumer kinds"))
        .with_panel(bars(lay, "Energy per kind in range", KWH, [query(
            f"sort_desc(sum by (kind) (increase(carbond_consumer_energy_joules_total{{{kind}}}"
            "[$__range]))) / 3.6e6", "{{kind}}", instant=True)], width=8))
        .with_panel(bars(lay, "CO2e per kind in range", KG, [query(
            f"sort_desc(sum by (kind) (increase(carbond_consumer_emissions_grams_total"
            f"{{{kind}}}[$__range]))) / 1000", "{{kind}}", instant=True)], width=8))
        .with_panel(bars(lay, "Embodied CO2e per kind in range", KG, [query(
            f"sort_desc(sum by (kind) (increase(carbond_consumer_embodied_grams_total"
            f"{{{kind}}}[$__range]))) / 1000", "{{kind}}", instant=True)], width=8))
    )
    d = owner_panels(d, lay, "namespace", "Namespace", inst)
    return owner_panels(d, lay, "account", "Account", inst)


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "carbond-fleet.json": fleet,
    "carbond-host.json": host,
    "carbond-budgets.json": budgets,
    "carbond-projects.json": projects,
}


def render(build: Callable[[], dashboard.Dashboard]) -> str:
    """The committed form: sorted keys, two-space indent, a final newline."""
    doc = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    # Grafana iterates annotations.list when it loads a dashboard; the SDK leaves it out.
    doc.setdefault("annotations", {}).setdefault("list", [])
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a committed file differs from what this produces")
    parser.add_argument("--out", type=Path, default=HERE, help="directory (default: here)")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; run `make dashboards`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
