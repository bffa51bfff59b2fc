"""The gateway's pure parts: local alarm rules (range with grace, absence on an
injected clock), the retry rule, payload reading, batch grouping, broker files."""

from __future__ import annotations

import json

import pytest

from opensense_contract import retry, topics
from opensense_gateway import mosquitto, payload, rules
from opensense_gateway.uplink import group

CHILLED = rules.Rule(
    "rul_1", "fridge01", "temperature", "", "range", {"ok_min": -2, "ok_max": 5}, 15
)


def feed(rule: rules.Rule, series: list[tuple[float, float]]) -> list[rules.Event]:
    st, out = rules.State(), []
    for ts, v in series:
        st, ev = rules.step_range(rule, st, ts, v)
        if ev:
            out.append(ev)
    return out


def test_range_alarm_opens_within_grace_plus_one_cadence():
    # 1-minute cadence; too warm from minute 10 on
    series = [(60.0 * m, 4.0 if m < 10 else 8.0) for m in range(40)]
    (ev,) = feed(CHILLED, series)
    assert ev.what == "open" and ev.value == 8.0
    assert 15 * 60 <= ev.at - 600 <= 15 * 60 + 60


def test_shorter_than_grace_is_no_alarm_and_back_in_range_clears():
    short = [(60.0 * m, 8.0 if 10 <= m < 20 else 4.0) for m in range(60)]
    assert feed(CHILLED, short) == []
    long = [(60.0 * m, 8.0 if 10 <= m < 40 else 4.0) for m in range(60)]
    opened, cleared = feed(CHILLED, long)
    assert (opened.what, cleared.what) == ("open", "clear") and cleared.at == 40 * 60


def test_grace_zero_fires_on_the_first_bad_reading_and_resends_are_ignored():
    rule = rules.Rule("r", None, "temperature", None, "range", {"ok_max": 5}, 0)
    st, ev = rules.step_range(rule, rules.State(), 100.0, 9.0)
    assert ev is not None and ev.at == 100.0
    again, ev2 = rules.step_range(rule, st, 100.0, 9.0)  # the same reading again
    assert ev2 is None and again == st


def test_absence_on_an_injected_clock():
    rule = rules.Rule("r", None, "temperature", None, "absence", {"max_gap_s": 300}, 5)
    heard = 1000.0
    st = rules.State()
    for now in (1000.0, 1300.0, 1600.0):  # limit is 300 s + 5 min grace = 600 s
        st, ev = rules.check_absence(rule, st, heard, now)
        assert ev is None
    st, ev = rules.check_absence(rule, st, heard, 1601.0)
    assert ev is not None and ev.what == "open" and ev.at == 1601.0
    st, ev = rules.check_absence(rule, st, 1700.0, 1701.0)
    assert ev is not None and ev.what == "clear"


def test_channel_rules_beat_site_defaults():
    doc = {
        "rules": [
            dict(
                id="rul_1",
                device="fridge01",
                type="temperature",
                label="",
                kind="range",
                params={"ok_max": 8},
                grace_min=30,
            )
        ],
        "defaults": [dict(type="temperature", kind="range", params={"ok_max": 5}, grace_min=15)],
    }
    rs = rules.rules_from_sync(doc)
    assert [r.id for r in rules.rules_for(rs, "fridge01", "temperature", "")] == ["rul_1"]
    assert [r.id for r in rules.rules_for(rs, "fridge02", "temperature", "")] == [
        "default:temperature"
    ]
    assert rules.rules_for(rs, "fridge02", "humidity", "") == []


@pytest.mark.parametrize(
    "attempt,lo,hi", [(0, 0.5, 1), (1, 1, 2), (2, 2, 4), (5, 16, 32), (6, 30, 60), (20, 30, 60)]
)
def test_backoff_from_1s_doubling_capped_at_60s_with_jitter(attempt, lo, hi):
    assert retry.backoff(attempt, 0.0) == lo
    assert lo <= retry.backoff(attempt, 0.5) < hi
    assert retry.backoff(attempt, 0.999999) == pytest.approx(hi, rel=1e-5)


