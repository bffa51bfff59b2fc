"""What the overview shows, as data: one card per measurement channel of the account,
grouped by device, with the device's health folded into one line (docs/dashboard.md,
"Overview"). The overview page renders it; the live stream (web/live.py) sends the
same cards as JSON when something changes, so page and stream never disagree.

Which channels are measurements and which are the device's own health is the kinds'
data (kinds.py `auxiliary`): battery, signal, snr and health fold into the device's
line; every other kind (temperature, humidity, leak, …) is a card."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from ..kinds import KINDS

# The alarm engine's status -> the card's colour class.
STATE_CLASS = {"ok": "ok", "grace": "warn", "clearing": "warn", "alarm": "alarm"}
# Units whose values are counts or flags: printed as integers.
INTEGRAL_UNITS = frozenset({"1", "B", "s", "0/1"})
# Kinds whose readings are whole numbers in practice (a battery's %, an RSSI).
WHOLE = frozenset({("battery", "%"), ("signal", "dBm")})
# How a health channel reads in the device's line: kind (and label for `health`) ->
# the words before the value; absent: not on the line (the device page shows all).
HEALTH_LINE = {"battery": "battery", "signal": "RSSI", "snr": "SNR"}
HEALTH_LABELS = {"queue_depth": "queue"}


def is_measurement(kind: str) -> bool:
    k = KINDS.get(kind)
    return k is None or not k.auxiliary


def fmt_value(value: float | None, unit: str, kind: str = "") -> str:
    """A reading as people read it: integers for counts and flags (never `1.0 1`),
    one decimal otherwise; a dimensionless unit ("1") is not printed."""
    if value is None:
        return "–"
    if kind == "leak":
        return "wet" if value >= 0.5 else "dry"
    k = KINDS.get(kind)
    u = k.unit(unit) if k else None
    if unit in INTEGRAL_UNITS or (kind, unit) in WHOLE or (u is not None and u.integral):
        text = f"{round(value):d}"
    else:
        text = f"{value:.1f}"
    return text if unit in ("", "1") else f"{text} {unit}"


def age(now: datetime, ts: datetime | None) -> str:
    if ts is None:
        return "no recent reading"
    s = max(0, int((now - ts).total_seconds()))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


@dataclass
class Card:
    channel_id: str
    device_id: str
    name: str
    kind: str
    value: str
    ts: datetime | None
    age: str
    status: str  # the engine's word, "none" before any judgement
    css: str
    open_events: int

    def json(self) -> dict[str, Any]:
        return {
            "id": self.channel_id,
            "device": self.device_id,
            "value": self.value,
            "age": self.age,
            "status": self.status,
            "css": self.css,
            "open": self.open_events,
        }


@dataclass
class Device:
    id: str
    name: str
    site_name: str
    health: str  # "battery 87 %, RSSI -61 dBm, last seen 2 min ago"
    offline: str | None  # "went offline 3 h ago", or None when online
    open_events: int  # device-level (offline) events
    cards: list[Card] = field(default_factory=list)
    health_ids: set[str] = field(default_factory=set)  # its health channels

    @property
    def alarming(self) -> bool:
        return self.open_events > 0 or any(c.open_events for c in self.cards)

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "health": self.health, "offline": self.offline}


# Every live channel of the account with its newest raw reading (days already packed
# show as "no recent reading"), the engine's status and open events, and its device's
# name, site, last message and offline state. The account id is the signed-in user's.
BOARD_SQL = """
SELECT s.name, d.id, d.name, d.last_seen_at, das.offline_since,
       c.id, c.name, c.kind, c.label, c.unit, m.value, m.ts,
       CASE WHEN a.last_ts IS NULL THEN 'none' ELSE a.status END,
       (SELECT count(*) FROM events e WHERE e.channel_id = c.id AND e.account_id = c.account_id
          AND e.state <> 'cleared')
  FROM channels c
  JOIN devices d ON d.id = c.device_id AND d.account_id = c.account_id AND d.deleted_at IS NULL
  JOIN sites s ON s.id = d.site_id AND s.account_id = c.account_id
  LEFT JOIN alarm_state a ON a.channel_id = c.id
  LEFT JOIN device_alarm_state das ON das.device_id = d.id
  LEFT JOIN LATERAL (
      SELECT x.value, x.ts FROM measurements x WHERE x.channel_num = c.num
       ORDER BY x.ts DESC LIMIT 1
  ) m ON true
 WHERE c.account_id = %s
"""


async def board(conn: AsyncConnection[Any], account_id: str, now: datetime) -> list[Device]:
    """The account's devices with their measurement cards: devices with an open alarm
    first, then by site and name; cards by name."""
    cur = await conn.execute(BOARD_SQL, (account_id,))
    devices: dict[str, Device] = {}
    health: dict[str, list[tuple[int, str]]] = {}
    for (site, dev_id, dev_name, seen, off, cid, cname, kind, label, unit, value, ts, status,
         n_open) in await cur.fetchall():  # fmt: skip
        d = devices.get(dev_id)
        if d is None:
            d = devices[dev_id] = Device(
                dev_id,
                dev_name,
                site,
                "",
                None if off is None else f"went offline {age(now, off)}",
                0,
            )
            health[dev_id] = [(99, f"last seen {age(now, seen)}" if seen else "never seen")]
        if is_measurement(kind):
            d.cards.append(
                Card(cid, dev_id, cname, kind, fmt_value(value, unit, kind), ts, age(now, ts),
                     status, "alarm" if n_open else STATE_CLASS.get(status, "none"), n_open)
            )  # fmt: skip
            continue
        d.health_ids.add(cid)
        d.open_events += n_open  # e.g. device_offline, filed on a health channel
        words = HEALTH_LINE.get(kind) or HEALTH_LABELS.get(label)
        if words and value is not None:
            order = list(HEALTH_LINE.values()).index(words) if words in HEALTH_LINE.values() else 50
            health[dev_id].append((order, f"{words} {fmt_value(value, unit, kind)}"))
    for dev_id, d in devices.items():
        d.health = ", ".join(text for _, text in sorted(health[dev_id]))
        d.cards.sort(key=lambda c: c.name)
    return sorted(devices.values(), key=lambda d: (not d.alarming, d.site_name, d.name))
