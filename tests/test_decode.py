"""The ingest doors' fast JSON reader and measurement path (issue 14, item 3) read
every body as the reference does: `parse_json` as `opensense_contract.strictjson`
(the gateway's reader too), `validate_payload` as its full per-field checks. Each
hostile input's answer is pinned here, word for word, and the two readers are held
to each other on generated bodies."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensense.errors import ApiError
from opensense.ingest import routes, validate
from opensense.ingest.validate import Entry
from opensense_contract import strictjson
from opensense_contract.errors import WireError

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
OLDEST = datetime(2025, 12, 1, tzinfo=UTC)
TS = "2026-11-24T09:59:00Z"


def typed(v: Any) -> Any:
    """`v` with every scalar's type spelled out: 1 and 1.0 and True differ, -0.0 and
    0.0 differ, and a dict's key order counts."""
    if isinstance(v, dict):
        return ("dict", [(k, typed(x)) for k, x in v.items()])
    if isinstance(v, list):
        return ("list", [typed(x) for x in v])
    return (type(v).__name__, repr(v))


def outcome(read: Any, raw: bytes) -> Any:
    """A reader's answer to `raw`: its value (typed) or its refusal (code, message)."""
    try:
        return typed(read(raw))
    except ApiError as e:
        return (e.code, e.message)
    except WireError as e:
        return (e.code, e.message)


def reference(raw: bytes) -> Any:
    return outcome(strictjson.loads, raw)


def ours(raw: bytes) -> Any:
    return outcome(validate.parse_json, raw)


def bad(why: str) -> tuple[str, str]:
    return ("bad_json", why)


NOT_JSON = "the body is not valid JSON: "
DEEP = "the body nests arrays or objects too deeply"

