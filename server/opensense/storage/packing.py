"""Lossless packing of one channel-day of readings into one compressed blob.

A plain PostgreSQL row costs ~100 bytes per reading with its index. Closed days are
re-stored as one row per channel and UTC day; this module turns the day's
(timestamp, value) pairs into bytes and back, exactly (bit-for-bit floats).

Layout before zlib: version, count, first timestamp (µs), then timestamp
delta-of-deltas (a steady cadence packs to zeros), then values: if every value is
an exact decimal with at most 6 places (a DS18B20's 0.0625 steps, or 4.2 from a
JSON body), as scaled-integer deltas; otherwise as raw IEEE-754 doubles. All
integers are zigzag varints. Pure Python, no I/O.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

VERSION = 1
MODE_DECIMAL = 1
MODE_DOUBLE = 0
_MAX_SCALE = 6
_EXACT_INT = 2**53


def _zz(n: int) -> int:
    return (n << 1) ^ (n >> 63) if -(2**63) <= n < 2**63 else _raise(n)


def _raise(n: int) -> int:
    raise OverflowError(n)


def _unzz(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _put(out: bytearray, n: int) -> None:
    n = _zz(n)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _get(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return _unzz(result), pos
        shift += 7


def _bits(v: float) -> bytes:
    return struct.pack("<d", v)


def _decimal_scale(values: Sequence[float]) -> int | None:
    """Smallest k such that every value is exactly int/10**k (sign of zero kept)."""
    for k in range(_MAX_SCALE + 1):
        f = 10**k
        ok = True
        for v in values:
            scaled = v * f
            if not abs(scaled) < _EXACT_INT:  # also catches inf after scaling
                ok = False
                break
            s = round(scaled)
            if abs(s) >= _EXACT_INT or _bits(s / f) != _bits(v):
                ok = False
                break
        if ok:
            return k
    return None


def pack(ts_us: Sequence[int], values: Sequence[float]) -> bytes:
    """Pack strictly increasing microsecond timestamps and their values."""
    assert len(ts_us) == len(values)
    out = bytearray([VERSION])
    _put(out, len(ts_us))
    prev, prev_delta = 0, 0
    for i, t in enumerate(ts_us):
        if i == 0:
            _put(out, t)
        else:
            delta = t - prev
            assert delta > 0, "timestamps must be strictly increasing"
            _put(out, delta - prev_delta)
            prev_delta = delta
        prev = t
    k = _decimal_scale(values)
    if k is not None:
        out.append(MODE_DECIMAL)
        out.append(k)
        f = 10**k
        last = 0
        for v in values:
            s = round(v * f)
            _put(out, s - last)
            last = s
    else:
        out.append(MODE_DOUBLE)
        for v in values:
            out += _bits(v)
    return zlib.compress(bytes(out), 9)


def unpack(blob: bytes) -> tuple[list[int], list[float]]:
    buf = zlib.decompress(blob)
    if buf[0] != VERSION:
        raise ValueError(f"unknown packing version {buf[0]}")
    n, pos = _get(buf, 1)
    ts: list[int] = []
    prev = prev_delta = 0
    for i in range(n):
        d, pos = _get(buf, pos)
        if i == 0:
            prev = d
        else:
            prev_delta += d
            prev += prev_delta
        ts.append(prev)
    mode = buf[pos]
    pos += 1
    values: list[float] = []
    if mode == MODE_DECIMAL:
        f = 10 ** buf[pos]
        pos += 1
        last = 0
        for _ in range(n):
            d, pos = _get(buf, pos)
            last += d
            values.append(last / f)
    else:
        for _ in range(n):
            values.append(struct.unpack_from("<d", buf, pos)[0])
            pos += 8
    return ts, values
