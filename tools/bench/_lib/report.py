"""Printing figures: percentiles, PASS/MISS, ratios to a baseline of the same run."""

from __future__ import annotations

import math


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def fmt(x: float, digits: int = 0) -> str:
    """Thousands separated; "n/a" for nan or infinity."""
    return f"{x:,.{digits}f}" if math.isfinite(x) else "n/a"


def verdict(ok: bool) -> str:
    """A target's outcome. A miss is reported, never fatal: no bench fails on it."""
    return "PASS" if ok else "MISS"


def ratio(x: float, baseline: float) -> float:
    """x as a multiple of a baseline measured in the same run; nan without one."""
    return x / baseline if baseline and math.isfinite(baseline) else math.nan


def banner(title: str) -> None:
    say()
    say("=" * 78)
    say(title)
    say("=" * 78)