def test_retry_after():
    assert retry.retry_after("7") == 7
    assert retry.retry_after(None) == 60
    assert retry.retry_after("soon") == 60
    assert retry.retry_after("0") == 1 and retry.retry_after("99999") == 3600


def test_payload_as_the_server_reads_it():
    raw = json.dumps(
        {
            "ts": "2026-11-24T10:00:00Z",
            "measurements": [
                {"type": "temperature", "value": 4.2, "label": "front"},
                {"type": "humidity", "value": 55, "ts": "2026-11-24T10:00:30+01:00"},
            ],
        }
    ).encode()
    a, b = payload.parse(raw, "fridge01", received=0.0)
    assert (a.device, a.kind, a.label, a.value, a.ts) == (
        "fridge01",
        "temperature",
        "front",
        4.2,
        1795514400.0,
    )
    assert b.ts == 1795514400.0 - 3600 + 30 and b.unit == ""
    # no ts: the gateway's receive time, not the forwarding time
    (c,) = payload.parse(b'{"measurements": [{"type": "temperature", "value": 1}]}', "x", 123.0)
    assert c.ts == 123.0


@pytest.mark.parametrize(
    "raw,why",
    [
        (b"{", "not valid JSON"),
        (b'{"measurements": []}', "1 to 32"),
        (b'{"measurements": [{"type": "temperature", "value": NaN}]}', "not valid JSON"),
        (b'{"measurements": [{"type": "temperature", "value": "4"}]}', "must be a number"),
        (b'{"device": "other", "measurements": [{"type": "t", "value": 1}]}', "cannot send for"),
        (b'{"ts": "2026-11-24 10:00", "measurements": [{"type": "t", "value": 1}]}', "offset"),
    ],
)
def test_payload_refusals_say_why(raw, why):
    with pytest.raises(payload.PayloadError, match=why):
        payload.parse(raw, "fridge01", 0.0)


def test_topic_names_the_node():
    assert topics.measurement_device("opensense/acc_1/fridge01", "acc_1") == "fridge01"
    assert topics.measurement_device("opensense/acc_2/fridge01", "acc_1") is None
    assert topics.measurement_device("opensense/acc_1/fridge01/lwt", "acc_1") is None


def test_group_is_columnar_and_keeps_row_ids():
    rows = [
        (1, "a", "temperature", "", "", 60.0, 4.0),
        (2, "b", "temperature", "", "", 60.0, 5.0),
        (3, "a", "temperature", "", "", 120.5, 4.5),
        (4, "a", "voltage", "", "mV", 120.0, 3300.0),
    ]
    body, ids = group(rows)
    assert body["series"] == [
        {
            "device": "a",
            "type": "temperature",
            "label": "",
            "ts": [60, 120.5],
            "values": [4.0, 4.5],
        },
        {"device": "b", "type": "temperature", "label": "", "ts": [60], "values": [5.0]},
        {
            "device": "a",
            "type": "voltage",
            "label": "",
            "unit": "mV",
            "ts": [120],
            "values": [3300.0],
        },
    ]
    assert ids == [[1, 3], [2], [4]]


def test_broker_files():
    h = mosquitto.mosquitto_hash("secret", b"\x01" * 12)
    assert mosquitto.check_hash("secret", h) and not mosquitto.check_hash("Secret", h)
    text = mosquitto.password_file(
        [
            {"id": "dev_b", "local_id": "b", "site_hash": "$7$x"},
            {"id": "dev_a", "local_id": "a", "site_hash": None},
        ],
        "gw",
        h,
    )
    # username = the dev_ id, as at the server's broker (the firmware logs in so);
    # a device without a site hash cannot log in
    assert text == f"gw:{h}\ndev_b:$7$x\n"
    acl = mosquitto.acl_file("acc_1", [{"id": "dev_b", "local_id": "b", "site_hash": "$7$x"}], "gw")
    assert "user dev_b\ntopic write opensense/acc_1/b\n" in acl
    assert "topic read opensense/acc_1/b/err\n" in acl and "topic read opensense/acc_1/#" in acl
