"""`opensense status` and `opensense incident`: the operator's commands.

`opensense status` measures once, as a server process would, without a heartbeat of
its own: run from a timer (systemd, cron) on a host apart from the server, it is
the watchdog that still opens "dashboard down" when no server process is alive.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from ..api.jsonutil import dumps
from ..settings import Config
from . import incidents
from .health import Health
from .monitor import StatusMonitor
from .observe import Observer


def _pool(dsn: str) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=2,
        open=False,
        kwargs={"autocommit": True, "options": "-c timezone=UTC"},
    )


def cmd_status(cfg: Config, dsn: str, args: argparse.Namespace) -> int:
    async def go() -> StatusMonitor:
        async with _pool(dsn) as pool:
            mon = StatusMonitor(cfg, pool, Observer(), Health(cfg.clock), heartbeat=False)
            await mon.tick()
            return mon

    mon = asyncio.run(go())
    snap = mon.snapshot
    if args.json:
        print(json.dumps(json.loads(snap.json_bytes), indent=2, ensure_ascii=False))
    else:
        print(f"overall: {snap.public['overall']}" + ("  (STALE)" if snap.stale else ""))
        for c in snap.public["components"]:
            up = c["uptime_90d"]
            upt = "   n/a " if up is None else f"{up * 100:6.2f}%"
            print(f"  {c['state']:<12} {upt}  {c['name']}: {c['detail']}")
        for f in snap.firing:
            print(
                f"firing: {f.ident} ({f.condition.klass}) since {f.since:%Y-%m-%d %H:%M}Z: {f.detail}"
            )
        for row, ups in snap.incidents:
            if row["resolved_at"] is None:
                view = incidents.present(row, ups, mon.tz, cfg.clock())
                due = view["next_due"]
                when = (
                    f"; {due['what']} due {due['at']:%Y-%m-%d %H:%M}Z"
                    + (" OVERDUE" if due["overdue"] else "")
                    if due
                    else ""
                )
                print(f"open: {row['id']} {row['class']} {row['title']} ({row['status']}{when})")
    if args.check and (snap.firing or snap.stale):
        return 1
    return 0


def cmd_incident(cfg: Config, dsn: str, args: argparse.Namespace) -> int:
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(cfg.status_business_tz)
    now = cfg.clock()
    author = args.author or getpass.getuser()
    text = Path(args.file).read_text() if getattr(args, "file", None) else args.text

    async def go() -> Any:
        async with _pool(dsn) as pool, pool.connection() as conn, conn.transaction():
            a = args.action
            if a == "list":
                rows = await incidents.list_all(conn, open_only=args.open)
                return [incidents.present(r, u, tz, now) for r, u in rows]
            if a == "open":
                iid = await incidents.open_incident(
                    conn,
                    now,
                    klass=args.klass,
                    title=args.title,
                    body=args.body,
                    author=author,
                    component=args.component,
                    affected=args.account or None,
                )
                assert iid is not None
                args.id = iid
            elif a == "ack":
                await incidents.acknowledge(conn, args.id, now, author, args.body or "")
            elif a == "update":
                await incidents.post_update(conn, args.id, now, author, args.status, args.body)
            elif a == "resolve":
                await incidents.resolve(conn, args.id, now, author, args.body)
            elif a == "postmortem":
                await incidents.set_postmortem(conn, args.id, now, author, text)
            row, ups = await incidents.get(conn, args.id)
            return incidents.present(row, ups, tz, now)

    print(json.dumps(json.loads(dumps(asyncio.run(go()))), indent=2, ensure_ascii=False))
    return 0


def add_parsers(sub: Any, run_status: Any, run_incident: Any) -> None:
    s = sub.add_parser(
        "status",
        help="measure once and print the status page (the watchdog: run it from a timer)",
    )
    s.add_argument("--json", action="store_true", help="print /status.json")
    s.add_argument(
        "--check", action="store_true", help="exit 1 when a condition fires or the database fails"
    )
    s.set_defaults(fn=run_status)

    s = sub.add_parser("incident", help="incidents: list, open, ack, update, resolve, postmortem")
    s.add_argument(
        "action", choices=["list", "show", "open", "ack", "update", "resolve", "postmortem"]
    )
    s.add_argument("id", nargs="?", help="inc_ id (show, ack, update, resolve, postmortem)")
    s.add_argument("--open", action="store_true", help="list: open incidents only")
    s.add_argument("--class", dest="klass", choices=["P0", "P1", "P2"], default="P1")
    s.add_argument("--title")
    s.add_argument("--body", help='the update text ("Still investigating." is a valid update)')
    s.add_argument(
        "--status", choices=["investigating", "identified", "monitoring"], help="update: new status"
    )
    s.add_argument("--component")
    s.add_argument(
        "--account", action="append", help="open: an affected account (repeat); default: all"
    )
    s.add_argument("--text", help="postmortem: the text")
    s.add_argument("--file", help="postmortem: read the text from this file")
    s.add_argument("--author", help="who speaks (default: the login name)")
    s.set_defaults(fn=run_incident)


def check_args(args: argparse.Namespace) -> str | None:
    """What is missing for this incident action, or None."""
    a = args.action
    if a in ("show", "ack", "update", "resolve", "postmortem") and not args.id:
        return f"incident {a} needs the inc_ id"
    if a == "open" and not (args.title and args.body):
        return "incident open needs --title and --body"
    if a in ("update", "resolve") and not args.body:
        return f"incident {a} needs --body"
    if a == "postmortem" and not (args.text or args.file):
        return "incident postmortem needs --text or --file"
    return None
