"""Vertical presets, declared once as data.

A site has one vertical; the first uplink of a new channel gets that vertical's
default rule for its kind (docs/product.md#vertical-presets; HACCP limits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DefaultRule:
    kind: str  # rule kind, e.g. "range"
    params: dict[str, Any]
    grace_min: int


@dataclass(frozen=True)
class Vertical:
    name: str
    doc: str
    rules: dict[str, DefaultRule]  # measurement kind -> default rule


def _range(lo: float, hi: float, grace: int) -> DefaultRule:
    return DefaultRule("range", {"ok_min": lo, "ok_max": hi}, grace)


VERTICALS: dict[str, Vertical] = {
    v.name: v
    for v in (
        Vertical(
            "chilled_storage",
            "HACCP chilled storage: −2..+5 °C, 15 min grace (default).",
            {"temperature": _range(-2.0, 5.0, 15)},
        ),
        Vertical(
            "chilled_display",
            "HACCP chilled display: −2..+8 °C, 30 min grace.",
            {"temperature": _range(-2.0, 8.0, 30)},
        ),
        Vertical(
            "frozen",
            "HACCP frozen storage: −24..−18 °C, 30 min grace.",
            {"temperature": _range(-24.0, -18.0, 30)},
        ),
        Vertical(
            "hot_holding",
            "HACCP hot holding: +63..+85 °C, 5 min grace.",
            {"temperature": _range(63.0, 85.0, 5)},
        ),
        Vertical(
            "server_room",
            "Server room: intake 18..27 °C, RH 20..80 %.",
            {"temperature": _range(18.0, 27.0, 15), "humidity": _range(20.0, 80.0, 15)},
        ),
    )
}

DEFAULT_VERTICAL = "chilled_storage"
