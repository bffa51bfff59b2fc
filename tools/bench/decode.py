"""OpenSense decode benchmark (issue 14, item 3): the CPU an ingest body costs the
server before it reaches the database, measured against the former code in the
same run. No server, no database: the functions the doors call, in this process.

Bodies, as they arrive (`POST /v1/ingest`; an MQTT measurement message is the same
body without `device` and goes through the same call):

- 32 readings: the ingest bench's body (`_lib/http_load.py`: type, value, label
  and one shared ts per entry, compact separators);
- 3 readings: the firmware's body (`firmware/sense/payload.py`: type, value, ts,
  seq, label and unit `°C`, written `\\u00b0C` by json.dumps, default separators);
- 1 reading: the ingest bench's body with one entry.

Ways, timed on the same bytes:

- before: the former path, reproduced here: `opensense_contract.strictjson.loads`
  (the stdlib reader and its walk over every string) and the former
  `validate_payload` (`before_validate` below: the server's, its short path and
  shortcut switched off, so every check on every entry);
- after: `opensense.ingest.validate.read_payload` as it is, the call both doors
  make (msgspec's typed reader for a plain body; `parse_json` and `validate_payload`
  for any other).

Each way runs N times per round (parse + validate, the result a `Batch`), rounds
alternate between the ways (so both meet the same noise), and the best round is
kept (the least disturbed: a shared machine only ever adds time). Printed: µs per
body and per reading, and after/before. The same is done for the answer's JSON
(`jsonutil.dumps` and UTF-8 encoding as `web.json_response` does, against
`ingest.routes.answer_body`), for the rows a batch hands the writer (the former
loop, one call of the former `pipeline.channel_rows` an entry, a `Row` each, against
`pipeline._rows`), and for two refused bodies (bad JSON, a bad value), whose message
must be the same both ways. Before timing, the bench checks that both ways give equal
batches, equal refusals and equal rows.

    tools/bench/decode            # 2,000 bodies a round, 15 rounds (~45 s on a free core)
    tools/bench/decode --quick    # 100 bodies a round, 3 rounds (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FunctionType
from typing import Any

from _lib.report import ratio, say
from opensense.api.jsonutil import dumps
from opensense.errors import ApiError
from opensense.ingest import pipeline, routes, validate
from opensense.ingest.validate import Batch
from opensense.storage.write import Row
from opensense_contract import strictjson
from opensense_contract.errors import WireError
from opensense_contract.payload import json_type as _type

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
OLDEST = datetime(2025, 12, 1, tzinfo=UTC)
TS = "2026-11-24T09:59:00Z"


# --- the former path --------------------------------------------------------------


def before_parse(raw: bytes) -> Any:
    try:
        return strictjson.loads(raw)
    except WireError as e:
        raise ApiError(e.code, e.message) from None


def _before_check_object(v: Any, not_object: str, where: str, allowed: frozenset[str]) -> None:
    if not isinstance(v, dict):
        raise ApiError("invalid_measurement", f"{not_object}, got {_type(v)}")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise ApiError(
            "invalid_measurement",
            f"{where}unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
        )


def _switched_off(f: Callable[..., Any], names: dict[str, Any]) -> Callable[..., Any]:
    """`f`, a function of opensense.ingest.validate, run with the module names `names`."""
    g = FunctionType(f.__code__, names, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    return g


# The former validate_payload is the server's as it is with issue 14's two additions
# switched off, the server's code run with these module names bound otherwise (no copy
# of it here to drift from it): the short path `_plain_entry` takes no entry, so every
# entry goes through `_entry` (the former loop's checks, kept there verbatim), and
# `_check_object` is the former one above (no subset shortcut), for the body and, in
# `_entry`, for each entry. Left of the change: per body a dict and a datetime sum
# (`times`, `latest`), per entry one call of the no-op: ~0.1 µs, which puts the before
# figures ~1 % above those of a verbatim copy of the former code (measured 2026-12-03).
_FORMER: dict[str, Any] = dict(vars(validate))
_FORMER |= {"_plain_entry": lambda *_: None, "_check_object": _before_check_object}
_FORMER["_entry"] = _switched_off(validate._entry, _FORMER)
before_validate: Callable[..., Batch] = _switched_off(validate.validate_payload, _FORMER)


def before_answer(answer: dict[str, Any]) -> bytes:
    return dumps(answer).encode("utf-8")  # web.json_response(text=dumps(...))


# --- bodies -----------------------------------------------------------------------


def bench_body(k: int) -> bytes:
    """_lib/http_load.post's body."""
    ms = [
        {"type": "temperature", "value": 4.0625 + j / 16, "label": f"p{j}", "ts": TS}
        for j in range(k)
    ]
    return json.dumps({"device": "fridge01", "measurements": ms}, separators=(",", ":")).encode()