# (name, raw body, the answer: a value, or the refusal word for word)
HOSTILE: list[tuple[str, bytes, Any]] = [
    (
        "NaN",
        b'{"a": NaN}',
        bad(NOT_JSON + "NaN is not a JSON number (JSON has no NaN or Infinity)"),
    ),
    (
        "Infinity",
        b"[Infinity]",
        bad(NOT_JSON + "Infinity is not a JSON number (JSON has no NaN or Infinity)"),
    ),
    (
        "-Infinity",
        b"[-Infinity]",
        bad(NOT_JSON + "-Infinity is not a JSON number (JSON has no NaN or Infinity)"),
    ),
    # duplicate keys: the last value, at the first key's place
    ("duplicate keys", b'{"b": 1, "a": 2, "b": 3}', {"b": 3, "a": 2}),
    ("duplicate nested", b'{"a": {"x": 1}, "a": [2]}', {"a": [2]}),
    # integers of any size stay integers (a seq past 2**64 is an integer, as before)
    ("past u64", b"[18446744073709551616, -9223372036854775809]", [2**64, -(2**63) - 1]),
    ("400 digits", b"[" + b"9" * 400 + b"]", [int("9" * 400)]),
    ("4300 digits", b"[-" + b"9" * 4300 + b"]", [-int("9" * 4300)]),
    (
        "4301 digits",
        b"[" + b"9" * 4301 + b"]",
        bad(
            NOT_JSON + "Exceeds the limit (4300 digits) for integer string conversion: "
            "value has 4301 digits; use sys.set_int_max_str_digits() to increase the limit"
        ),
    ),
    # a float literal past a double is infinity (the validator refuses it as a value)
    ("1e999", b"[1e999, -1e999, 1e-999]", [float("inf"), float("-inf"), 0.0]),
    ("long mantissa", b"[" + b"1" * 400 + b".5]", [float("inf")]),
    ("-0", b"[-0, -0.0, 0.1, 5e-324]", [0, -0.0, 0.1, 5e-324]),
    ("deep 1000", b"[" * 1000 + b"]" * 1000, bad(DEEP)),
    ("deep unclosed", b"[" * 100_000, bad(DEEP)),
    ("deep 256", b"[" * 256 + b"]" * 256, json.loads("[" * 256 + "]" * 256)),
    ("deep 300", b"[" * 300 + b"]" * 300, json.loads("[" * 300 + "]" * 300)),
    (
        "BOM",
        b'\xef\xbb\xbf{"a": 1}',
        bad(NOT_JSON + "Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)"),
    ),
    ("not UTF-8", b'{"a": "\xff"}', bad("the body is not UTF-8 text (byte 7)")),
    ("UTF-8 surrogate", b'["\xed\xa0\x80"]', bad("the body is not UTF-8 text (byte 2)")),
    ("overlong UTF-8", b'["\xc0\xaf"]', bad("the body is not UTF-8 text (byte 2)")),
    ("past U+10FFFF", b'["\xf4\x90\x80\x80"]', bad("the body is not UTF-8 text (byte 2)")),
    (
        "lone surrogate",
        b'{"label": "a\\ud800b"}',
        bad("label holds an unpaired UTF-16 surrogate: it is not valid Unicode"),
    ),
    (
        "lone low surrogate",
        b'["\\uDC00"]',
        bad("the body[0] holds an unpaired UTF-16 surrogate: it is not valid Unicode"),
    ),
    ("surrogate pair", b'["\\ud83d\\ude00"]', ["\U0001f600"]),
    (
        "NUL escape",
        b'{"label": "a\\u0000b"}',
        bad("label holds a NUL character (\\u0000), which no text may"),
    ),
    (
        "NUL in a key",
        b'{"a\\u0000": 1}',
        bad("a key of the body holds a NUL character (\\u0000), which no text may"),
    ),
    ("escaped backslash u0000", b'["\\\\u0000"]', ["\\u0000"]),
    (
        "raw NUL",
        b'["a\x00b"]',
        bad(NOT_JSON + "Invalid control character at: line 1 column 4 (char 3)"),
    ),
    (
        "raw tab in a string",
        b'["a\tb"]',
        bad(NOT_JSON + "Invalid control character at: line 1 column 4 (char 3)"),
    ),
    ("DEL", b'["a\x7fb"]', ["a\x7fb"]),
    ("empty", b"", bad(NOT_JSON + "Expecting value: line 1 column 1 (char 0)")),
    ("spaces", b" \t\r\n", bad(NOT_JSON + "Expecting value: line 2 column 1 (char 4)")),
    ("form feed", b"\x0c{}", bad(NOT_JSON + "Expecting value: line 1 column 1 (char 0)")),
    ("NBSP", b"\xc2\xa0{}", bad(NOT_JSON + "Expecting value: line 1 column 1 (char 0)")),
    ("trailing data", b"{} x", bad(NOT_JSON + "Extra data: line 1 column 4 (char 3)")),
    ("trailing comma", b"[1,]", bad(NOT_JSON + "Expecting value: line 1 column 4 (char 3)")),
    ("leading zero", b"[01]", bad(NOT_JSON + "Expecting ',' delimiter: line 1 column 3 (char 2)")),
    ("bad escape", b'["\\a"]', bad(NOT_JSON + "Invalid \\escape: line 1 column 3 (char 2)")),
    (
        "single quotes",
        b"{'a': 1}",
        bad(
            NOT_JSON + "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
        ),
    ),
    ("a bare string", b'"x"', "x"),
    ("whitespace around", b' \n{"a": [true, false, null]}\r\n', {"a": [True, False, None]}),
    ("escaped non-ASCII", b'["\\u00b0C", "\xc2\xb0C"]', ["°C", "°C"]),
]


