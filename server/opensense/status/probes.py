"""Figures the status monitor measures at each tick, from the database: what every
process reported (heartbeats, health, ingest minutes) and the tables other features
keep (outbound_log, backup_runs, gateways, reports). Tables another feature owns may
be missing (an older schema, a feature not installed): their probe says so
(`available: False`) and the component shows "unknown". Every query is bounded by an
index or by a small table; the monitor runs them off the request path.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

from ..alarms import paths as notify_paths
from . import health as health_mod
from .observe import INGEST_SLOW_BOUND, LATENCY_BUCKETS, quantile_bound, share_above

# The notification paths are the alarm side's declaration (alarms/paths.py PATHS):
# a path added there is probed here and has its dispatch_<path> component.
PATHS = tuple(notify_paths.PATHS)
# outbound_log statuses that are a delivery attempt, and the failed ones among them.
# 'dropped' (a 4xx from the customer's own webhook) is the target refusing, not the
# path failing; 'queued' is not an attempt yet; 'quarantined' is a row given up on.
ATTEMPT = ("ok", "failed", "retrying")
FAILED = ("failed", "retrying")
# 'rejected': the recipient's side failed (its mail domain, its webhook endpoint), not
# the path: one account cannot make a path fail service-wide. Such failures count
# only when they span at least `min_accounts` accounts in the window (then the common
# part, our side, is the likely cause).
REJECTED = "rejected"
MIN_ACCOUNTS = 3


async def exists(conn: AsyncConnection[Any], table: str) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def processes(conn: AsyncConnection[Any], now: datetime, live: timedelta) -> dict[str, Any]:
    """Live processes and their merged health. The dashboard is served by the processes
    of role `all`; a status-only process does not count as the dashboard being up."""
    cur = await conn.execute(
        "SELECT process, seen_at, health, role FROM status_processes ORDER BY seen_at DESC"
    )
    rows = await cur.fetchall()
    alive = [r for r in rows if now - r[1] <= live]
    serving = [r for r in rows if r[3] == "all"]
    return {
        "alive": sum(1 for r in alive if r[3] == "all"),
        "status_only": sum(1 for r in alive if r[3] != "all"),
        "newest_age_s": (now - serving[0][1]).total_seconds() if serving else None,
        "health": health_mod.merge([r[2] for r in alive]),
    }


# Scheduled jobs (jobs.py) whose last result is a component's health: a job runs in
# whichever process claimed it, so its result is read from the `jobs` table (shared,
# kept across restarts) rather than from one process's in-memory registry.
JOB_HEALTH = {"audit_verify": "audit", "audit_checkpoint": "audit"}
JOB_HEALTH_MAX_AGE = timedelta(days=2)  # older results say nothing any more: unknown


async def job_health(conn: AsyncConnection[Any], now: datetime) -> dict[str, dict[str, Any]]:
    """Health reports from the last run of the jobs in JOB_HEALTH (a failed run is a
    failure of its component; merged like a process's reports: a failure wins)."""
    cur = await conn.execute(
        "SELECT name, last_status, last_detail, last_run_at FROM jobs"
        " WHERE name = ANY(%s) AND last_status IS NOT NULL AND last_run_at > %s ORDER BY name",
        (list(JOB_HEALTH), now - JOB_HEALTH_MAX_AGE),
    )
    return health_mod.merge(
        [
            {
                JOB_HEALTH[name]: {
                    "ok": status == "ok",
                    "detail": f"{name}: {detail or ''}"[:500],
                    "at": at.isoformat(),
                }
            }
            for name, status, detail, at in await cur.fetchall()
        ]
    )


async def ingest(conn: AsyncConnection[Any], now: datetime) -> dict[str, Any]:
    minute = now.replace(second=0, microsecond=0)
    cur = await conn.execute(
        "SELECT minute, ingest_requests, ingest_5xx, ingest_latency FROM status_minutes"
        " WHERE minute >= %s",
        (minute - timedelta(minutes=4),),
    )
    rows = await cur.fetchall()
    n = len(LATENCY_BUCKETS) + 1
    lat5 = [0] * n
    req2 = err2 = req5 = 0
    for m, req, e, lat in rows:
        req5 += req
        lat5 = [a + b for a, b in zip(lat5, list(lat)[:n], strict=False)]
        if m >= minute - timedelta(minutes=1):
            req2 += req
            err2 += e
    p99 = quantile_bound(lat5, 0.99)
    st = await (await conn.execute("SELECT materialized FROM rollup_state")).fetchone()
    return {
        # how far the rollups job is behind the clock (storage/rollups.py)
        "rollups_behind_s": (now - st[0]).total_seconds() if st else None,
        "requests_2m": req2,
        "errors_5xx_2m": err2,
        "requests_5m": req5,
        "slow_share_5m": share_above(lat5, INGEST_SLOW_BOUND),
        "p99_bound_5m_s": None if p99 is None or p99 == float("inf") else p99,
        "p99_over_10s": p99 == float("inf"),
    }


async def lorawan(conn: AsyncConnection[Any], now: datetime) -> dict[str, Any] | None:
    """The LoRaWAN tray, all accounts: uplinks filed in the last 24 h by state, and
    the open ones. A refused uplink answers 4xx to a network nobody watches, so the
    count is shown here (indexed by received_at; the tray is small)."""
    if not await exists(conn, "unassigned_uplinks"):
        return None
    cur = await conn.execute(
        "SELECT state, count(*) FILTER (WHERE received_at >= %s),"
        " count(*) FILTER (WHERE resolved_at IS NULL)"
        " FROM unassigned_uplinks WHERE received_at >= %s OR resolved_at IS NULL GROUP BY state",
        (now - timedelta(hours=24), now - timedelta(hours=24)),
    )
    out: dict[str, Any] = {"filed_24h": {}, "open": {}}
    for state, day, open_ in await cur.fetchall():
        out["filed_24h"][state] = int(day)
        out["open"][state] = int(open_)
    return out


async def dispatch(
    conn: AsyncConnection[Any], now: datetime, min_accounts: int = MIN_ACCOUNTS
) -> dict[str, Any]:
    """Per path, over the last 5 minutes: attempts and failures as the status page
    counts them. Path failures (`failed`) always count; recipient-side failures
    (`rejected`) count only when they span `min_accounts` accounts."""
    if not await exists(conn, "outbound_log"):
        return {p: None for p in notify_paths.PATHS}
    out: dict[str, Any] = {}
    window = now - timedelta(minutes=5)
    for path in notify_paths.PATHS:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'ok'),"
            " count(*) FILTER (WHERE status = ANY(%s)),"
            " count(*) FILTER (WHERE status = %s),"
            " count(DISTINCT account_id) FILTER (WHERE status = %s),"
            " (array_agg(error ORDER BY at DESC) FILTER (WHERE status = ANY(%s)))[1]"
            " FROM outbound_log WHERE path = %s AND at > %s AND at <= %s",
            (list(FAILED), REJECTED, REJECTED, [*FAILED, REJECTED], path, window, now),
        )
        ok, failed, rejected, rejected_accounts, last_error = await cur.fetchone() or (
            0, 0, 0, 0, None,
        )  # fmt: skip
        spread = rejected_accounts >= min_accounts
        counted = [*FAILED, REJECTED] if spread else list(FAILED)
        failed_counted = failed + (rejected if spread else 0)
        attempts = ok + failed_counted
        cur = await conn.execute(
            "SELECT max(at) FROM outbound_log WHERE path = %s AND status = 'ok' AND at <= %s",
            (path, now),
        )
        last_ok = (await cur.fetchone() or (None,))[0]
        failing_for = None
        if attempts and failed_counted == attempts:
            cur = await conn.execute(
                "SELECT min(at) FROM outbound_log WHERE path = %s AND status = ANY(%s)"
                " AND at > %s AND at <= %s",
                (path, counted, last_ok or datetime.min.replace(tzinfo=now.tzinfo), now),
            )
            first = (await cur.fetchone() or (None,))[0]
            if first is not None:
                failing_for = (now - first).total_seconds()
        out[path] = {
            "attempts_5m": attempts,
            "failed_5m": failed_counted,
            "rejected_5m": rejected,
            "rejected_accounts_5m": rejected_accounts,
            "last_ok_age_s": (now - last_ok).total_seconds() if last_ok else None,
            "failing_for_s": failing_for,
            "last_error": last_error,
        }
    return out


