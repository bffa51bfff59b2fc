"""Site gateways, server side: gw_ token authentication, the sync document, batch
ingest scoped to the gateway's site, health, and local alerts. Pure checks of a
batch are split from the I/O so they can be tested alone."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

# The rule kinds a site gateway evaluates on its own during an outage (the server
# decides; the sync document lists them in `rule_kinds` and carries only those),
# with their params exactly as the contract declares them.
from opensense_contract.payload import MAX_FUTURE_S
from opensense_contract.rules import GATEWAY_RULE_KINDS

from .. import tokens
from ..errors import ApiError
from ..ids import new_id
from ..ingest import pipeline
from ..ingest.validate import MAX_FUTURE, check_value, make_entry, parse_ts
from ..kinds import KINDS
from ..presets import VERTICALS
from ..storage.write import RowLike, insert_readings

MAX_SERIES = 1000
HEALTH_KEYS = ("queue_depth", "oldest_unsent_s", "uplink", "last_sync", "dead_letters")
# A silence longer than this between two calls of a gateway is an uplink gap. A
# gateway that is up holds its sync long-poll open and renews it at once (each end
# counts as a call), so while the link works it is never silent this long; an old
# gateway without the long-poll calls every health_interval_s, and each idle minute
# is then a (real, harmless) gap of its own.
GAP = timedelta(seconds=10)
# Clocks differ (server, gateway, nodes) and a long-poll answered into a dead link
# still counts as a call: the bounds of a local alert give this much.
SLACK = MAX_FUTURE


@dataclass(frozen=True)
class Gateway:
    id: str
    account_id: str
    site_id: str
    name: str
    vertical: str
    token_id: str = ""
    # the last uplink gap as the server saw it (None: the gateway never had one)
    gap_from: datetime | None = None
    gap_to: datetime | None = None


@dataclass(frozen=True)
class GatewayTokenRow:
    """The row a gw_ token authenticates with: the token and its gateway."""

    token_id: str
    kind: str
    hash: str
    revoked_at: datetime | None
    id: str
    account_id: str
    site_id: str
    name: str
    deleted_at: datetime | None
    vertical: str


class SiteDevice(NamedTuple):
    id: str
    site_id: str


class LocalAlert(NamedTuple):
    """A local alert as posted, checked for shape."""

    ref: str
    device: str
    kind: str  # the measurement kind (`type` on the wire)
    label: str
    unit: str | None
    rule_id: str | None
    opened_at: datetime | None
    notified_at: datetime | None
    path: str
    cleared_at: datetime | None


# --- management --------------------------------------------------------------------


async def create_gateway(
    conn: AsyncConnection[Any],
    account_id: str,
    site_id: str,
    name: str,
    rounds: int,
    *,
    actor: str = "system",
) -> tuple[dict[str, Any], str]:
    """A gateway for one site and its gw_ token (plaintext returned once). The gateway,
    its token and their audit rows commit together."""
    from .. import audit
    from ..devices import store as devices_store

    async with conn.transaction():
        site = await devices_store.get_site(conn, account_id, site_id)
        gid = new_id("gw")
        await conn.execute(
            "INSERT INTO gateways (id, account_id, site_id, name) VALUES (%s, %s, %s, %s)",
            (gid, account_id, site["id"], name),
        )
        await audit.record(
            conn,
            account_id=account_id,
            actor=actor,
            action="gateway.create",
            subject=gid,
            data={"site_id": site["id"], "name": name},
        )
        _, plaintext = await devices_store.create_token(
            conn, account_id, "gw", rounds, name, gateway_id=gid, actor=actor
        )
    return await get_gateway(conn, account_id, gid), plaintext


async def rotate_gateway_token(
    conn: AsyncConnection[Any],
    account_id: str,
    gateway_id: str,
    rounds: int,
    now: datetime,
    *,
    actor: str = "system",
) -> tuple[dict[str, Any], str]:
    """Revoke the gateway's live token and issue a new one (the old fails at once)."""
    from ..devices import store as devices_store

    async with conn.transaction():
        gw = await get_gateway(conn, account_id, gateway_id)
        await conn.execute(
            "UPDATE tokens SET revoked_at = %s WHERE gateway_id = %s AND revoked_at IS NULL",
            (now, gw["id"]),
        )
        _, plaintext = await devices_store.create_token(
            conn,
            account_id,
            "gw",
            rounds,
            gw["name"],
            gateway_id=gw["id"],
            actor=actor,
            action="token.rotate",
        )
    return gw, plaintext