@pytest.mark.parametrize("name,raw,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_read_as_the_reference_reads_them(name: str, raw: bytes, expected: Any):
    want = expected if isinstance(expected, tuple) else typed(expected)
    assert reference(raw) == want  # the pin: today's answer, word for word
    assert ours(raw) == want  # and the fast door gives the same


def test_a_plain_body_takes_the_fast_reader(monkeypatch: pytest.MonkeyPatch):
    """The speed is real only if ordinary bodies skip the reference reader; the
    hostile ones above go there (each asserted equal, whichever reader answered)."""
    calls: list[bytes] = []
    real = strictjson.loads

    def counted(raw: bytes) -> Any:
        calls.append(raw)
        return real(raw)

    monkeypatch.setattr(strictjson, "loads", counted)
    plain = json.dumps({"measurements": [{"type": "temperature", "value": 4.2, "unit": "°C"}]})
    assert validate.parse_json(plain.encode()) == json.loads(plain)
    assert calls == []
    for raw in (b'["\\u0000"]', b"[NaN]", b"[" * 257 + b"]" * 257, b'["\\ud83d\\ude00"]'):
        outcome(validate.parse_json, raw)
    assert len(calls) == 4


# --- generated bodies: both readers alike -----------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values, st.booleans(), st.data())
def test_generated_bodies_and_their_corruptions_read_alike(value: Any, ascii_: bool, data: Any):
    raw = json.dumps(value, ensure_ascii=ascii_).encode()
    got = ours(raw)
    assert got == reference(raw)
    assert got == typed(json.loads(raw)) or got[0] == "bad_json"  # a NUL: refused alike
    # a corruption: some bytes replaced, inserted or cut
    i = data.draw(st.integers(0, len(raw)))
    junk = data.draw(
        st.sampled_from(
            [
                b"",
                b"\x00",
                b"\xff",
                b"\\u0000",
                b"\\ud800",
                b"NaN",
                b"[",
                b"}",
                b'"',
                b"\\",
                b",",
                b"1e999",
                b"\xed\xa0\x80",
            ]
        )
        | st.binary(max_size=3)
    )
    cut = data.draw(st.integers(0, 2))
    bent = raw[:i] + junk + raw[i + cut :]
    assert ours(bent) == reference(bent)


# --- measurements: the plain path and the full checks alike -----------------------


def validated(raw: bytes, **kw: Any) -> Any:
    try:
        b = validate.validate_payload(validate.parse_json(raw), now=NOW, oldest=OLDEST, **kw)
    except ApiError as e:
        return (e.code, e.message)
    return b.device, [(e.kind, e.label, e.unit, repr(e.value), e.ts) for e in b.entries]


def full_checks(raw: bytes, **kw: Any) -> Any:
    """The same body with the plain path off: every entry by every check, in order
    (the former validate_payload's loop, kept as validate._entry)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(validate, "_plain_entry", lambda *a: None)
        return validated(raw, **kw)


ts_texts = st.sampled_from(
    [
        TS,
        "2026-11-24T10:59:00+01:00",
        "2026-11-24t09:59:00z",
        "2026-11-24 09:59:00Z",  # no T
        "2026-11-24T09:59:00",  # no offset
        "2026-11-24T10:04:59Z",  # 4:59 ahead: taken
        "2026-11-24T10:05:01Z",  # past 5 min ahead
        "2025-11-30T23:59:59Z",  # before the oldest accepted
        "2025-12-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "soon",
        "",
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(-1e13, 1e13)
    | st.sampled_from([0, 1, 1.0, 0.5, 400, 400.0001, -100, 1e12, 2**53 + 1, 10**400, float("inf")])
    | st.text(max_size=3)
)
entries = (
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(
                ["temperature", "leak", "battery", "health", "humidity", "nope", 7]
            ),
            "value": scalars,
            "label": st.none() | st.sampled_from(["", "p0", "p1", "x" * 64, "x" * 65]) | scalars,
            "unit": st.none()
            | st.sampled_from(["°C", "%", "V", "0/1", "s", "B", "1", "K"])
            | scalars,
            "ts": st.none() | ts_texts | scalars,
            "seq": st.integers(-(2**70), 2**70) | scalars,
            "vaule": scalars,
        },
    )
    | scalars
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(ms=st.lists(entries, max_size=34), body_ts=st.none() | ts_texts, data=st.data())
def test_generated_measurements_are_judged_as_by_the_full_checks(
    ms: list[Any], body_ts: str | None, data: Any
):
    # mostly plausible entries, so the plain path and dedupe are exercised too
    plain = [
        {
            "type": "temperature",
            "value": data.draw(st.floats(-5, 10)),
            "label": f"p{j % 5}",
            "ts": data.draw(ts_texts),
        }
        for j in range(data.draw(st.integers(0, 8)))
    ]
    body: dict[str, Any] = {"device": "fridge01", "measurements": plain + ms}
    if body_ts is not None:
        body["ts"] = body_ts
    raw = json.dumps(body, ensure_ascii=data.draw(st.booleans())).encode()
    assert validated(raw) == full_checks(raw)


def m(**kw: Any) -> dict[str, Any]:
    return {"type": "temperature", "value": 4.5, "label": "p9", "ts": TS, **kw}


# each boundary of a check the plain path makes, on both sides
EDGES: list[Any] = [
    m(),
    m(type="leak", unit=None, value=1),
    m(type="leak", value=0.5),
    m(type="leak", value=True),
    m(label="x" * 64),
    m(label="x" * 65),
    m(label=5),
    m(label=None),
    {"type": "humidity", "value": 50},
    m(unit="K"),
    m(unit=None),
    m(unit=5),
    m(unit=["°C"]),
    m(label=["p9"]),
    m(type="battery", unit="V", value=3.3),
    m(type="battery", unit="V", value=61),
    m(unit="%"),
    m(seq=True),
    m(seq=1.0),
    m(seq=2**64),
    m(seq=None),
    m(seq="1"),
    m(ts="2026-11-24T10:04:59Z"),
    m(ts="2026-11-24T10:05:00Z"),
    m(ts="2026-11-24T10:05:00.000001Z"),
    m(ts="2025-12-01T00:00:00Z"),
    m(ts="2025-11-30T23:59:59.999999Z"),
    m(ts="2025-12-01T01:00:00+01:00"),
    m(ts=1795514400),
    m(ts=None),
    m(ts="2026-11-24"),
    m(ts="2026-11-24T09:59:00"),
    m(value="4"),
    m(value=None),
    m(value=10**400),
    m(value=2**53 + 1),
    m(value=-(2**53) - 1),
    m(value=-100),
    m(value=-100.0000001),
    m(value=400),
    m(value=400.0001),
    m(type="health", unit="B", value=10**12),
    m(type="health", unit="B", value=10**12 + 1),
    m(type=7),
    m(type="nope"),
    {"value": 4.5},
    {"type": "temperature"},
    m(vaule=1),
    [m()],
    5,
    None,
    m(label="p0"),  # repeats measurements[0]
    m(label="p0", ts="2026-11-24T10:59:00+01:00"),  # the same instant in other words
]


@pytest.mark.parametrize("edge", EDGES, ids=[str(i) for i in range(len(EDGES))])
@pytest.mark.parametrize("text", ["1e999", "same"])
def test_each_boundary_is_judged_as_by_the_full_checks(edge: Any, text: str):
    body = {"device": "d", "ts": TS, "measurements": [m(label="p0"), m(label="p1", ts=None), edge]}
    raw = json.dumps(body).encode()
    if text == "1e999":  # a literal past a double: the reference reader's infinity
        raw = raw.replace(b'"value": 4.5, "label": "p9"', b'"value": 1e999, "label": "p9"')
    assert validated(raw) == full_checks(raw)


# --- read_payload: the typed reader and the general path alike ---------------------


def read(raw: bytes, **kw: Any) -> Any:
    """`validate.read_payload` as `validated` sees a batch, values typed (1.0 and 1
    differ; an entry's value is always a float)."""
    try:
        b = validate.read_payload(raw, now=NOW, oldest=OLDEST, **kw)
    except ApiError as e:
        return (e.code, e.message)
    return b.device, [(e.kind, e.label, e.unit, repr(e.value), e.ts) for e in b.entries]


DEVICE_WAYS: list[dict[str, Any]] = [
    {},
    {"require_device": False},
    {"header_device": "fridge01"},
    {"header_device": "other"},
    {"header_device": "fridge01", "require_device": False},
]


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    ms=st.lists(entries, max_size=34),
    body_ts=st.none() | ts_texts | scalars,
    device=st.sampled_from([None, "fridge01", "", "x" * 65, 7, "absent"]),
    way=st.sampled_from(DEVICE_WAYS),
    data=st.data(),
)
def test_generated_bodies_are_read_by_read_payload_as_by_the_general_path(
    ms: list[Any], body_ts: Any, device: Any, way: dict[str, Any], data: Any
):
    plain = [
        {
            "type": "temperature",
            "value": data.draw(st.floats(-5, 10) | st.integers(-5, 10)),
            "label": f"p{j % 5}",
            "ts": data.draw(ts_texts),
        }
        for j in range(data.draw(st.integers(0, 8)))
    ]
    body: dict[str, Any] = {"measurements": plain + ms}
    if device != "absent":
        body["device"] = device
    if body_ts is not None or data.draw(st.booleans()):
        body["ts"] = body_ts
    if data.draw(st.booleans()):
        body["extra"] = 1
    raw = json.dumps(body, ensure_ascii=data.draw(st.booleans())).encode()
    assert read(raw, **way) == validated(raw, **way)


def test_read_payload_takes_a_plain_body_without_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
):
    """The speed is real only if a plain body (the firmware's, the bench's) skips the
    dict reader and the general checks; a body with any doubt still goes there."""
    calls: list[Any] = []
    real = validate.validate_payload

    def counted(*a: Any, **kw: Any) -> Any:
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(validate, "validate_payload", counted)
    plain = {"device": "d", "ts": TS, "measurements": [m(label=f"p{i}") for i in range(32)]}
    firmware = {
        "measurements": [
            {"type": "temperature", "value": 4.25, "ts": TS, "seq": 7, "label": "p", "unit": "°C"}
        ]
    }
    for body, kw in ((plain, {}), (firmware, {"require_device": False})):
        raw = json.dumps(body).encode()
        assert read(raw, **kw) == validated(raw, **kw)
    assert len(calls) == 2  # validated's own calls only
    for body in (
        {"device": "d", "measurements": [m(value=True)]},
        {"device": "d", "measurements": [m(), m()]},  # a repeat: named by the general path
        {"device": "d", "measurements": [m(value=2**53 + 1)]},
        {"device": "d", "measurements": [m(vaule=1)]},
    ):
        calls.clear()
        raw = json.dumps(body).encode()
        assert read(raw) == validated(raw)
        assert len(calls) == 2


