"""A rule's limit history, read from the audit trail: what the HACCP report and the
channel page's chart draw as the limits in force over time.

A rule's params change through two routes, each with its own audit row:
- `PATCH /v1/rules/{id}` and the dashboard's rule form: `rule.update`, subject the
  rule, `data.params = {from, to}` (a rule made by `POST /v1/channels/{id}/rules` or
  the form has a `rule.create` row);
- `PATCH /v1/channels/{id}` with ok_min/ok_max/grace_min: `channel.update`, subject
  the channel, `data.rule = {id, from: {params, grace_min} or null, to: {…}}` (null
  `from`: that request made the rule).
Before stop 35 only the first was read, so limits set through the second showed as if
they had always been in force.

A channel's default rule (its site vertical's preset, `ingest/pipeline.py`) is made
in the transaction that makes the channel, at its first reading, and has no row of its
own (`is_default`): it has judged every reading the channel has, buffered ones sent
late included, so its first limits are in force from the channel's beginning, not
from the moment the rule was made. Any other rule without a row of its making holds
from its `created_at`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from psycopg import AsyncConnection

# Both branches use a partial index on (subject, seq): migrations 0023 and 0031.
HISTORY_SQL = """
SELECT at, actor, action, data, seq FROM audit_log
WHERE account_id = %(account)s AND subject = %(rule)s
  AND action IN ('rule.create', 'rule.update')
UNION ALL
SELECT at, actor, action, data, seq FROM audit_log
WHERE account_id = %(account)s AND subject = %(channel)s AND action = 'channel.update'
  AND data -> 'rule' ->> 'id' = %(rule)s
ORDER BY seq
"""


@dataclass(frozen=True)
class LimitChange:
    at: datetime
    actor: str
    made: bool  # the rule was made here: before it, no limits of this rule
    before: dict[str, Any]  # its params before ({} when made here)


def _change(at: datetime, actor: str, action: str, data: Any) -> LimitChange | None:
    if not isinstance(data, dict):
        return None
    if action == "rule.create":
        return LimitChange(at, actor, True, {})
    if action == "rule.update":
        p = data.get("params")
        if isinstance(p, dict) and isinstance(p.get("from"), dict):
            return LimitChange(at, actor, False, p["from"])
        return None  # (no params changed)
    r = data.get("rule")  # channel.update
    if not isinstance(r, dict) or "from" not in r:
        return None  # (no limit changed)
    before = r["from"]
    if before is None:
        return LimitChange(at, actor, True, {})
    if not isinstance(before, dict) or not isinstance(before.get("params"), dict):
        return None
    return LimitChange(at, actor, False, before["params"])


async def limit_changes(
    conn: AsyncConnection[Any], account_id: str, rule_id: str, channel_id: str
) -> list[LimitChange]:
    """The rule's limit changes, oldest first (a change's params after it are the
    next one's `before`, or the rule's params now: `steps`)."""
    cur = await conn.execute(
        HISTORY_SQL, {"account": account_id, "rule": rule_id, "channel": channel_id}
    )
    return [c for row in await cur.fetchall() if (c := _change(*row[:4])) is not None]


class Step(NamedTuple):
    since: datetime | None  # None: from the beginning (a default rule)
    params: dict[str, Any] | None  # None: no such rule yet (`made`)


def made(changes: list[LimitChange], is_default: bool, created_at: datetime) -> list[LimitChange]:
    """`changes` with the rule's making in front when no row records it: a channel's
    default rule holds from the channel's beginning (nothing added); any other rule
    from its `created_at` (one made before the audit trail recorded rules, or by hand)."""
    if is_default or any(c.made for c in changes):
        return changes
    if changes and changes[0].at < created_at:
        return changes
    return [LimitChange(created_at, "", True, {}), *changes]


def steps(changes: list[LimitChange], current: dict[str, Any]) -> list[Step]:
    """The rule's params over time, oldest first: one step before the changes, then
    one at each (made by its `actor`). `current`: the rule's params now."""
    out: list[Step] = []
    # walk back from the params in force now
    params: dict[str, Any] | None = current
    for c in reversed(changes):
        out.append(Step(c.at, params))
        params = None if c.made else c.before
    out.append(Step(None, params))
    out.reverse()
    return out
