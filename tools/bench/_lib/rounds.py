"""Rounds that alternate the ways a bench compares (the baseline and the code now),
so that the box's drift falls on both alike; each way's figure is its median round
(tools/bench/paholoop, tools/bench/listen)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def alternate(
    ways: Sequence[str], rounds: int, measure: Callable[[str], float], unit: str, fmt: str
) -> list[float]:
    """`measure(way)` for each way, round after round, each figure printed as it
    comes (`fmt` formats it, `unit` follows); the ways' median rounds, in order."""
    width = max(len(w) for w in ways)
    got: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(rounds):
        for way in ways:
            got[way].append(measure(way))
            print(f"  round {r + 1}  {way:<{width}}  {got[way][-1]:{fmt}} {unit}", flush=True)
    return [statistics.median(got[w]) for w in ways]
