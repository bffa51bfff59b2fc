"""When a client sends again: the retry rule every sender of readings follows (the
firmware to the server or its gateway, the gateway's uplink to the server, the
server's own broker consumer when it reconnects).

- a 5xx or a lost connection: back off from BACKOFF_FIRST_S, doubling each attempt,
  capped at BACKOFF_CAP_S, with jitter (the delay is 50..100 % of it, so nodes that
  lost the broker together do not come back in lockstep);
- 429: wait the server's Retry-After (seconds; RETRY_AFTER_DEFAULT_S when absent or
  unreadable), held within RETRY_AFTER_MIN_S..RETRY_AFTER_MAX_S;
- 401, 403 and any other 4xx: never send that again (a human must fix the token or
  the config, or the payload is refused for good).

The server says how long to wait when it is busy: SERVER_BUSY_RETRY_S in the
Retry-After of its 503s (the database unreachable, the token checks queued).
"""

from __future__ import annotations

BACKOFF_FIRST_S = 1
BACKOFF_CAP_S = 60
RETRY_AFTER_DEFAULT_S = 60
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 3600
SERVER_BUSY_RETRY_S = 5
# statuses after which a sender stops (its queue kept) until a human acts
NEVER_RETRY_STATUSES = (401, 403, 422)


def backoff(attempt: int, rand: float) -> float:
    """Seconds to wait before attempt number `attempt` + 1 (0, 1, 2, …) after a 5xx or
    a lost connection; `rand` in [0, 1) places it within 50..100 % of the step."""
    base = min(float(BACKOFF_CAP_S), BACKOFF_FIRST_S * 2.0 ** max(0, attempt))
    return base * (0.5 + rand / 2)


def retry_after(header: str | None, default: float = RETRY_AFTER_DEFAULT_S) -> float:
    """429: the server's Retry-After (seconds), within the contract's bounds."""
    try:
        v = float(header) if header is not None else default
    except ValueError:
        v = default
    return min(float(RETRY_AFTER_MAX_S), max(float(RETRY_AFTER_MIN_S), v))


def gives_up(status: int) -> bool:
    """True for an answer no retry can change (any 4xx but 429)."""
    return 400 <= status < 500 and status != 429
