"""Prometheus /metrics: the status snapshot's figures as gauges (the same for every
process: they are merged from the database) and this process's own ingest counter
and latency histogram (prometheus_client; scrape each process to sum them).
Exposition by prometheus_client's generate_latest, never hand-written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import components
from .monitor import StatusMonitor


class SnapshotCollector(Collector):
    def __init__(self, monitor: StatusMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.monitor.snapshot
        state = GaugeMetricFamily(
            "opensense_component_state",
            "1 for the component's current state (operational, degraded, outage, unknown)",
            labels=["component", "state"],
        )
        up = GaugeMetricFamily(
            "opensense_component_uptime_ratio",
            "Share of the last 90 days' samples in which the component was up",
            labels=["component"],
        )
        for c in s.public.get("components", []):
            for st in components.STATES:
                state.add_metric([c["id"], st], 1.0 if c["state"] == st else 0.0)
            if c["uptime_90d"] is not None:
                up.add_metric([c["id"]], c["uptime_90d"])
        yield state
        yield up

        f = s.figures
        ing = f.get("ingest") or {}
        g = GaugeMetricFamily(
            "opensense_ingest_5xx_ratio_2m", "Share of 5xx ingest answers, all processes, 2 min"
        )
        n = ing.get("requests_2m", 0)
        g.add_metric([], (ing.get("errors_5xx_2m", 0) / n) if n else 0.0)
        yield g
        g = GaugeMetricFamily(
            "opensense_ingest_slow_ratio_5m",
            "Share of ingest answers over 2 s, all processes, 5 min",
        )
        g.add_metric([], ing.get("slow_share_5m", 0.0))
        yield g
        g = GaugeMetricFamily(
            "opensense_ingest_p99_bound_seconds_5m",
            "Upper bound of the histogram bucket holding the 5-minute ingest p99, all processes",
        )
        if ing.get("p99_bound_5m_s") is not None:
            g.add_metric([], ing["p99_bound_5m_s"])
        yield g

        g = GaugeMetricFamily(
            "opensense_lorawan_tray_filed_24h",
            "LoRaWAN uplinks put in the tray in the last 24 h, all accounts, per state",
            labels=["state"],
        )
        for st, n in ((f.get("lorawan") or {}).get("filed_24h") or {}).items():
            g.add_metric([st], float(n))
        yield g

        disp = GaugeMetricFamily(
            "opensense_dispatch_failed_ratio_5m",
            "Failed share of delivery attempts in 5 min, per path",
            labels=["path"],
        )
        for path, d in (f.get("dispatch") or {}).items():
            if d and d["attempts_5m"]:
                disp.add_metric([path], d["failed_5m"] / d["attempts_5m"])
        yield disp

        b = f.get("backups") or {}
        g = GaugeMetricFamily(
            "opensense_backup_last_good_age_seconds", "Age of the last good backup"
        )
        if b.get("last_good_age_s") is not None:
            g.add_metric([], b["last_good_age_s"])
        yield g
        r = f.get("reports") or {}
        g = GaugeMetricFamily(
            "opensense_report_monthly_slowest_seconds",
            "Slowest monthly report render (or wait) in the last hour",
        )
        if r.get("slowest_monthly_s") is not None:
            g.add_metric([], r["slowest_monthly_s"])
        yield g

        gw = GaugeMetricFamily("opensense_gateways", "Site gateways by state", labels=["state"])
        counts = {st: 0 for st in components.STATES}
        for x in f.get("gateways") or []:
            counts[x["state"]] += 1
        for st, n in counts.items():
            gw.add_metric([st], n)
        yield gw

        p = f.get("processes") or {}
        g = GaugeMetricFamily("opensense_server_processes", "Live server processes (heartbeats)")
        g.add_metric([], p.get("alive", 0))
        yield g

        inc = GaugeMetricFamily(
            "opensense_incidents_open", "Open incidents by class", labels=["class"]
        )
        overdue = GaugeMetricFamily(
            "opensense_incidents_overdue",
            "Open incidents whose acknowledgement or update is overdue, by class",
            labels=["class"],
        )
        oc = {k: 0 for k in ("P0", "P1", "P2")}
        od = dict(oc)
        now = s.at
        for row, ups in s.incidents:
            if row["resolved_at"] is None:
                oc[row["class"]] += 1
                if now is not None:
                    view = self.monitor_due(row, ups)
                    if view:
                        od[row["class"]] += 1
        for k in oc:
            inc.add_metric([k], oc[k])
            overdue.add_metric([k], od[k])
        yield inc
        yield overdue

        firing = GaugeMetricFamily(
            "opensense_condition_firing",
            "1 while a self-watching condition holds",
            labels=["condition", "class"],
        )
        for fire in s.firing:
            firing.add_metric([fire.ident, fire.condition.klass], 1.0)
        yield firing

        g = GaugeMetricFamily("opensense_status_snapshot_age_seconds", "Age of the status snapshot")
        if s.at is not None:
            g.add_metric([], max(0.0, (self.monitor.cfg.clock() - s.at).total_seconds()))
        yield g
        g = GaugeMetricFamily("opensense_status_stale", "1 when the last refresh failed")
        g.add_metric([], 1.0 if s.stale else 0.0)
        yield g

    def monitor_due(self, row: dict[str, Any], ups: list[dict[str, Any]]) -> bool:
        from .incidents import present

        now = self.monitor.cfg.clock()
        due = present(row, ups, self.monitor.tz, now)["next_due"]
        return bool(due and due["overdue"])


def exposition(monitor: StatusMonitor) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(monitor))
    return generate_latest(reg) + generate_latest(monitor.observer.registry)
