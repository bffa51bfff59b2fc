"""The packing codec is lossless, bit for bit, and small for real fridge data."""

from __future__ import annotations

import hashlib
import math
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opensense.storage import packing


def bits(v: float) -> bytes:
    return struct.pack("<d", v)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=300, unique=True),
    st.data(),
)
def test_round_trip_is_exact(ts: list[int], data: st.DataObject) -> None:
    ts.sort()
    values = data.draw(
        st.lists(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.integers(-4000, 4000).map(lambda i: i / 16),  # DS18B20 steps
                st.integers(-999, 999).map(lambda i: i / 10),  # JSON decimals
                st.just(-0.0),
            ),
            min_size=len(ts),
            max_size=len(ts),
        )
    )
    got_ts, got_values = packing.unpack(packing.pack(ts, values))
    assert got_ts == ts
    assert [bits(v) for v in got_values] == [bits(v) for v in values]


def test_a_fridge_day_packs_far_below_12_bytes_a_reading() -> None:
    base = 1_700_000_000_000_000
    ts = [base + i * 60_000_000 + (i % 7) * 1000 for i in range(1440)]  # 1/min with jitter
    values = [round((3.5 + 1.2 * math.sin(i / 40)) * 16) / 16 for i in range(1440)]
    blob = packing.pack(ts, values)
    assert len(blob) / 1440 < 3, len(blob)


def test_noise_falls_back_to_doubles_and_stays_exact() -> None:
    ts = list(range(1, 101))
    values = [math.pi * i / 7 for i in range(100)]
    _, got = packing.unpack(packing.pack(ts, values))
    assert got == values


# --- the decoder against the per-varint loop it replaced -------------------------------
#
# `unpack` was a Python loop over every varint; it is now C-level passes (findall, a
# big-integer decode of all varints at once, accumulate). Blobs already stored were
# written for the loop, so the loop is kept here, verbatim, as the reference: every
# blob, and every byte string the loop accepts, must decode to the same lists.


def _old_get(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def old_unpack(blob: bytes) -> tuple[list[int], list[float]]:
    buf = zlib.decompress(blob)
    if buf[0] != packing.VERSION:
        raise ValueError(f"unknown packing version {buf[0]}")
    n, pos = _old_get(buf, 1)
    ts: list[int] = []
    prev = prev_delta = 0
    for i in range(n):
        d, pos = _old_get(buf, pos)
        if i == 0:
            prev = d
        else:
            prev_delta += d
            prev += prev_delta
        ts.append(prev)
    mode = buf[pos]
    pos += 1
    values: list[float] = []
    if mode == packing.MODE_DECIMAL:
        f = 10 ** buf[pos]
        pos += 1
        last = 0
        for _ in range(n):
            d, pos = _old_get(buf, pos)
            last += d
            values.append(last / f)
    else:
        for _ in range(n):
            values.append(struct.unpack_from("<d", buf, pos)[0])
            pos += 8
    return ts, values


def assert_same(blob: bytes) -> tuple[list[int], list[float]]:
    """unpack(blob) is old_unpack(blob): equal timestamps, bit-equal values, lists."""
    ts, values = packing.unpack(blob)
    old_ts, old_values = old_unpack(blob)
    assert type(ts) is list and type(values) is list
    assert ts == old_ts
    assert [bits(v) for v in values] == [bits(v) for v in old_values]
    return ts, values


VALUES = st.one_of(
    st.floats(),  # nan, ±inf, -0.0, subnormals, the extremes
    st.integers(-4000, 4000).map(lambda i: i / 16),  # DS18B20 steps
    st.integers(-999, 999).map(lambda i: i / 10),  # JSON decimals
    st.integers(-(2**53) + 1, 2**53 - 1).map(float),  # the largest exact decimals
    st.integers(-(10**12), 10**12).map(lambda i: i / 10**6),  # 6 places
    st.sampled_from([0.0, -0.0, 5e-324, -1.7976931348623157e308, math.inf, math.nan]),
)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(-(2**62), 2**62),
    st.lists(
        st.one_of(
            st.just(60_000_000),  # a steady cadence: one-byte delta-of-deltas
            st.integers(60_000_000 - 3_000_000, 60_000_000 + 3_000_000),  # µs jitter
            st.sampled_from([59, 60, 61]).map(lambda s: s * 1_000_000),  # a node's seconds
            st.integers(1, 2**40),  # gaps, bursts
        ),
        max_size=400,
    ),
    st.data(),
)
def test_any_day_decodes_as_the_old_loop_did(
    first: int, deltas: list[int], data: st.DataObject
) -> None:
    ts = [first]
    for d in deltas:
        ts.append(ts[-1] + d)
    values = data.draw(st.lists(VALUES, min_size=len(ts), max_size=len(ts)))
    if data.draw(st.booleans()):  # a whole day of one kind: decimal or doubles throughout
        values = [values[0]] * len(ts)
    blob = packing.pack(ts, values)
    got_ts, got_values = assert_same(blob)
    assert got_ts == ts
    assert [bits(v) for v in got_values] == [bits(v) for v in values]


