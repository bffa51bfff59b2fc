"""What this process saw of ingest: requests, 5xx answers and latency, per minute.

The error middleware (the one place every answer passes) calls `Observer.ingest` for
every answer to /v1/ingest*: two integer increments and a bucket lookup. The status
monitor moves the counts into status_minutes (one row per minute and process), from
which any process computes the merged 5xx rate and p99. The same figures feed this
process's prometheus_client histogram and counters for /metrics.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram

# Upper bounds in seconds. 2.0 is a bound, so "p99 above 2 s" is exact: more than 1 %
# of the answers fell above it.
INGEST_SLOW_BOUND = 2.0  # seconds: the P2 p99 threshold (docs/product.md#incident-classes)
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)


def bucket_of(seconds: float) -> int:
    """Index in a counts list of len(LATENCY_BUCKETS) + 1 (the last: above 10 s)."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


def share_above(counts: list[int], bound: float) -> float:
    """Share of answers slower than `bound` (a member of LATENCY_BUCKETS)."""
    total = sum(counts)
    if not total:
        return 0.0
    i = LATENCY_BUCKETS.index(bound)
    return sum(counts[i + 1 :]) / total


def quantile_bound(counts: list[int], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile; inf above the last bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
    return float("inf")


@dataclass
class Minute:
    requests: int = 0
    errors_5xx: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


class Observer:
    def __init__(self) -> None:
        self.minutes: dict[datetime, Minute] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "opensense_ingest_requests",
            "Ingest answers (HTTP /v1/ingest*) by this process, by status class",
            ["status_class"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "opensense_ingest_latency_seconds",
            "Ingest answer time in this process",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def ingest(self, now: datetime, status: int, seconds: float) -> None:
        key = now.replace(second=0, microsecond=0)
        m = self.minutes.get(key)
        if m is None:
            m = self.minutes[key] = Minute()
        m.requests += 1
        if status >= 500:
            m.errors_5xx += 1
        m.latency[bucket_of(seconds)] += 1
        self.requests.labels(f"{status // 100}xx").inc()
        self.latency.observe(seconds)

    def take(self) -> dict[datetime, Minute]:
        """Hand the counts over (the monitor adds them to status_minutes)."""
        out, self.minutes = self.minutes, {}
        return out

    def give_back(self, minutes: dict[datetime, Minute]) -> None:
        """The database write failed: keep the counts for the next tick."""
        for key, m in minutes.items():
            cur = self.minutes.setdefault(key, Minute())
            cur.requests += m.requests
            cur.errors_5xx += m.errors_5xx
            cur.latency = [a + b for a, b in zip(cur.latency, m.latency, strict=True)]
