"""PostgreSQL binary arrays, encoded in one step.

The writing statements (storage/write.py) take a batch's readings as three arrays,
`int4[]`, `timestamptz[]` and `float8[]`, in binary. psycopg builds a binary array
by calling an element dumper per element from a Python loop: ~0.54 µs a reading for
the three (2,048 readings, tools/bench/decode's machine). Here each array is packed by
`array` and `struct` in C, and a timestamp shared by several readings (a node's probes
read at one instant) is converted once: ~0.20 µs, byte for byte what psycopg sends
(tests/test_batch_write.py compares them). One difference: psycopg sends integers as
the smallest type that holds them all (int2[] for channel numbers under 32,768), which
the statements then cast to int4[]; here they are int4[] from the start. The
authentication statement's `text[]` and `int8[]` and the rule engine's save (`jsonb[]`,
`timestamptz[]` with NULLs, `text[]`) are packed here too, for the same reason.

The format (PostgreSQL's array_send): a header of five int32 (dimensions 1, "has
nulls", the element type's oid, the length, lower bound 1), then per element its byte
length (int32; -1 and no value: NULL) and its value: int4 big-endian; float8 as IEEE
754 big-endian; timestamptz as int64 microseconds since 2000-01-01 00:00 UTC; text as
its UTF-8; jsonb as the format version 1 and the JSON text.

`Packed` values are bytes that psycopg passes through as they are, typed by their
class (registered on psycopg's global adapters when this module is imported: the db
package imports it, so every connection the server opens knows them).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import chain, repeat

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

_HEADER = struct.Struct(">iiIii")
_INT8 = struct.Struct(">iq")
_LEN = struct.Struct(">i")
_NULL = b"\xff\xff\xff\xff"  # an element's length -1: NULL
_SWAP = sys.byteorder == "little"
assert array("i").itemsize == 4, "int4s packs C ints: 4 bytes on every platform served"
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class Packed(bytes):
    """A binary array, encoded already."""

    oid = 0


class Int4Array(Packed):
    oid = 1007  # int4[] (pg_type.typarray of int4)


class TimestamptzArray(Packed):
    oid = 1185  # timestamptz[]


class Float8Array(Packed):
    oid = 1022  # float8[]


class Int8Array(Packed):
    oid = 1016  # int8[]


class TextArray(Packed):
    oid = 1009  # text[]


class JsonbArray(Packed):
    oid = 3807  # jsonb[]


def _header(elem_oid: int, n: int, flags: int = 0) -> bytes:
    if n == 0:  # an empty array has no dimension (array_send writes ndim 0)
        return _HEADER.pack(0, 0, elem_oid, 0, 0)[:12]
    return _HEADER.pack(1, flags, elem_oid, n, 1)


def int4s(values: Sequence[int]) -> Int4Array:
    """Raises OverflowError past int4's range, as psycopg's dumper would refuse it."""
    n = len(values)
    body = array("i", [4]) * (2 * n)  # (length 4, value) per element
    body[1::2] = array("i", values)
    if _SWAP:
        body.byteswap()
    return Int4Array(_header(23, n) + body.tobytes())


def float8s(values: Sequence[float]) -> Float8Array:
    n = len(values)
    body = struct.pack(">" + "id" * n, *chain.from_iterable(zip(repeat(8), values)))
    return Float8Array(_header(701, n) + body)


_FLOAT8 = struct.Struct(">id")


def opt_float8s(values: Sequence[float | None]) -> Float8Array:
    """`float8s` where None is NULL (its length -1, no value)."""
    body = b"".join(_NULL if v is None else _FLOAT8.pack(8, v) for v in values)
    flags = 1 if None in values else 0  # "has nulls", as array_send sets it
    return Float8Array(_header(701, len(values), flags) + body)


def _us(d: timedelta) -> int:
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def timestamptzs(values: Sequence[datetime]) -> TimestamptzArray:
    """Aware datetimes (a naive one raises TypeError, as subtracting it would)."""
    known: dict[datetime, int] = {}
    us: list[int] = []
    for t in values:
        u = known.get(t)
        if u is None:
            u = known[t] = _us(t - PG_EPOCH)
        us.append(u)
    n = len(us)
    body = struct.pack(">" + "iq" * n, *chain.from_iterable(zip(repeat(8), us)))
    return TimestamptzArray(_header(1184, n) + body)


def opt_timestamptzs(values: Sequence[datetime | None]) -> TimestamptzArray:
    """`timestamptzs` where None is NULL (its length -1, no value)."""
    body = b"".join(_NULL if t is None else _INT8.pack(8, _us(t - PG_EPOCH)) for t in values)
    flags = 1 if None in values else 0  # "has nulls", as array_send sets it
    return TimestamptzArray(_header(1184, len(values), flags) + body)


def int8s(values: Sequence[int | None]) -> Int8Array:
    """None is NULL (its length -1, no value); raises OverflowError past int8."""
    body = b"".join(_NULL if v is None else _INT8.pack(8, v) for v in values)
    flags = 1 if None in values else 0  # "has nulls", as array_send sets it
    return Int8Array(_header(20, len(values), flags) + body)


def texts(values: Sequence[str]) -> TextArray:
    """As UTF-8, which PostgreSQL takes as the connection's client encoding (UTF8 unless
    a server sets another; the callers send token key ids and the rule engine's status
    words, ASCII).
    A NUL, which text cannot hold, is refused by PostgreSQL as in any text parameter."""
    parts = [v.encode() for v in values]
    body = b"".join(_LEN.pack(len(b)) + b for b in parts)
    return TextArray(_header(25, len(values)) + body)


def jsonbs(values: Sequence[bytes | None]) -> JsonbArray:
    """JSON texts (UTF-8) as jsonb[]: each element in jsonb's binary form (jsonb_send:
    the format version, 1, then the text); None is NULL. PostgreSQL parses and checks
    each text as it does a jsonb parameter."""
    body = b"".join(_NULL if v is None else _LEN.pack(len(v) + 1) + b"\x01" + v for v in values)
    flags = 1 if None in values else 0
    return JsonbArray(_header(3802, len(values), flags) + body)


class _PackedDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: bytes) -> bytes:
        return obj


def _register() -> None:
    for cls in (Int4Array, TimestamptzArray, Float8Array, Int8Array, TextArray, JsonbArray):
        dumper = type(f"{cls.__name__}Dumper", (_PackedDumper,), {"oid": cls.oid})
        psycopg.adapters.register_dumper(cls, dumper)


_register()