@pytest.mark.parametrize("edge", EDGES, ids=[str(i) for i in range(len(EDGES))])
@pytest.mark.parametrize("text", ["1e999", "same"])
def test_each_boundary_is_read_by_read_payload_as_by_the_general_path(edge: Any, text: str):
    body = {"device": "d", "ts": TS, "measurements": [m(label="p0"), m(label="p1", ts=None), edge]}
    raw = json.dumps(body).encode()
    if text == "1e999":
        raw = raw.replace(b'"value": 4.5, "label": "p9"', b'"value": 1e999, "label": "p9"')
    assert read(raw) == validated(raw)


@pytest.mark.parametrize("name,raw,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_refused_by_read_payload_as_by_the_general_path(
    name: str, raw: bytes, expected: Any
):
    assert read(raw) == validated(raw)


def test_the_plain_path_makes_entries_equal_to_the_constructors():
    raw = json.dumps(
        {"device": "d", "measurements": [{"type": "leak", "value": 1, "ts": TS, "seq": 2**64}]}
    ).encode()
    (e,) = validate.validate_payload(validate.parse_json(raw), now=NOW, oldest=OLDEST).entries
    made = Entry("leak", "", "0/1", 1.0, NOW - timedelta(minutes=1))
    assert e == made and hash(e) == hash(made) and vars(e) == vars(made)
    assert type(e.value) is float
    with pytest.raises(AttributeError):
        e.value = 2.0  # type: ignore[misc]  # still frozen


def test_the_ingest_answer_reads_as_the_former_json():
    from opensense.api.jsonutil import dumps

    answer = {
        "accepted": 2,
        "deduplicated": 1,
        "channels": [
            {"type": "temperature", "label": 'föhn ✓ \U0001f600 "q" \\', "channel_id": "chn_1"}
        ],
        "ignored": ["ts"],
        "duplicate": True,
    }
    raw = routes.answer_body(answer)
    assert json.loads(raw) == json.loads(dumps(answer)) == answer
    assert raw.decode() == json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def test_the_ingest_answer_has_the_former_status_and_content_type():
    from opensense.api.jsonutil import response

    answer = {"accepted": 1, "deduplicated": 0, "channels": []}
    new, old = routes.answer_response(answer), routes.response(answer)
    assert new is not old and response is routes.response
    assert (new.status, dict(new.headers)) == (old.status, dict(old.headers))
    assert new.headers["Content-Type"] == "application/json; charset=utf-8"
    assert new.body == b'{"accepted":1,"deduplicated":0,"channels":[]}'