async def get_gateway(conn: AsyncConnection[Any], account_id: str, gateway_id: str) -> Any:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT id, account_id, site_id, name, created_at, last_seen_at, health FROM gateways"
        " WHERE id = %s AND account_id = %s AND deleted_at IS NULL",
        (gateway_id, account_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("not_found", f"no gateway {gateway_id[:40]!r} in this account")
    return row


async def list_gateways(conn: AsyncConnection[Any], account_id: str) -> list[Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT id, account_id, site_id, name, created_at, last_seen_at, health FROM gateways"
        " WHERE account_id = %s AND deleted_at IS NULL ORDER BY created_at, id",
        (account_id,),
    )
    return list(await cur.fetchall())


# --- authentication ----------------------------------------------------------------


async def authenticate(
    conn: AsyncConnection[Any], verifier: tokens.Verifier, token: str | None, now: datetime
) -> Gateway:
    """The live gateway behind a gw_ token, or 401."""
    kind, key_id, secret = tokens.parse_or_raise(token, ("gw",))
    cur = conn.cursor(row_factory=class_row(GatewayTokenRow))
    await cur.execute(
        "SELECT t.id AS token_id, t.kind, t.hash, t.revoked_at, g.id, g.account_id, g.site_id,"
        " g.name, g.deleted_at, s.vertical FROM tokens t JOIN gateways g ON g.id = t.gateway_id"
        " JOIN sites s ON s.id = g.site_id WHERE t.key_id = %s",
        (key_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise ApiError("token_invalid", "the token is not known (wrong, or deleted)")
    await tokens.check_row(
        conn, verifier, kind, key_id, secret, row.token_id, row.kind, row.hash, row.revoked_at, now
    )
    if row.deleted_at is not None:
        raise ApiError("token_invalid", "the token's gateway was deleted")
    gap_from, gap_to = await heard(conn, row.id, now)
    return Gateway(
        row.id, row.account_id, row.site_id, row.name, row.vertical, row.token_id, gap_from, gap_to
    )


async def heard(
    conn: AsyncConnection[Any], gateway_id: str, now: datetime
) -> tuple[datetime | None, datetime | None]:
    """Record a call of the gateway; a silence longer than GAP before it becomes the
    gateway's last uplink gap (from its last call before, to this one). The server's
    own record, so a gateway cannot claim an outage the server did not see."""
    cur = await conn.execute(
        "UPDATE gateways SET"
        " gap_from = CASE WHEN coalesce(last_seen_at, created_at) < %(edge)s"
        "  THEN coalesce(last_seen_at, created_at) ELSE gap_from END,"
        " gap_to = CASE WHEN coalesce(last_seen_at, created_at) < %(edge)s"
        "  THEN %(now)s ELSE gap_to END,"
        " last_seen_at = greatest(last_seen_at, %(now)s)"
        " WHERE id = %(id)s RETURNING gap_from, gap_to",
        {"edge": now - GAP, "now": now, "id": gateway_id},
    )
    row = await cur.fetchone()
    if row is None:
        return None, None
    gap_from, gap_to = row
    return gap_from, gap_to


# --- sync --------------------------------------------------------------------------


async def sync_document(conn: AsyncConnection[Any], gw: Gateway, now: datetime) -> dict[str, Any]:
    """What a gateway needs to work alone: its site's devices with their live token's
    site hash, the rules of their channels, and the site vertical's default rules
    (for channels a node creates during an outage)."""
    cur = await conn.execute(
        "SELECT d.id, d.local_id, d.cadence_s, t.key_id, t.site_hash FROM devices d"
        " LEFT JOIN tokens t ON t.device_id = d.id AND t.revoked_at IS NULL"
        " WHERE d.site_id = %s AND d.account_id = %s AND d.deleted_at IS NULL"
        " ORDER BY d.local_id, t.created_at DESC",
        (gw.site_id, gw.account_id),
    )
    devices: dict[str, dict[str, Any]] = {}
    for did, local_id, cadence, key_id, shash in await cur.fetchall():
        devices.setdefault(
            local_id,
            {
                "id": did,
                "local_id": local_id,
                "cadence_s": cadence,
                "key_id": key_id,
                "site_hash": shash,
            },
        )
    rule_cur = conn.cursor(row_factory=dict_row)
    await rule_cur.execute(
        "SELECT r.id, d.local_id AS device, c.kind AS type, c.label, c.id AS channel_id,"
        " r.kind, r.params, r.grace_min, r.severity"
        " FROM rules r JOIN channels c ON c.id = r.channel_id JOIN devices d ON d.id = c.device_id"
        " WHERE d.site_id = %s AND d.account_id = %s AND d.deleted_at IS NULL AND r.enabled"
        " AND r.kind = ANY(%s) ORDER BY r.id",
        (gw.site_id, gw.account_id, list(GATEWAY_RULE_KINDS)),
    )
    rules = list(await rule_cur.fetchall())
    preset = VERTICALS[gw.vertical]
    defaults = [
        {"type": k, "kind": d.kind, "params": d.params, "grace_min": d.grace_min}
        for k, d in preset.rules.items()
        if not KINDS[k].auxiliary and d.kind in GATEWAY_RULE_KINDS
    ]
    doc: dict[str, Any] = {
        "gateway": {"id": gw.id, "name": gw.name, "site_id": gw.site_id},
        "account_id": gw.account_id,
        "devices": list(devices.values()),
        "rules": rules,
        "defaults": defaults,
        "rule_kinds": list(GATEWAY_RULE_KINDS),
    }
    # what the gateway holds, for the long-poll to compare (not a secret: the
    # document's own hash)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    doc["version"] = hashlib.sha256(canonical.encode()).hexdigest()[:32]
    doc["server_time"] = now
    return doc


# --- batch ingest ------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    device: str
    kind: str
    label: str
    unit: str
    ts: list[datetime]
    values: list[float]
    index: list[int]  # position of each kept reading in the posted series


@dataclass
class Checked:
    series: list[Series]
    rejected: list[dict[str, Any]]
    n: int


def _epoch(v: Any) -> datetime | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    try:
        return datetime.fromtimestamp(v, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def check_batch(body: Any, now: datetime, oldest: datetime, max_readings: int) -> Checked:
    """Validate a gateway batch (pure). The batch's shape must be right as a whole
    (else 400); a single bad reading is only rejected, with its place and reason, so
    one bad reading never holds back a site's backlog."""
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    batch = body.get("batch")
    if not isinstance(batch, str) or not 1 <= len(batch) <= 64:
        raise ApiError("invalid_request", "batch must be a string of 1 to 64 characters")
    series = body.get("series")
    if not isinstance(series, list) or not 1 <= len(series) <= MAX_SERIES:
        raise ApiError("invalid_request", f"series must be an array of 1 to {MAX_SERIES} entries")
    out: list[Series] = []
    rejected: list[dict[str, Any]] = []
    n = 0
    for i, s in enumerate(series):
        f = f"series[{i}]"
        if not isinstance(s, dict):
            raise ApiError("invalid_request", f"{f} must be an object")
        ts, vals, dev = s.get("ts"), s.get("values"), s.get("device")
        if not isinstance(ts, list) or not isinstance(vals, list) or len(ts) != len(vals):
            raise ApiError("invalid_request", f"{f}.ts and {f}.values must be arrays of one length")
        if not isinstance(dev, str) or not 0 < len(dev) <= 64:
            raise ApiError("invalid_request", f"{f}.device must be a device's local_id")
        n += len(ts)
        if n > max_readings:
            raise ApiError("invalid_request", f"a batch carries at most {max_readings} readings")
        try:
            first = make_entry(s.get("type"), s.get("label"), s.get("unit"), 0, now, f)
        except ApiError as exc:
            if exc.code != "out_of_range":
                rejected.extend(
                    {"series": i, "index": j, "code": exc.code, "message": exc.message}
                    for j in range(len(ts))
                )
                continue
            first = None
        kind = s.get("type")
        assert isinstance(kind, str)
        label = first.label if first else (s.get("label") or "")
        unit = first.unit if first else (s.get("unit") or KINDS[kind].default_unit)
        keep = Series(dev, kind, label, unit, [], [], [])
        for j, (t, v) in enumerate(zip(ts, vals, strict=True)):
            at = _epoch(t)
            try:
                if at is None:
                    at = parse_ts(t, f"{f}.ts[{j}]") if isinstance(t, str) else None
                if at is None:
                    raise ApiError(
                        "invalid_measurement", f"{f}.ts[{j}] must be Unix seconds or RFC 3339"
                    )
                if at > now + MAX_FUTURE:
                    raise ApiError(
                        "out_of_range",
                        f"{f}.ts[{j}] {at.isoformat()} is more than {MAX_FUTURE_S // 60} minutes in the future",
                    )
                if at < oldest:
                    raise ApiError(
                        "out_of_range",
                        f"{f}.ts[{j}] {at.isoformat()} is older than the raw-data retention",
                    )
                value = check_value(kind, unit, v, f"{f}.values[{j}]")
            except ApiError as exc:
                rejected.append({"series": i, "index": j, "code": exc.code, "message": exc.message})
                continue
            keep.ts.append(at)
            keep.values.append(value)
            keep.index.append(j)
        if keep.ts:
            out.append(keep)
    return Checked(out, rejected, n)


@dataclass
class Span:
    """A device's readings in one gateway batch: how many, first and last time."""

    n: int
    first: datetime
    last: datetime


async def ingest_batch(
    conn: AsyncConnection[Any],
    gw: Gateway,
    batch_id: str,
    checked: Checked,
    *,
    now: datetime,
    compact_after_days: int,
) -> dict[str, Any]:
    """Store a checked batch in one transaction: only devices of the gateway's site;
    channels created as the ingest creates them; one gateway_batches row per device."""
    rejected = list(checked.rejected)
    async with conn.transaction():
        names = sorted({s.device for s in checked.series})
        cur = await conn.execute(
            "SELECT d.local_id, d.id, d.site_id FROM devices d"
            " WHERE d.account_id = %s AND d.deleted_at IS NULL AND d.local_id = ANY(%s)",
            (gw.account_id, names),
        )
        found = {local_id: SiteDevice(did, site) for local_id, did, site in await cur.fetchall()}
        cur = await conn.execute(
            'SELECT device_id, kind, label, id, num, unit, "offset" FROM channels'
            " WHERE device_id = ANY(%s)",
            ([d.id for d in found.values()],),
        )
        chans: dict[tuple[str, str, str], pipeline.Channel] = {
            (device_id, kind, label): pipeline.Channel(*ch)
            for device_id, kind, label, *ch in await cur.fetchall()
        }
        rows: list[RowLike] = []
        spans: dict[str, Span] = {}  # device id -> its readings in this batch
        for i, s in enumerate(checked.series):
            dev = found.get(s.device)
            code, msg = None, ""
            if dev is None:
                code, msg = "device_not_found", f"no device {s.device!r} in this account"
            elif dev.site_id != gw.site_id:
                code = "forbidden"
                msg = f"device {s.device!r} is not at this gateway's site {gw.site_id}"
            if code is not None:
                rejected.extend(
                    {"series": i, "index": j, "code": code, "message": msg} for j in s.index
                )
                continue
            assert dev is not None
            ch = chans.get((dev.id, s.kind, s.label))
            if ch is None:
                d = pipeline.Device(dev.id, gw.account_id, s.device, gw.vertical)
                entry = make_entry(s.kind, s.label, s.unit, s.values[0], s.ts[0], "series")
                made = await pipeline.channels_for(conn, d, (entry,))
                ch = made[(s.kind, s.label)]
                chans[(dev.id, s.kind, s.label)] = ch
            try:
                # the one path every door's readings take (unit check, offset)
                rows += pipeline.channel_rows(ch, s.unit, zip(s.ts, s.values, strict=True), "unit")
            except ApiError as exc:
                rejected.extend(
                    {"series": i, "index": j, "code": exc.code, "message": exc.message}
                    for j in s.index
                )
                continue
            span = spans.setdefault(dev.id, Span(0, s.ts[0], s.ts[0]))
            span.n += len(s.ts)
            span.first = min(span.first, *s.ts)
            span.last = max(span.last, *s.ts)
        inserted = await insert_readings(conn, rows, now=now, compact_after_days=compact_after_days)
        if spans:
            ids = list(spans)
            await conn.execute(
                "INSERT INTO gateway_batches (gateway_id, batch_id, device_id, n, accepted,"
                " ts_from, ts_to, received_at)"
                " SELECT %s, %s, d, n, 0, f, t, %s"
                " FROM unnest(%s::text[], %s::int[], %s::timestamptz[], %s::timestamptz[])"
                "   AS u(d, n, f, t)"
                " ON CONFLICT DO NOTHING",
                (
                    gw.id,
                    batch_id,
                    now,
                    ids,
                    [spans[d].n for d in ids],
                    [spans[d].first for d in ids],
                    [spans[d].last for d in ids],
                ),
            )
            # a node heard through the gateway was seen when it last measured
            await conn.execute(
                "UPDATE devices d SET last_seen_at = u.t FROM unnest(%s::text[],"
                " %s::timestamptz[]) AS u(id, t) WHERE d.id = u.id"
                " AND (d.last_seen_at IS NULL OR d.last_seen_at < u.t) AND u.t <= %s",
                (ids, [spans[d].last for d in ids], now + timedelta(minutes=5)),
            )
        await conn.execute("UPDATE gateways SET last_seen_at = %s WHERE id = %s", (now, gw.id))
    return {
        "batch": batch_id,
        "accepted": inserted,
        "deduplicated": len(rows) - inserted,
        "rejected": rejected,
    }


# --- health and local alerts ---------------------------------------------------------


def check_health(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    for k in ("queue_depth", "dead_letters"):
        v = body.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ApiError("invalid_request", f"{k} must be a non-negative integer")
    v = body.get("oldest_unsent_s")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
        raise ApiError("invalid_request", "oldest_unsent_s must be a non-negative number or null")
    if not isinstance(body.get("uplink"), str):
        raise ApiError("invalid_request", "uplink must be a string ('up', 'down', 'refused')")
    if len(str(body)) > 8192:
        raise ApiError("invalid_request", "a health report is at most 8 KiB")
    return body


async def store_health(
    conn: AsyncConnection[Any], gw: Gateway, health: dict[str, Any], now: datetime
) -> None:
    await conn.execute(
        "UPDATE gateways SET health = %s, last_seen_at = %s WHERE id = %s",
        (Jsonb(health), now, gw.id),
    )


def check_alert_times(
    f: str,
    gw: Gateway,
    now: datetime,
    oldest: datetime,
    stored_open: datetime | None,
    opened: datetime | None,
    notified: datetime | None,
    cleared: datetime | None,
) -> None:
    """Pure: why a local alert's times cannot be taken (ApiError), or nothing.

    notified_at (the gateway's clock when it woke people) must lie in the last
    uplink gap the server saw, give or take SLACK; opened_at (the reading time the
    alarm opened at) no later than that and no older than the raw-data retention
    (a node may replay an old backlog during the outage; readings older than that
    could not be stored either); cleared_at after opened_at and not in the future.
    A resend of a stored alert only adds its clear: its times were checked then."""
    assert opened is not None and notified is not None

    def iso(t: datetime | None) -> str:
        return t.isoformat() if t is not None else "none"

    if stored_open is None:
        if gw.gap_from is None or gw.gap_to is None:
            raise ApiError(
                "out_of_range",
                f"{f}: this gateway has had no uplink gap (a silence of more than"
                f" {int(GAP.total_seconds())} s); a local alert stands only for an alarm"
                " raised while the server could not be reached",
            )
        lo, hi = gw.gap_from - SLACK, gw.gap_to + SLACK
        if not lo <= notified <= hi:
            raise ApiError(
                "out_of_range",
                f"{f}.notified_at {iso(notified)} lies outside this gateway's last uplink gap"
                f" ({iso(gw.gap_from)} .. {iso(gw.gap_to)}, give or take"
                f" {int(SLACK.total_seconds())} s)",
            )
        if not oldest <= opened <= min(notified, gw.gap_to) + SLACK:
            raise ApiError(
                "out_of_range",
                f"{f}.opened_at {iso(opened)} must lie between the raw-data retention"
                f" ({iso(oldest)}) and the end of this gateway's last uplink gap"
                f" ({iso(gw.gap_to)}) or its notified_at, whichever is first",
            )
    start = stored_open or opened
    if cleared is not None and not start - SLACK <= cleared <= now + SLACK:
        raise ApiError(
            "out_of_range",
            f"{f}.cleared_at {iso(cleared)} must lie between the alert's opened_at"
            f" {iso(start)} and now",
        )


def _ts_field(a: dict[str, Any], k: str, f: str, required: bool) -> datetime | None:
    v = a.get(k)
    if v is None:
        if required:
            raise ApiError("invalid_request", f"{f}.{k} is missing")
        return None
    return parse_ts(v, f"{f}.{k}")


async def store_local_alerts(
    conn: AsyncConnection[Any], gw: Gateway, body: Any, now: datetime, oldest: datetime
) -> dict[str, Any]:
    """Record the gateway's local alerts (idempotent on the gateway's `ref`; a resend
    may add cleared_at), tied to the token that posted them.

    A local alert tells the server that people were woken already, so the server does
    not wake them again for the same alarm (alarms/outbox.py covered_locally). Only
    an alarm raised while the server could not be reached is one: a new alert's
    times must fit the gateway's last uplink gap as the server saw it
    (check_alert_times). Anything else refuses the whole post (422 out_of_range),
    nothing stored: a gateway cannot silence the site's later alarms with a made-up
    time."""
    alerts = body.get("alerts") if isinstance(body, dict) else None
    if not isinstance(alerts, list) or len(alerts) > 1000:
        raise ApiError("invalid_request", "alerts must be an array of at most 1000 entries")
    parsed: list[LocalAlert] = []
    for i, a in enumerate(alerts):
        f = f"alerts[{i}]"
        if not isinstance(a, dict):
            raise ApiError("invalid_request", f"{f} must be an object")
        for k in ("ref", "path", "device", "type"):
            if not isinstance(a.get(k), str) or not 0 < len(a[k]) <= 200:
                raise ApiError("invalid_request", f"{f}.{k} must be a non-empty string")
        parsed.append(
            LocalAlert(
                a["ref"],
                a["device"],
                a["type"],
                a.get("label") or "",
                a.get("unit") if isinstance(a.get("unit"), str) else None,
                a.get("rule_id") if isinstance(a.get("rule_id"), str) else None,
                _ts_field(a, "opened_at", f, True),
                _ts_field(a, "notified_at", f, True),
                a["path"],
                _ts_field(a, "cleared_at", f, False),
            )
        )
    cur = await conn.execute(
        "SELECT ref, opened_at FROM local_alerts WHERE gateway_id = %s AND ref = ANY(%s)",
        (gw.id, [p.ref for p in parsed]),
    )
    known: dict[str, datetime] = {ref: opened for ref, opened in await cur.fetchall()}
    for i, p in enumerate(parsed):
        check_alert_times(
            f"alerts[{i}]",
            gw,
            now,
            oldest,
            known.get(p.ref),
            p.opened_at,
            p.notified_at,
            p.cleared_at,
        )
    stored = 0
    async with conn.transaction():
        for ref, dev, kind, label, unit, rule_id, opened, notified, path, cleared in parsed:
            cur = await conn.execute(
                "SELECT d.id, c.id FROM devices d LEFT JOIN channels c ON c.device_id = d.id"
                " AND c.kind = %s AND c.label = %s"
                " WHERE d.account_id = %s AND d.site_id = %s AND d.local_id = %s"
                " AND d.deleted_at IS NULL",
                (kind, label, gw.account_id, gw.site_id, dev),
            )
            row = await cur.fetchone()
            device_id, channel_id = row if row else (None, None)
            if device_id is not None and channel_id is None and kind in KINDS:
                # the channel is first heard of through its alarm (the backlog that
                # would create it comes after): create it now, with the node's unit
                assert opened is not None
                try:
                    entry = make_entry(kind, label, unit or None, 0, opened, "alert")
                except ApiError:
                    entry = None
                if entry is not None:
                    d = pipeline.Device(device_id, gw.account_id, dev, gw.vertical)
                    made = await pipeline.channels_for(conn, d, (entry,))
                    channel_id = made[(kind, label)].id
            await conn.execute(
                "INSERT INTO local_alerts (gateway_id, channel_id, rule_id, opened_at, notified_at,"
                " path, cleared_at, ref, device_id, kind, label, token_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (gateway_id, ref) DO UPDATE SET"
                "  cleared_at = coalesce(local_alerts.cleared_at, excluded.cleared_at),"
                "  channel_id = coalesce(local_alerts.channel_id, excluded.channel_id)",
                (
                    gw.id,
                    channel_id,
                    rule_id,
                    opened,
                    notified,
                    path,
                    cleared,
                    ref,
                    device_id,
                    kind,
                    label,
                    gw.token_id,
                ),
            )
            stored += 1
    return {"stored": stored}
