"""The packing codec is lossless, bit for bit, and small for real fridge data."""

from __future__ import annotations

import math
import struct

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
