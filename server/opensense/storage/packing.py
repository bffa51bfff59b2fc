"""Lossless packing of one channel-day of readings into one compressed blob.

A plain PostgreSQL row costs ~100 bytes per reading with its index. Closed days are
re-stored as one row per channel and UTC day; this module turns the day's
(timestamp, value) pairs into bytes and back, exactly (bit-for-bit floats).

Layout before zlib: version, count, first timestamp (µs), then timestamp
delta-of-deltas (a steady cadence packs to zeros), then values: if every value is
an exact decimal with at most 6 places (a DS18B20's 0.0625 steps, or 4.2 from a
JSON body), as scaled-integer deltas; otherwise as raw IEEE-754 doubles. All
integers are zigzag varints. Pure Python, no I/O.

`unpack` does no Python work per reading (a month's report decodes ~860,000), only
C-level passes: one regular expression (`findall`) cuts the varints apart; they are
decoded all at once as one big integer (`_words`), each distinct one once when they
repeat (a fridge day repeats a handful of deltas); a section of one-byte varints (a
steady cadence) is a table lookup; the running sums are `itertools.accumulate`, the
scaled decimals one `map(truediv)`, the doubles one `struct.unpack_from`. It decodes
every blob exactly as the per-varint loop it replaced (`tests/test_packing.py` keeps
that loop and compares; `tools/bench/report` times both). The standard library
only: numpy would decode faster still, but its arrays would have to become the lists
the callers take, and the read is then no longer the larger part of a report.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from itertools import accumulate, repeat
from operator import truediv

VERSION = 1
MODE_DECIMAL = 1
MODE_DOUBLE = 0
_MAX_SCALE = 6
_EXACT_INT = 2**53
# One varint: its continuation bytes (high bit set), then its last byte (possessive: no
# backtracking, ~3x faster than a plain `*`).
_VARINT = re.compile(rb"[\x80-\xff]*+.", re.DOTALL)
_LAST = bytes(1 if b < 0x80 else 0 for b in range(256))  # translate(): 1 where a varint ends
_ONE_BYTE = tuple((b >> 1) ^ -(b & 1) for b in range(0x80))  # a one-byte varint's value
# signed machine words of 2, 4 and 8 bytes: a varint of up to that many bytes, decoded
_WORD = {array(c).itemsize: c for c in "qlih"}


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


def _words(found: list[bytes], width: int) -> list[int]:
    """The zigzag varints `found` (none longer than `width` bytes) decoded with no
    Python work per varint: each is padded to a `width`-byte word, the words are
    decoded all at once as one big integer (7-bit groups squeezed together, zigzag
    undone), then read back as machine words by `array`."""
    n = len(found)
    x = int.from_bytes(b"".join(map(bytes.ljust, found, repeat(width), repeat(b"\0"))), "little")

    def lanes(byte: bytes) -> int:  # `byte` at the bottom of every word
        return int.from_bytes(byte.ljust(width, b"\0") * n, "little")

    ones = lanes(b"\1")
    p = 0
    for k in range(width):  # group k: bits 8k..8k+6 of a word -> bits 7k..7k+6
        p |= (x & (ones * (0x7F << 8 * k))) >> k
    low = ones * ((1 << (8 * width - 1)) - 1)  # a word but its top bit
    r = ((p >> 1) & low) ^ ((p & ones) * ((1 << (8 * width)) - 1))
    words = array(_WORD[width])
    words.frombytes(r.to_bytes(n * width, "little"))
    if sys.byteorder == "big":
        words.byteswap()
    return words.tolist()


def _decode(found: list[bytes]) -> list[int]:
    """The values of the zigzag varints `found`."""
    longest = max(map(len, found), default=1)
    for width in (2, 4, 8):
        if longest <= width and width in _WORD:
            return _words(found, width)
    return [_get(v, 0)[0] for v in found]  # beyond 2**55: no sensor's delta


def _ints(found: list[bytes]) -> list[int]:
    """_decode, each distinct varint once when they repeat (a fridge day repeats a few
    deltas: the dictionary is smaller than the day)."""
    distinct = set(found)
    if len(distinct) * 4 > len(found):
        return _decode(found)
    keys = list(distinct)
    value = dict(zip(keys, _decode(keys), strict=True))
    return list(map(value.__getitem__, found))


def unpack(blob: bytes) -> tuple[list[int], list[float]]:
    buf = zlib.decompress(blob)
    if buf[0] != VERSION:
        raise ValueError(f"unknown packing version {buf[0]}")
    n, pos = _get(buf, 1)
    if n == 0:
        return [], []
    first, pos = _get(buf, pos)
    last = buf.translate(_LAST)
    # A day of doubles ends with its 8n bytes: if exactly n - 1 varints end right before
    # them, that byte is the mode byte (a proof, not a guess) and no search is needed.
    mode_at = len(buf) - 8 * n - 1
    if (
        pos <= mode_at
        and buf[mode_at] != MODE_DECIMAL
        and last.count(1, pos, mode_at) == n - 1
        and (mode_at == pos or last[mode_at - 1])
    ):
        if mode_at - pos == n - 1:  # one byte each: a steady cadence
            dod = list(map(_ONE_BYTE.__getitem__, buf[pos:mode_at]))
        else:
            dod = _ints(_VARINT.findall(buf, pos, mode_at))
        values = list(struct.unpack_from(f"<{n}d", buf, mode_at + 1))
    else:
        found = _VARINT.findall(buf, pos)  # the varints, then the mode byte, then the values
        if len(found) < n:
            raise ValueError("packed blob is truncated")
        dod = _ints(found[: n - 1])
        if found[n - 1] == b"\x01" and len(found) > n and len(found[n]) == 1:
            # the mode byte says decimal, then the scale byte, then the n varints
            f = 10 ** found[n][0]
        else:  # doubles after anything but a day of them, or a scale byte >= 0x80
            mode_at = pos + sum(map(len, found[: n - 1]))
            if buf[mode_at] != MODE_DECIMAL:
                values = list(struct.unpack_from(f"<{n}d", buf, mode_at + 1))
                return list(accumulate(accumulate(dod), initial=first)), values
            f = 10 ** buf[mode_at + 1]
            found[n + 1 :] = _VARINT.findall(buf, mode_at + 2)
        if len(found) < 2 * n + 1:
            raise ValueError("packed blob is truncated")
        values = list(map(truediv, accumulate(_ints(found[n + 1 : 2 * n + 1])), repeat(f)))
    return list(accumulate(accumulate(dod), initial=first)), values
