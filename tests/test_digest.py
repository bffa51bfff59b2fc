"""The daily email digest (docs/alarms.md, "Daily digest"): one plain-text email per
confirmed email recipient and day, at 07:00 site time about the day before, with each
channel's min / max / mean, the day's alarm events and their notes, the devices
offline and the notifications sent; never to an unconfirmed or unsubscribed
recipient, once however often or by how many processes the job runs, and nothing of
another tenant."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg_pool import AsyncConnectionPool

from opensense.alarms import digest, evaluator
from opensense.alarms.lifecycle import Change, transition
from opensense.devices import store as service
from opensense.ids import new_id
from opensense.jobs import JOBS
from opensense.storage import write

from .fixtures.clock import FakeClock
from .fixtures.processes import free_port
from .fixtures.server import make_world, test_config

BERLIN = ZoneInfo("Europe/Berlin")
DAY = date(2026, 11, 20)


def local(h: int, mi: int = 0, d: date = DAY) -> datetime:
    return datetime(d.year, d.month, d.day, h, mi, tzinfo=BERLIN).astimezone(UTC)


async def _tenant(dsn: str, cfg: Any, name: str, base: float, note: str) -> dict[str, Any]:
    """A tenant whose site (Berlin) had on DAY readings every 5 minutes on fridge01
    (base + a small wave; 10:00-11:00 local at 9.0 with one 10.5: an excursion over
    the rule's 6.0, acknowledged with `note`), and readings the hours around the
    day (outside it); fridge02 offline 03:00-04:10."""
    w = await make_world(dsn, cfg, ("fridge01", "fridge02"))
    tag = secrets.token_hex(4)
    day_vals: list[float] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute("UPDATE sites SET name = %s WHERE id = %s", (name, w.site))
            chans = {}
            for dev in ("fridge01", "fridge02"):
                cur = await conn.execute(
                    "INSERT INTO channels (id, sensor_id, account_id, device_id, kind, label,"
                    " unit, name) VALUES (%s, %s, %s, %s, 'temperature', '', '°C', 'Kühlzelle')"
                    " RETURNING id, num",
                    (f"chn_{dev}{tag}", f"snr_{dev}{tag}", w.account, w.device_ids[dev]),
                )
                chans[dev] = await cur.fetchone()
            cid, num = chans["fridge01"]
            await conn.execute(
                "INSERT INTO rules (id, channel_id, kind, params, grace_min, created_at)"
                " VALUES (%s, %s, 'range', '{\"ok_min\": 0, \"ok_max\": 6}', 15, '2026-10-01')",
                (f"rul_{tag}", cid),
            )
            rows = []
            t, k = local(21, 0, DAY - timedelta(days=1)), 0
            while t < local(3, 0, DAY + timedelta(days=1)):
                v = base + (k % 7) / 10
                if local(10) <= t < local(11):
                    v = 10.5 if t == local(10, 30) else 9.0
                if not local(0) <= t < local(0, 0, DAY + timedelta(days=1)):
                    v = base + 1.55  # outside the day: in no figure
                else:
                    day_vals.append(v)
                rows.append((num, t, v))
                t += timedelta(minutes=5)
                k += 1
            await write.insert_readings(
                conn, rows, now=datetime(2026, 11, 21, tzinfo=UTC), compact_after_days=400
            )
            # fridge02 was offline from 03:00 to 04:10
            await conn.execute(
                "INSERT INTO events (id, account_id, channel_id, kind, state, started_at,"
                " cleared_at, cleared_by, device_id) VALUES (%s, %s, %s, 'device_offline',"
                " 'cleared', %s, %s, 'system', %s)",
                (new_id("evt"), w.account, chans["fridge02"][0], local(3), local(4, 10),
                 w.device_ids["fridge02"]),
            )  # fmt: skip
    return {"world": w, "channel": cid, "values": day_vals, "note": note, "name": name}


async def _judge_and_ack(dsn: str, t: dict[str, Any], now: datetime) -> str:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
        while (await evaluator.evaluate_dirty(pool, now, budget_s=60)).channels:
            pass
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT id FROM events WHERE channel_id = %s", (t["channel"],))
            [(event_id,)] = await cur.fetchall()
            await transition(
                conn,
                Change("ack", local(10, 40), now, account_id=t["world"].account,
                       event_id=event_id, actor="anna",
                       note={"note": t["note"], "action": "Goods moved"}),
            )  # fmt: skip
            # two notifications delivered that day, one attempt failed, one a day earlier
            for status, at in (("ok", local(10, 16)), ("ok", local(10, 20)),
                               ("failed", local(10, 17)), ("ok", local(12, 0, DAY - timedelta(days=1)))):  # fmt: skip
                await conn.execute(
                    "INSERT INTO outbound_log (account_id, path, target, event_id, kind,"
                    " status, at) VALUES (%s, 'telegram', '1', %s, 'alarm_opened', %s, %s)",
                    (t["world"].account, event_id, status, at),
                )
    return str(event_id)


async def _target(conn: Any, acc: str, address: str, verified: bool = True, **kw: Any) -> str:
    tid = new_id("tgt")
    await conn.execute(
        "INSERT INTO notify_targets (id, account_id, site_id, path, address, verified, token,"
        " created_at, deleted_at) VALUES (%s, %s, %s, 'email', %s, %s, %s, %s, %s)",
        (tid, acc, kw.get("site"), address, verified, f"tok{secrets.token_hex(8)}",
         local(12), kw.get("deleted_at")),
    )  # fmt: skip
    return tid


def _text(m: Any) -> str:
    return str(m.get_payload(decode=True).decode()).replace("\r\n", "\n")


async def test_one_digest_per_confirmed_recipient_with_the_days_figures_and_notes(
    dsn: str, smtp: Any
) -> None:
    assert "daily_digest" in {j.name for j in JOBS}
    clock = FakeClock(local(6, 59, DAY + timedelta(days=1)))
    cfg = test_config(
        clock, smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_tls="none",
        public_url="https://opensense.test",
    )  # fmt: skip
    ours = await _tenant(dsn, cfg, "Kitchen North", 3.0, "Door left open by the delivery")
    theirs = await _tenant(dsn, cfg, "Other Tenant Bakery", 2.0, "SECRET other tenant note")
    now = local(7, 0, DAY + timedelta(days=1))
    await _judge_and_ack(dsn, ours, now)
    await _judge_and_ack(dsn, theirs, now)
    acc, other = ours["world"].account, theirs["world"].account
    tag = secrets.token_hex(3)
    addr = {k: f"{k}-{tag}@example.com" for k in ("chef", "new", "gone", "scoped", "rival")}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        second = await service.create_site(
            conn, acc, {"name": "Kitchen South", "vertical": "chilled_storage",
                        "timezone": "Europe/Berlin"},
        )  # fmt: skip
        await _target(conn, acc, addr["chef"])
        await _target(conn, acc, addr["new"], verified=False)  # never confirmed
        await _target(conn, acc, addr["gone"], deleted_at=local(9))  # unsubscribed
        await _target(conn, acc, addr["scoped"], site=second["id"])  # the second site only
        await _target(conn, other, addr["rival"])
        cur = await conn.execute(
            "SELECT acknowledged_by FROM events WHERE channel_id = %s", (ours["channel"],)
        )
        (acked_by,) = await cur.fetchone()  # type: ignore[misc]

        # 06:59 in Berlin: not yet (and the day before's went out before they were added)
        line = await digest.run(conn, cfg, clock())
        assert line.startswith("0 digest(s) planned"), line
        assert not [m for m in smtp.messages if tag in m["X-Rcpt"]]

        # 07:00: two processes run the job at once; then it runs again, and again later
        clock.now = now
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn2:
            await asyncio.gather(digest.run(conn, cfg, now), digest.run(conn2, cfg, now))
        await digest.run(conn, cfg, now)
        clock.advance(hours=5)
        await digest.run(conn, cfg, clock())
        cur = await conn.execute(
            "SELECT t.address, m.day, m.status, m.attempts FROM digest_mail m"
            " JOIN notify_targets t ON t.id = m.target_id WHERE t.address LIKE %s ORDER BY 1",
            (f"%-{tag}@example.com",),
        )
        rows = await cur.fetchall()
        assert rows == sorted((addr[k], DAY, "sent", 1) for k in ("chef", "scoped", "rival"))
        cur = await conn.execute(
            "SELECT count(*) FROM outbound_log WHERE kind = 'daily_digest' AND status = 'ok'"
            " AND account_id = %s",
            (acc,),
        )
        assert (await cur.fetchone()) == (2,)

    got = {k: [m for m in smtp.messages if addr[k] in m["X-Rcpt"]] for k in addr}
    assert {k: len(v) for k, v in got.items()} == {
        "chef": 1, "new": 0, "gone": 0, "scoped": 1, "rival": 1
    }  # fmt: skip
    chef, scoped, rival = _text(got["chef"][0]), _text(got["scoped"][0]), _text(got["rival"][0])
    assert got["chef"][0]["Subject"] == "[OpenSense] Daily digest 2026-11-20: 1 alarm event(s)"
    assert (
        str(got["chef"][0]["List-Unsubscribe"])
        .strip()
        .startswith("<https://opensense.test/v1/unsubscribe?token=tok")
    )
    assert "Stop these emails: https://opensense.test/v1/unsubscribe?token=tok" in chef

    # the figures, recomputed from the readings of the Berlin day (288 of 5 minutes)
    vals = ours["values"]
    assert len(vals) == 288
    lo, hi, mean = min(vals), max(vals), sum(vals) / len(vals)
    assert f"- fridge01 · Kühlzelle: {lo:.2f} / {hi:.2f} / {mean:.2f} °C (288 readings)" in chef
    assert "- fridge02 · Kühlzelle: no readings" in chef
    assert "== Kitchen North (2026-11-20, Europe/Berlin) ==" in chef
    assert "== Kitchen South (2026-11-20, Europe/Berlin) ==" in chef
    # the excursion: opened after 15 min of grace, acknowledged with its note, cleared
    # 15 min after the readings came back
    assert (
        "- fridge01 · Kühlzelle: range alarm, worst 10.50 °C; opened 10:15; acknowledged 10:40"
        f' by {acked_by}: "Door left open by the delivery" (action: Goods moved);'
        " cleared 11:15 by system" in chef
    ), chef
    assert "Devices offline: 1\n- fridge02: offline from 03:00, back 04:10" in chef
    assert "Notifications sent: 2" in chef
    # the site-scoped recipient hears of its site only
    assert "Kitchen South" in scoped and "Kitchen North" not in scoped
    assert "Alarm events: none" in scoped and "Notifications sent: 0" in scoped
    # nothing crosses tenants either way
    for leak in ("Other Tenant Bakery", "SECRET other tenant note"):
        assert leak not in chef and leak not in scoped
    assert "Kitchen" not in rival and "Door left open" not in rival
    assert "SECRET other tenant note" in rival
    theirs_vals = theirs["values"]
    assert f"{sum(theirs_vals) / len(theirs_vals):.2f} °C (288 readings)" in rival


async def test_a_day_is_due_at_the_sites_hour_and_off_means_nothing_is_sent(
    dsn: str, smtp: Any
) -> None:
    # the latest due day, in wall-clock time across the autumn DST change
    assert digest.due_day(datetime(2026, 10, 25, 5, 59, tzinfo=UTC), "Europe/Berlin", 7) == date(
        2026, 10, 23
    )
    assert digest.due_day(datetime(2026, 10, 25, 6, 0, tzinfo=UTC), "Europe/Berlin", 7) == date(
        2026, 10, 24
    )
    assert digest.due_day(datetime(2026, 11, 21, 11, 59, tzinfo=UTC), "America/New_York", 7) == (
        date(2026, 11, 19)
    )
    clock = FakeClock(local(8, 0, DAY + timedelta(days=1)))
    cfg = test_config(clock, smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_tls="none",
                      daily_digest=False)  # fmt: skip
    w = await make_world(dsn, cfg, ())
    tag = secrets.token_hex(3)
    late, left = f"late-{tag}@example.com", f"left-{tag}@example.com"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await _target(conn, w.account, late)
        leaving = await _target(conn, w.account, left)
        assert await digest.run(conn, cfg, clock()) == "skipped: OPENSENSE_DAILY_DIGEST is off"
        assert not smtp.messages
        # on, but the relay cannot be reached: retried later through the same code
        down = cfg.replace(daily_digest=True, smtp_port=free_port())
        assert await digest.plan(conn, down, clock()) >= 2
        # one recipient unsubscribes before its digest goes out: dropped, never sent
        await conn.execute("UPDATE notify_targets SET deleted_at = now() WHERE id = %s", (leaving,))
        await digest.send_due(conn, down, clock())

        async def row(address: str) -> tuple[Any, ...]:
            cur = await conn.execute(
                "SELECT m.status, m.attempts, m.next_at FROM digest_mail m JOIN notify_targets t"
                " ON t.id = m.target_id WHERE t.address = %s",
                (address,),
            )
            return await cur.fetchone()  # type: ignore[return-value]

        assert await row(late) == ("pending", 1, clock() + digest.MAIL_BACKOFF)
        assert (await row(left))[:2] == ("dropped", 1)
        clock.advance(minutes=4)
        await digest.run(conn, cfg.replace(daily_digest=True), clock())
        assert not smtp.messages  # not due yet
        clock.advance(minutes=1)
        await digest.run(conn, cfg.replace(daily_digest=True), clock())
        assert (await row(late))[:2] == ("sent", 2)
        cur = await conn.execute(
            "SELECT status FROM outbound_log WHERE account_id = %s AND kind = 'daily_digest'",
            (w.account,),
        )
        assert sorted(r[0] for r in await cur.fetchall()) == ["dropped", "failed", "ok"]
    assert [m["X-Rcpt"] for m in smtp.messages] == [late]
