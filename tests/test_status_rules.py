"""Self-watching conditions, component states and incident clocks: pure functions of
samples and time, tested with explicit times (no server, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from opensense.status import cadence, components
from opensense.status.conditions import BY_NAME, CONDITIONS, Sample, evaluate
from opensense.status.health import merge
from opensense.status.observe import LATENCY_BUCKETS, bucket_of, quantile_bound, share_above

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)  # a Tuesday
BERLIN = ZoneInfo("Europe/Berlin")


def ingest(req: int, err: int, slow: float = 0.0, req5: int | None = None) -> dict:
    return {
        "ingest": {
            "requests_2m": req,
            "errors_5xx_2m": err,
            "requests_5m": req * 2 if req5 is None else req5,
            "slow_share_5m": slow,
        }
    }


def run(figs: list[tuple[float, dict]]) -> list[Sample]:
    """(minutes after T0, figures) -> samples."""
    return [Sample(T0 + timedelta(minutes=m), f) for m, f in figs]


def names(firing) -> set[str]:
    return {f.ident for f in firing}


def test_ingest_5xx_fires_only_after_five_sustained_minutes():
    samples = run([(m / 2, ingest(100, 80)) for m in range(0, 11)])  # every 30 s, 0..5 min
    assert names(evaluate(samples[:10], T0 + timedelta(minutes=4.5))) == set()
    fired = evaluate(samples, T0 + timedelta(minutes=5))
    assert names(fired) == {"ingest_5xx"}
    assert fired[0].condition.klass == "P1"
    assert fired[0].since == T0
    assert "80 of 100" in fired[0].detail


def test_a_good_sample_or_a_gap_restarts_the_run():
    bad = ingest(100, 80)
    good = ingest(100, 0)
    samples = run([(0, bad), (1, bad), (2, good), (3, bad), (4, bad), (5, bad), (6, bad)])
    assert evaluate(samples, T0 + timedelta(minutes=6)) == []  # bad since minute 3 only
    assert names(evaluate(samples + run([(8, bad)]), T0 + timedelta(minutes=8))) == {"ingest_5xx"}
    # a gap of more than MAX_GAP (the server was down) breaks the run
    gap = run([(0, bad), (1, bad), (2, bad), (6, bad), (7, bad)])
    assert evaluate(gap, T0 + timedelta(minutes=7)) == []


def test_few_5xx_are_not_an_incident_and_stale_samples_say_nothing():
    samples = run([(m, ingest(100, 10)) for m in range(10)])
    assert evaluate(samples, T0 + timedelta(minutes=9)) == []
    bad = run([(m, ingest(100, 90)) for m in range(10)])
    assert evaluate(bad, T0 + timedelta(minutes=30)) == []  # newest sample too old


def test_dispatch_path_failing_uses_its_own_age_and_names_the_path():
    fig = {
        "dispatch": {
            "telegram": {
                "attempts_5m": 7,
                "failed_5m": 7,
                "failing_for_s": 400.0,
                "last_error": "x",
            },
            "email": {"attempts_5m": 5, "failed_5m": 4, "failing_for_s": None},
            "webhook": None,
        }
    }
    fired = evaluate(run([(0, fig)]), T0)
    assert names(fired) == {"dispatch_failing:telegram"}
    f = fired[0]
    assert f.component == "dispatch_telegram" and f.title == "Alarm dispatch by telegram is failing"
    assert f.since == T0 - timedelta(seconds=400)
    # failing for less than 5 minutes: not yet
    fig["dispatch"]["telegram"]["failing_for_s"] = 200.0
    assert evaluate(run([(0, fig)]), T0) == []


def test_dashboard_down_for_15_minutes_from_the_heartbeat_age():
    fig = {"processes": {"alive": 0, "newest_age_s": 14 * 60.0}}
    assert evaluate(run([(0, fig)]), T0) == []
    fig = {"processes": {"alive": 0, "newest_age_s": 16 * 60.0}}
    assert names(evaluate(run([(0, fig)]), T0)) == {"dashboard_down"}


def test_rollups_behind_fires_after_fifteen_sustained_minutes():
    behind = {"ingest": {"rollups_behind_s": 45 * 60.0}}
    fine = {"ingest": {"rollups_behind_s": 8 * 60.0}}
    assert evaluate(run([(m, behind) for m in range(0, 15)]), T0 + timedelta(minutes=14)) == []
    fired = evaluate(run([(m, behind) for m in range(0, 16)]), T0 + timedelta(minutes=15))
    assert names(fired) == {"rollups_behind"} and "45 minutes ago" in fired[0].detail
    assert evaluate(run([(m, fine) for m in range(0, 30)]), T0 + timedelta(minutes=29)) == []


def test_slow_ingest_slow_report_old_backup_and_audit():
    assert names(evaluate(run([(0, ingest(50, 0, slow=0.02, req5=50))]), T0)) == {"ingest_slow"}
    assert evaluate(run([(0, ingest(5, 0, slow=0.5, req5=5))]), T0) == []  # too few answers
    rep = {"reports": {"slowest_monthly_s": 150.0, "slowest_id": "rpt_x"}}
    fired = evaluate(run([(0, rep)]), T0)
    assert names(fired) == {"report_slow"} and fired[0].condition.klass == "P2"
    assert "rpt_" not in fired[0].detail  # public text: no tenant ids
    old = {"backups": {"available": True, "max_age_s": 7200, "last_good_age_s": 9000.0}}
    assert names(evaluate(run([(0, old)]), T0)) == {"backup_old"}
    never = {
        "backups": {
            "available": True,
            "max_age_s": 7200,
            "last_good_age_s": None,
            "monitoring_for_s": 100.0,
        }
    }
    assert evaluate(run([(0, never)]), T0) == []  # just installed
    never["backups"]["monitoring_for_s"] = 8000.0
    assert names(evaluate(run([(0, never)]), T0)) == {"backup_old"}
    off = {"backups": {"available": True, "max_age_s": 0, "last_good_age_s": 1e9}}
    assert evaluate(run([(0, off)]), T0) == []
    absent = {"backups": {"available": False, "max_age_s": 7200}}
    assert evaluate(run([(0, absent)]), T0) == []
    audit = {"health": {"audit": {"ok": False, "detail": "row 7 broke", "at": ""}}}
    fired = evaluate(run([(0, audit)]), T0)
    assert names(fired) == {"audit_integrity"} and fired[0].condition.klass == "P0"


def test_conditions_cover_the_product_thresholds():
    assert {c.name for c in CONDITIONS} >= {
        "ingest_5xx",
        "dispatch_failing",
        "dashboard_down",
        "ingest_slow",
        "report_slow",
        "backup_old",
    }
    assert BY_NAME["ingest_5xx"].sustain == timedelta(minutes=5)
    assert BY_NAME["dispatch_failing"].sustain == timedelta(minutes=5)
    assert BY_NAME["dashboard_down"].sustain == timedelta(minutes=15)
    assert {BY_NAME[n].klass for n in ("ingest_5xx", "dispatch_failing", "dashboard_down")} == {
        "P1"
    }
    assert {BY_NAME[n].klass for n in ("ingest_slow", "report_slow")} == {"P2"}


# --- components -----------------------------------------------------------------------


def test_component_states_from_figures_and_firing():
    f = {
        "database": {"ok": True, "latency_ms": 1.0},
        "processes": {"alive": 2, "newest_age_s": 1.0},
        "health": {},
        "mqtt_mode": "off",
        "ingest": {"requests_2m": 10, "errors_5xx_2m": 0, "requests_5m": 20, "slow_share_5m": 0.0},
        "dispatch": {
            "telegram": {"attempts_5m": 3, "failed_5m": 3},
            "email": None,
            "webhook": {"attempts_5m": 0, "failed_5m": 0},
        },
        "reports": {},
        "backups": {"available": False},
        "gateways": None,
    }
    st = components.states(f)
    assert st["database"][0] == "operational"
    assert st["dispatch_telegram"][0] == "outage"
    assert st["dispatch_email"][0] == "unknown"  # no outbound_log on this server
    assert st["dispatch_webhook"][0] == "operational"
    assert st["backups"][0] == "unknown" and st["gateways"][0] == "unknown"
    assert st["rule_engine"][0] == "unknown"  # nobody reported into the registry yet
    f["health"] = {"rule_engine": {"ok": True, "detail": "", "at": ""}}
    assert components.states(f)["rule_engine"][0] == "operational"
    slow = evaluate(run([(0, {**f, **ingest(50, 0, slow=0.5, req5=50)})]), T0)
    assert components.states(f, slow)["ingest_http"][0] == "degraded"
    # the database gone: nothing else could be measured
    down = components.states({**f, "database": {"ok": False}})
    assert down["database"][0] == "outage" and down["ingest_http"][0] == "unknown"


def test_health_merge_failure_anywhere_wins():
    a = {"rule_engine": {"ok": True, "detail": "", "at": "1"}}
    b = {
        "rule_engine": {"ok": False, "detail": "boom", "at": "2"},
        "mqtt": {"ok": True, "detail": "", "at": "2"},
    }
    m = merge([a, b])
    assert m["rule_engine"]["ok"] is False and m["rule_engine"]["detail"] == "boom"
    assert m["mqtt"]["ok"] is True


def test_latency_buckets_make_p99_over_2s_exact():
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for s in [0.003] * 98 + [2.5, 3.0]:
        counts[bucket_of(s)] += 1
    assert share_above(counts, 2.0) == pytest.approx(0.02)
    assert quantile_bound(counts, 0.99) == 5.0
    assert bucket_of(2.0) == LATENCY_BUCKETS.index(2.0)  # 2.0 s itself is not "over 2 s"


# --- incident clocks -------------------------------------------------------------------


def test_business_hours_skip_nights_and_weekends():
    fri_16 = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)  # 16:00 Berlin, a Friday
    got = cadence.add_business_hours(fri_16, 4, BERLIN)
    assert got.astimezone(BERLIN) == datetime(2026, 11, 30, 12, 0, tzinfo=BERLIN)  # Monday
    sat = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert cadence.add_business_hours(sat, 1, BERLIN).astimezone(BERLIN) == datetime(
        2026, 11, 30, 10, 0, tzinfo=BERLIN
    )


def test_what_is_due_follows_the_product_cadence():
    opened = T0
    due = cadence.next_due("P1", opened, None, None, None, False, BERLIN)
    assert due == cadence.Due("acknowledgement", opened + timedelta(minutes=30))
    ack = opened + timedelta(minutes=10)
    due = cadence.next_due("P1", opened, ack, ack, None, False, BERLIN)
    assert due == cadence.Due("update", ack + timedelta(hours=1))
    # "still investigating" posted at +70 min restarts the hour
    upd = opened + timedelta(minutes=70)
    assert cadence.next_due("P1", opened, ack, upd, None, False, BERLIN).at == upd + timedelta(
        hours=1
    )
    # P2: 4 business hours to acknowledge, a business day between updates
    due = cadence.next_due("P2", opened, None, None, None, False, BERLIN)
    assert due.what == "acknowledgement" and due.at == cadence.add_business_hours(opened, 4, BERLIN)
    # resolved P1 lasting > 1 h owes a post-mortem; a short one does not
    long_ = cadence.next_due("P1", opened, ack, ack, opened + timedelta(hours=2), False, BERLIN)
    assert long_ is not None and long_.what == "post-mortem"
    assert (
        cadence.next_due("P1", opened, ack, ack, opened + timedelta(minutes=30), False, BERLIN)
        is None
    )
    assert (
        cadence.next_due("P0", opened, ack, ack, opened + timedelta(minutes=30), False, BERLIN).what
        == "post-mortem"
    )
    assert (
        cadence.next_due("P0", opened, ack, ack, opened + timedelta(minutes=30), True, BERLIN)
        is None
    )
    assert cadence.resolution_target("P0", opened, BERLIN) is None
    assert cadence.resolution_target("P1", opened, BERLIN) == opened + timedelta(hours=8)


def test_status_settings_are_checked_at_start():
    from opensense.settings import Config

    with pytest.raises(ValueError, match="OPENSENSE_STATUS_INTERVAL_S=61"):
        Config(status_interval_s=61)
    with pytest.raises(ValueError, match="OPENSENSE_ROLE"):
        Config(role="ingest")
    with pytest.raises(ValueError, match="OPENSENSE_STATUS_BUSINESS_TZ"):
        Config(status_business_tz="Mars/Olympus")
    with pytest.raises(ValueError, match="OPENSENSE_STATUS_BACKUP_MAX_AGE_H"):
        Config(status_backup_max_age_h=-1)


def test_incident_smtp_url_forms():
    from opensense.status.mail import SmtpPath

    p = SmtpPath.parse("smtps://alerts%40x.org:p%2Fw@mail.example:2465")
    assert (p.host, p.port, p.username, p.password, p.use_tls) == (
        "mail.example",
        2465,
        "alerts@x.org",
        "p/w",
        True,
    )
    p = SmtpPath.parse("smtp://relay.example?starttls=1")
    assert (p.port, p.use_tls, p.start_tls, p.username) == (25, False, True, None)
    with pytest.raises(ValueError, match="smtp"):
        SmtpPath.parse("http://mail.example")


def test_reminders_repeat_while_overdue():
    due = T0
    assert cadence.reminder_slot("P1", due, T0 - timedelta(minutes=1)) is None
    assert cadence.reminder_slot("P1", due, T0) == T0
    assert cadence.reminder_slot("P1", due, T0 + timedelta(minutes=29)) == T0
    assert cadence.reminder_slot("P1", due, T0 + timedelta(minutes=31)) == T0 + timedelta(
        minutes=30
    )
    assert cadence.reminder_slot("P2", due, T0 + timedelta(hours=5)) == T0 + timedelta(hours=4)
