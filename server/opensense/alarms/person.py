"""A person's step on an event (acknowledge or clear, with the corrective-action
note), shared by the API (`POST /v1/events/{id}/ack|clear`) and the dashboard's
forms (web/channel.py): the same validation, the same messages, the same
transaction and audit row (lifecycle.transition)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from ..errors import ApiError
from . import store
from .lifecycle import Change, transition

NOTE_FIELDS = ("note", "cause", "action", "product")


def text(body: Any, key: str, required: bool = False, limit: int = 2000) -> str | None:
    v = body.get(key)
    if v is None:
        if required:
            raise ApiError("invalid_request", f"{key} is required")
        return None
    if not isinstance(v, str) or (required and not v.strip()) or len(v) > limit:
        raise ApiError("invalid_request", f"{key} must be text of 1..{limit} characters")
    return v


def note(body: Any) -> dict[str, str | None]:
    """The corrective-action note: `note` (required), `cause`, `action` (on the
    equipment), `product` (what happened to it)."""
    return {
        "note": text(body, "note", required=True),
        "cause": text(body, "cause"),
        "action": text(body, "action"),
        "product": text(body, "product"),
    }


async def step(
    conn: AsyncConnection[Any],
    what: str,
    acc: str,
    event_id: str,
    by: str,
    note: dict[str, str | None],
    via: str,
    now: datetime,
) -> dict[str, Any]:
    """Acknowledge (`ack`) or clear (`clear`) one of the account's events in one
    transaction; a clear also locks the channel's state first and resets its rule's
    state. Returns the event row; ApiError event_not_found / event_state."""
    async with conn.transaction():
        if what == "clear":
            before = await store.event(conn, acc, event_id)
            if before is None:
                raise ApiError("event_not_found", f"no event {event_id[:40]!r} in this account")
            await store.lock_channel_state(conn, before["channel_id"])
            event_id = before["id"]
        ev = await transition(
            conn,
            Change(what, now, now, account_id=acc, event_id=event_id, actor=by, note=note,
                   via=via),
        )  # fmt: skip
        if what == "clear" and ev["rule_id"]:
            await store.reset_rule_state(conn, ev["channel_id"], ev["rule_id"])
    return ev
