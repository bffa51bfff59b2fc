# Resilience rules as pure functions of counters and time (no I/O, no clock reads):
# the node loop feeds them numbers, tests feed them numbers too.
from sense import contract as C

# The contract's client retry rule (opensense_contract.retry): 5xx -> backoff from
# 1 s, x2, cap 60 s, jitter; 429 -> Retry-After; 401/403/422 and any other 4xx ->
# never retry (a human must fix the token/config).
BACKOFF_FIRST_MS = C.BACKOFF_FIRST_MS
BACKOFF_CAP_MS = C.BACKOFF_CAP_MS


def backoff_ms(attempt, rand16, first=BACKOFF_FIRST_MS, cap=BACKOFF_CAP_MS):
    # attempt 0, 1, 2...; rand16 a random 0..65535. "Full jitter" on the upper half:
    # the delay is uniform in [d/2, d], so nodes that lost the broker together
    # (a broker restart) do not come back in lockstep, and never sooner than d/2.
    d = first << min(attempt, 16)
    if d > cap:
        d = cap
    half = d // 2
    return half + (half * rand16) // 65535


def http_retry(status, retry_after_s=None):
    # -> ms to wait before retrying, 0 = done (2xx), -1 = never retry (drop? no: stop
    # and keep the queue; a human must fix the token or the config)
    if 200 <= status < 300:
        return 0
    if status == C.RETRY_STATUS:
        # the server's Retry-After within the contract's bounds, as the gateway reads it
        ra = C.RETRY_AFTER_DEFAULT_S if retry_after_s is None else retry_after_s
        return int(min(C.RETRY_AFTER_MAX_S, max(C.RETRY_AFTER_MIN_S, ra)) * 1000)
    if status in C.NEVER_RETRY_STATUSES or 400 <= status < 500:
        return -1
    return None  # 5xx: caller uses backoff_ms


# Wi-Fi (network.WLAN.status() codes of the ESP32 port; mqtt_as's wifi_connect):
# one connect() per attempt, then poll status(); a new attempt (disconnect, connect)
# only after a failure status or WIFI_TIMEOUT_MS of STAT_CONNECTING. connect() during
# an attempt raises OSError('Wifi Internal Error') on the chip (micropython#17661).
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
WIFI_TIMEOUT_MS = 20000  # mqtt_as waits 60 x 500 ms at most; a WPA2 join takes 2-8 s
WIFI_UP = 0
WIFI_WAIT = 1
WIFI_RETRY = 2


def wifi_step(status, elapsed_ms, timeout_ms=WIFI_TIMEOUT_MS):
    # status: the last status() (None: no attempt yet, -1: status() raised);
    # elapsed_ms: since this attempt's connect(). -> WIFI_UP, WIFI_WAIT or WIFI_RETRY
    if status == STAT_GOT_IP:
        return WIFI_UP
    if status == STAT_CONNECTING and elapsed_ms < timeout_ms:
        return WIFI_WAIT
    return WIFI_RETRY  # failed (200-204), idle, an error, or connecting for too long


# Reboot ladder: with no uplink success for `ladder[0]` s restart Wi-Fi, for
# `ladder[1]` s reset the chip. The queue is on flash, so a reset loses nothing.
LADDER_S = (900, 3600)
WIFI_RESTART = 1
RESET = 2


def ladder_step(since_ok_s, done_step, ladder=LADDER_S):
    # -> the rung to climb now (0 = nothing); done_step = the highest rung already taken
    # since the last success, so each rung is taken once.
    if since_ok_s >= ladder[1] and done_step < RESET:
        return RESET
    if since_ok_s >= ladder[0] and done_step < WIFI_RESTART:
        return WIFI_RESTART
    return 0


# Boot-loop detection: a boot is "good" once the node ran HEALTHY_S seconds or got
# one uplink through, which clears the crash count. BOOTLOOP_N crashes in a row (an
# exception or a watchdog reset; power cuts do not count) -> safe mode: no app, the
# REPL free for mpremote for SAFE_WAIT_S, then a reset and one more try.
HEALTHY_S = 300
BOOTLOOP_N = 5
SAFE_WAIT_S = 3600


def safe_mode(crashes, n=BOOTLOOP_N):
    return crashes >= n


def batches(items, n=C.MAX_MEASUREMENTS):
    # the contract: 1..MAX_MEASUREMENTS measurements a request
    out = []
    for i in range(0, len(items), n):
        out.append(items[i : i + n])
    return out


def cadence_ok(s):
    # cmd/cadence and the config: 10 s .. 1 day, whole seconds (the contract's range,
    # which the server's API holds every device's cadence_s to)
    return (
        isinstance(s, int) and not isinstance(s, bool) and C.CADENCE_MIN_S <= s <= C.CADENCE_MAX_S
    )


def err_code(msg):
    # the error code of an …/err envelope {"error": {"code", "message", "request_id"}}
    # (docs/api.md), "unknown" for anything else: a refusal is counted all the same
    import json

    try:
        e = json.loads(msg)["error"]
        c = e["code"]
        return c if isinstance(c, str) and c else "unknown"
    except (ValueError, KeyError, TypeError, IndexError):
        return "unknown"