async def dispatch_accounts(conn: AsyncConnection[Any], path: str, now: datetime) -> list[str]:
    """Accounts whose deliveries on `path` failed in the last 5 minutes."""
    if not await exists(conn, "outbound_log"):
        return []
    cur = await conn.execute(
        "SELECT DISTINCT account_id FROM outbound_log WHERE path = %s AND at > %s"
        " AND status = ANY(%s) AND account_id IS NOT NULL",
        (path, now - timedelta(minutes=5), [*FAILED, REJECTED]),
    )
    return [r[0] for r in await cur.fetchall()]


async def reports(conn: AsyncConnection[Any], now: datetime) -> dict[str, Any]:
    """Real renders from the reports table: the slowest monthly report of the last hour
    (asked to ready, or still waiting), and the last 24 hours' renders and failures."""
    cur = await conn.execute(
        "SELECT id, extract(epoch FROM coalesce(ready_at, %s) - created_at)::float8"
        " FROM reports WHERE template = 'haccp_monthly'"
        " AND ((status IN ('queued', 'rendering') AND created_at > %s) OR ready_at > %s)"
        " ORDER BY 2 DESC LIMIT 1",
        (now, now - timedelta(days=1), now - timedelta(hours=1)),
    )
    slow = await cur.fetchone()
    cur = await conn.execute(
        "SELECT max(ready_at) FROM reports WHERE status = 'ready' AND ready_at > %s",
        (now - timedelta(days=30),),
    )
    last_ready = (await cur.fetchone() or (None,))[0]
    day = now - timedelta(days=1)
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'ready' AND ready_at > %s),"
        " count(*) FILTER (WHERE status = 'failed' AND failed_at > %s),"
        " max(render_ms) FILTER (WHERE status = 'ready' AND ready_at > %s),"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY render_ms)"
        "   FILTER (WHERE status = 'ready' AND ready_at > %s)"
        " FROM reports WHERE created_at > %s",
        (day, day, day, day, now - timedelta(days=14)),
    )
    n, failed, slowest_ms, median_ms = await cur.fetchone() or (0, 0, None, None)
    return {
        "slowest_monthly_s": slow[1] if slow else None,
        "slowest_id": slow[0] if slow else None,
        "last_ready_age_s": (now - last_ready).total_seconds() if last_ready else None,
        "rendered_24h": n,
        "failed_24h": failed,
        "render_max_24h_s": slowest_ms / 1000 if slowest_ms is not None else None,
        "render_median_24h_s": median_ms / 1000 if median_ms is not None else None,
    }


