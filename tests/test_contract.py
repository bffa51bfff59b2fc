"""The wire contract (server/opensense_contract): one copy of the payload, JSON,
timestamp, topic, retry and error-code rules, read the same by the server and the
gateway. The drift the three private copies had is pinned here: each case failed on
the gateway's old copy (an exception escaping its door, or a body it took that the
server refuses)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from opensense import errors as server_errors
from opensense.errors import ApiError
from opensense.ingest import validate
from opensense_contract import errors, payload, retry, strictjson, topics
from opensense_contract.errors import WireError
from opensense_gateway import mosquitto
from opensense_gateway import payload as gw_payload

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def one(**entry: object) -> bytes:
    return json.dumps({"measurements": [{"type": "temperature", "value": 4.2, **entry}]}).encode()


# (raw body, the code the server gives it) — every door must refuse these alike
REFUSED = [
    (b"[" * 100_000 + b"]" * 100_000, "bad_json"),  # deeper than the parser goes
    (
        b'{"measurements": [{"type": "temperature", "value": ' + b"9" * 400 + b"}]}",
        "invalid_measurement",
    ),
    (one(ts="0001-01-01T00:00:00+01:00"), "invalid_measurement"),  # no UTC equivalent
    (one(ts="2026-11-24 10:00:00+00:00"), "invalid_measurement"),  # not RFC 3339: no T
    (one(label="a\u0000b"), "bad_json"),  # no text may hold a NUL
    (b'{"measurements": [{"type": "temperature", "value": 1, "label": "\\ud800"}]}', "bad_json"),
    (b'{"measurements": [{"type": "temperature", "value": Infinity}]}', "bad_json"),
    (b"\xff{}", "bad_json"),
]


@pytest.mark.parametrize("raw,code", REFUSED)
def test_server_and_gateway_refuse_the_same_bodies_with_the_same_code(raw: bytes, code: str):
    with pytest.raises(ApiError) as server:
        validate.validate_payload(
            validate.parse_json(raw),
            now=NOW,
            oldest=datetime(2000, 1, 1, tzinfo=UTC),
            header_device="fridge01",
        )
    assert server.value.code == code
    # the gateway's old copy let a RecursionError or OverflowError escape (its HTTP
    # door answered nothing) and took a date-time without "T" or holding a NUL
    with pytest.raises(gw_payload.PayloadError) as gateway:
        gw_payload.parse(raw, "fridge01", 0.0)
    assert gateway.value.code == code
    assert str(gateway.value) == server.value.message


def test_strict_json_keeps_what_json_takes():
    assert strictjson.loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    # duplicate keys: the last wins, as every door always read them
    assert strictjson.loads(b'{"a": 1, "a": 2}') == {"a": 2}
    with pytest.raises(WireError, match="NaN is not a JSON number"):
        strictjson.loads(b"[NaN]")


def test_timestamps():
    assert payload.parse_ts("2026-11-24T11:00:00+01:00", "ts") == NOW
    assert payload.parse_ts("2026-11-24T10:00:00Z", "ts") == NOW
    for bad in ("2026-11-24T10:00:00", "2026-11-24", 1795514400, "soon"):
        with pytest.raises(WireError):
            payload.parse_ts(bad, "ts")


def test_values():
    assert payload.finite_number(4, "m") == 4.0
    for bad in (True, "4", None, float("nan"), 10**400):
        with pytest.raises(WireError):
            payload.finite_number(bad, "m")


def test_error_codes_are_the_contracts():
    assert server_errors.CODES is errors.CODES
    assert errors.RETRY_CODE in errors.CODES and errors.CODES[errors.RETRY_CODE] == 429
    with pytest.raises(AssertionError):
        WireError("no_such_code", "x")


def test_topics_measurement_device_is_exact():
    assert topics.measurement_device("opensense/acc_1/fridge01", "acc_1") == "fridge01"
    for other in ("opensense/acc_1/fridge01/", "opensense/acc_1/", "x/acc_1/fridge01"):
        assert topics.measurement_device(other, "acc_1") is None


def test_site_acl_is_the_device_acl_in_mosquittos_words():
    devices = [{"id": "dev_1", "local_id": "fridge01", "site_hash": "$7$x"}]
    acl = mosquitto.acl_file("acc_1", devices, "gw")
    assert acl == (
        "# written by opensense-gateway from the server's sync; do not edit\n"
        "\nuser dev_1\n"
        "topic write opensense/acc_1/fridge01\n"
        "topic write opensense/acc_1/fridge01/lwt\n"
        "topic write opensense/acc_1/fridge01/info\n"
        "topic read opensense/acc_1/fridge01/cmd/#\n"
        "topic read opensense/acc_1/fridge01/err\n"
        "\nuser gw\n"
        "topic read opensense/acc_1/#\n"
    )
    # every topic a node may write or read there, the server's ACL allows it too
    for line in acl.splitlines():
        if line.startswith("topic write opensense/acc_1/fridge01"):
            name = line.split(" ", 2)[2]
            assert topics.publish_refusal("acc_1", "fridge01", name) is None
        if line.startswith("topic read opensense/acc_1/fridge01"):
            assert topics.subscribe_refusal("acc_1", "fridge01", line.split(" ", 2)[2]) is None


def test_retry_rule():
    assert [retry.backoff(a, 0.0) for a in (0, 1, 6, 30)] == [0.5, 1, 30, 30]
    assert retry.gives_up(401) and retry.gives_up(422) and not retry.gives_up(429)
    assert not retry.gives_up(503)
    assert all(retry.gives_up(s) for s in retry.NEVER_RETRY_STATUSES)


def test_docs_name_every_contract_module():
    from pathlib import Path

    import opensense_contract

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "contract.md").read_text()
    modules = sorted(
        p.stem for p in Path(opensense_contract.__file__).parent.glob("*.py") if p.stem[0] != "_"
    )
    assert modules == ["errors", "payload", "retry", "rules", "strictjson", "topics"]
    for name in modules:
        assert f"| `{name}` |" in text, name