def firmware_body(k: int) -> bytes:
    """firmware/sense/payload.body's: one sampling tick of k probes."""
    ms = [
        {"type": "temperature", "value": 4.0625, "ts": TS, "seq": 1234, "label": f"p{j}"}
        | {"unit": "°C"}
        for j in range(k)
    ]
    return json.dumps({"measurements": ms, "device": "fridge01"}).encode()


BODIES = [("32 readings", 32, bench_body(32)), ("3 readings", 3, firmware_body(3))]
BODIES.append(("1 reading", 1, bench_body(1)))
REFUSED = [
    (
        "bad JSON (NaN)",
        b'{"device":"fridge01","measurements":[{"type":"temperature","value":NaN}]}',
    ),
    ("bad value (31st)", bench_body(32).replace(b'"value":5.9375', b'"value":"5.9"')),
]


def answer_of(k: int) -> dict[str, Any]:
    return {
        "accepted": k,
        "deduplicated": 0,
        "channels": [
            {"type": "temperature", "label": f"p{j}", "channel_id": f"chn_{j:026d}"}
            for j in range(k)
        ],
    }


# --- timing -----------------------------------------------------------------------


def refusal(f: Callable[[], Any]) -> tuple[str, str] | None:
    try:
        f()
    except ApiError as e:
        return e.code, e.message
    return None


def best_us(ways: list[Callable[[], Any]], n: int, rounds: int) -> list[float]:
    """µs per call of each way: the best of `rounds` rounds of n calls, ways alternating."""
    best = [float("inf")] * len(ways)
    for _ in range(rounds):
        for w, f in enumerate(ways):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[w] = min(best[w], (time.perf_counter() - t0) / n * 1e6)
    return best