def _varint(n: int, overlong: int) -> bytes:
    """Zigzag varint of any size, with `overlong` extra zero groups (still valid)."""
    z = 2 * n if n >= 0 else -2 * n - 1
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    for _ in range(overlong):
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


INTS = st.one_of(
    st.integers(-64, 63),  # one byte
    st.integers(-(2**20), 2**20),
    st.integers(-(2**55), 2**55),  # up to 8 bytes
    st.integers(-(2**80), 2**80),  # beyond a machine word
)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_any_byte_string_decodes_as_the_old_loop_did(data: st.DataObject) -> None:
    """Not only what pack writes: any count, any varints (long, overlong), any mode and
    scale byte, doubles of any bits, truncated or with bytes after. Where the loop
    raises, unpack raises too."""
    draw = data.draw
    n = draw(st.integers(0, 60))
    var = st.tuples(INTS, st.sampled_from([0, 0, 0, 1, 3])).map(lambda t: _varint(*t))
    buf = bytearray([draw(st.sampled_from([packing.VERSION] * 9 + [2]))])
    buf += _varint(n, 0)
    buf += b"".join(draw(st.lists(var, min_size=n, max_size=n)))
    mode = draw(st.sampled_from([packing.MODE_DECIMAL, packing.MODE_DOUBLE, 2, 0x81]))
    buf.append(mode)
    if mode == packing.MODE_DECIMAL:
        buf.append(draw(st.sampled_from([0, 1, 4, 6, 9, 0x80, 255])))
        buf += b"".join(draw(st.lists(var, min_size=n, max_size=n)))
    else:
        buf += draw(st.binary(min_size=8 * n, max_size=8 * n))
    cut = draw(st.integers(0, 12))
    if draw(st.booleans()) and cut < len(buf):
        buf = buf[: len(buf) - cut]
    buf += draw(st.binary(max_size=draw(st.sampled_from([0, 0, 3, 20]))))
    blob = zlib.compress(bytes(buf))
    try:
        old_unpack(blob)
    except Exception:
        with pytest.raises(Exception):  # noqa: B017 (the loop raised IndexError, this a ValueError)
            packing.unpack(blob)
        return
    assert_same(blob)


def test_edge_days_decode_exactly() -> None:
    cases = [
        ([], []),  # an empty day
        ([1_700_000_000_000_000], [4.2]),  # one reading
        ([-(2**63)], [math.nan]),
        ([2**63 - 1], [-0.0]),
        ([0, 1], [1.7976931348623157e308, -5e-324]),
        ([-(2**62), 0, 2**62], [2.0**53 - 1, -(2.0**53) + 1, 0.0]),
        ([0, 2**62, 2**63 - 1], [math.inf, -math.inf, 1e-6]),
        (list(range(0, 1440 * 60_000_000, 60_000_000)), [3.5] * 1440),  # all one-byte
    ]
    for ts, values in cases:
        got_ts, got_values = assert_same(packing.pack(ts, values))
        assert got_ts == ts
        assert [bits(v) for v in got_values] == [bits(v) for v in values]


def test_timestamps_must_strictly_increase() -> None:
    with pytest.raises(AssertionError):
        packing.pack([5, 5], [1.0, 2.0])  # a duplicate: the write path drops it first
    with pytest.raises(AssertionError):
        packing.pack([6, 5], [1.0, 2.0])


def test_pack_writes_the_same_bytes_as_ever() -> None:
    """Blobs written before the faster decoder are the format: pack is unchanged (its
    output hashed by the version before), and those blobs decode to their readings."""
    base = 1_700_000_000_000_000
    ts = [base + i * 60_000_000 + (i % 7) * 1000 for i in range(1440)]
    fridge = [round((3.5 + 1.2 * math.sin(i / 40)) * 16) / 16 for i in range(1440)]
    noise = [math.pi * i / 7 for i in range(1440)]
    digest = hashlib.sha256(packing.pack(ts, fridge)).hexdigest()
    assert digest == "9626ad5de7674dc2b2a0b4dba3de97e1483077c87dbc607111f9a264b8c728f8"
    digest = hashlib.sha256(packing.pack(ts, noise)).hexdigest()
    assert digest == "ea45671c23645cfcd439cd5d2277226f73c94e9596331dfa48ac8557e3f59070"
    stored = {
        "78da6364e16261387b0604041c1820a00100457c05ad": ([5, 7], [4.2, -0.0]),
        "78da6364e16261387b0604041c42c1e0aa3d0051da083f": ([5, 7], [4.2, 1 / 3]),
    }
    for blob, (want_ts, want_values) in stored.items():
        assert packing.pack(want_ts, want_values).hex() == blob
        got_ts, got_values = assert_same(bytes.fromhex(blob))
        assert got_ts == want_ts
        assert [bits(v) for v in got_values] == [bits(v) for v in want_values]