async def backups(
    conn: AsyncConnection[Any], now: datetime, max_age_s: float, *, configured: bool = True
) -> dict[str, Any]:
    """`configured`: this server has backup recipients (OPENSENSE_BACKUP_RECIPIENTS);
    without them the backup job skips, and no backup is not "late"."""
    cur = await conn.execute("SELECT at FROM status_meta WHERE key = 'monitoring_since'")
    since = (await cur.fetchone() or (None,))[0]
    out: dict[str, Any] = {
        "available": await exists(conn, "backup_runs"),
        "configured": configured,
        "max_age_s": max_age_s,
        "monitoring_for_s": (now - since).total_seconds() if since else 0.0,
    }
    if not out["available"]:
        return out
    cur = await conn.execute(
        "SELECT max(finished_at) FILTER (WHERE ok AND kind <> 'restore_test'),"
        " (array_agg(ok ORDER BY started_at DESC) FILTER (WHERE kind = 'restore_test'"
        "   AND finished_at IS NOT NULL))[1],"
        " (array_agg(ok ORDER BY started_at DESC) FILTER (WHERE kind <> 'restore_test'"
        "   AND finished_at IS NOT NULL))[1]"
        " FROM backup_runs WHERE started_at <= %s",
        (now,),
    )
    last_good, restore_ok, last_ok = await cur.fetchone() or (None, None, None)
    out["last_good_age_s"] = (now - last_good).total_seconds() if last_good else None
    out["last_restore_test_ok"] = restore_ok
    out["last_run_ok"] = last_ok
    return out


# a gateway is operational when seen within GATEWAY_OK, degraded up to GATEWAY_DOWN
GATEWAY_OK = timedelta(minutes=5)
GATEWAY_DOWN = timedelta(minutes=15)


def gateway_state(last_seen: datetime | None, health: dict[str, Any], now: datetime) -> str:
    if last_seen is None:
        return "unknown"
    age = now - last_seen
    if age > GATEWAY_DOWN:
        return "outage"
    if age > GATEWAY_OK or (health.get("oldest_unsent_s") or 0) > GATEWAY_OK.total_seconds():
        return "degraded"
    return "operational"


async def gateways(conn: AsyncConnection[Any], now: datetime) -> list[dict[str, Any]] | None:
    if not await exists(conn, "gateways"):
        return None
    cur = await conn.execute(
        "SELECT id, account_id, site_id, name, last_seen_at, health FROM gateways ORDER BY id"
    )
    out = []
    for gid, acc, site, name, seen, h in await cur.fetchall():
        h = h if isinstance(h, dict) else {}
        out.append(
            {
                "id": gid,
                "account_id": acc,
                "site_id": site,
                "name": name,
                "last_seen_at": seen,
                "state": gateway_state(seen, h, now),
                "health": h,
            }
        )
    return out