def _swallow(f: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        try:
            f()
        except ApiError:
            pass

    return call


def old(raw: bytes) -> Callable[[], Batch]:
    return lambda: before_validate(before_parse(raw), now=NOW, oldest=OLDEST)


def new(raw: bytes) -> Callable[[], Batch]:
    return lambda: validate.read_payload(raw, now=NOW, oldest=OLDEST)


def before_channel_rows(
    channel: pipeline.Channel, unit: str, readings: Any, field: str
) -> list[Row]:
    """The former `pipeline.channel_rows`: the unit check, a `Row` a reading."""
    if channel.unit != unit:
        raise ApiError("invalid_measurement", f"{field} {unit!r} differs")
    return [Row(channel.num, ts, value + channel.offset) for ts, value in readings]


def before_rows(
    entries: tuple[validate.Entry, ...], channels: dict[pipeline.ChannelKey, pipeline.Channel]
) -> list[Any]:
    """The former `pipeline._rows`: a `channel_rows` call (a Row in a list) an entry."""
    rows: list[Any] = []
    for i, e in enumerate(entries):
        ch = channels[(e.kind, e.label)]
        rows += before_channel_rows(ch, e.unit, ((e.ts, e.value),), f"measurements[{i}].unit")
    return rows


def rows_of(k: int) -> list[Callable[[], list[Any]]]:
    """The two ways of making the rows of the k-reading bench body's batch."""
    entries = new(bench_body(k))().entries
    channels = {
        (e.kind, e.label): pipeline.Channel(f"chn_{j:026d}", 1000 + j, e.unit, 0.25)
        for j, e in enumerate(entries)
    }
    return [lambda: before_rows(entries, channels), lambda: pipeline._rows(entries, channels)]


def answers(ans: dict[str, Any]) -> list[Callable[[], bytes]]:
    return [lambda: before_answer(ans), lambda: routes.answer_body(ans)]


def same_results() -> str | None:
    """Why the two ways differ on a bench body, or None: the figures compare equals."""
    for name, _k, raw in BODIES:
        if old(raw)() != new(raw)():
            return f"{name}: the two ways give different batches"
    for name, raw in REFUSED:
        was, now = refusal(old(raw)), refusal(new(raw))
        if was is None or was != now:
            return f"{name}: refused {was} before, {now} after"
    for k in (32, 3, 1):
        if len({json.dumps(json.loads(f())) for f in answers(answer_of(k))}) != 1:
            return f"the answer of {k}: the two ways give different JSON"
        if len({tuple(map(tuple, f())) for f in rows_of(k)}) != 1:
            return f"the rows of {k}: the two ways give different rows"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="100 bodies a round, 3 rounds")
    ap.add_argument("--n", type=int, help="bodies a round (default 2,000)")
    ap.add_argument("--rounds", type=int, help="rounds (default 15)")
    args = ap.parse_args(argv)
    n = args.n or (100 if args.quick else 2000)
    rounds = args.rounds or (3 if args.quick else 15)
    started, load = datetime.now(UTC), os.getloadavg()[0]
    differ = same_results()
    if differ:
        say(differ)
        return 1

    say(f"parse + validate, best of {rounds} rounds of {n:,} bodies (this process, one core)")
    say(f"{'body':<18}{'bytes':>6}{'before':>12}{'after':>12}{'before':>14}{'after':>14}")
    say(f"{'':<18}{'':>6}{'µs/body':>12}{'µs/body':>12}{'µs/reading':>14}{'µs/reading':>14}")
    for name, k, raw in BODIES:
        b, a = best_us([old(raw), new(raw)], n, rounds)
        say(
            f"{name:<18}{len(raw):>6}{b:>12.1f}{a:>12.1f}{b / k:>14.2f}{a / k:>14.2f}"
            f"   (x{ratio(a, b):.2f} time, {ratio(b, a):.1f}x faster)"
        )
    say()
    say("refused bodies (the same code and message both ways), µs/body")
    for name, raw in REFUSED:
        b, a = best_us([_swallow(old(raw)), _swallow(new(raw))], n, rounds)
        say(f"{name:<18}{len(raw):>6}{b:>12.1f}{a:>12.1f}   (x{ratio(a, b):.2f} time)")
    say()
    say("answer JSON (dict -> bytes), µs/answer")
    for k in (32, 3, 1):
        ans = answer_of(k)
        b, a = best_us(answers(ans), n, rounds)
        name = f"{k} channel{'s' if k > 1 else ''}"
        size = len(routes.answer_body(ans))
        say(f"{name:<18}{size:>6}{b:>12.1f}{a:>12.1f}   (x{ratio(a, b):.2f} time)")
    say()
    say("rows for the batch writer (entries -> rows), µs/batch and µs/reading")
    for k in (32, 3, 1):
        b, a = best_us(rows_of(k), n, rounds)
        name = f"{k} reading{'s' if k > 1 else ''}"
        say(
            f"{name:<18}{'':>6}{b:>12.1f}{a:>12.1f}{b / k:>14.2f}{a / k:>14.2f}"
            f"   (x{ratio(a, b):.2f} time)"
        )
    say()
    say(
        f"{started:%Y-%m-%d %H:%MZ}, {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at the start: a busy machine only adds time; "
        "quote figures from quiet cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
