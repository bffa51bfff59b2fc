"""Driving the pure engine from the database.

Wake-up: the statement that stores readings also upserts `alarm_dirty` (channel,
earliest new timestamp), and a trigger NOTIFYs at commit. An evaluator takes dirty
rows with FOR UPDATE SKIP LOCKED, locks the channels' `alarm_state` rows (the "one
evaluator per channel" guarantee across processes; SKIP LOCKED too: a channel whose
row is held elsewhere is marked again and judged by a later pass, so a pass never
waits for a batch writer that may be waiting for the pass's claims), feeds the new
readings to the engine in timestamp order, applies the transitions through the
lifecycle function and saves the state — all in one transaction: a crash rolls
everything back, including the claim on the dirty rows, so nothing is judged twice
or never.

Calm readings (migration 0032): the save also writes the channel's calm band
(`calm_band`: the values none of which can move its rules from ok) with the
`meta_rev` it holds at; the batch writer settles an established channel's readings
in that band itself (storage/batcher.py CALM_CTE), moving `last_ts` past the rules'
own last readings. A pass going on from there takes its checkpoint there (`_run`).

Late readings (older than what the channel has been judged up to) rewind the
channel to the last checkpoint before them and replay; event steps are idempotent
(an event is keyed by rule and true start), so a replay changes nothing it need not.

Time budget: the engine is pure CPU, and this loop shares the event loop with
ingest and MQTT. Readings are fed in slices of `SLICE_STEPS` engine steps with a
yield to the loop between them, and a pass stops feeding once it has run for its
budget (`OPENSENSE_ALARM_PASS_BUDGET_MS`): the channel in hand is saved up to the
reading it reached (with a checkpoint there) and marked dirty from the next one,
channels not started are marked dirty again, and the pass says so (`Stats.deferred`,
a warning in the log, a detail on the `rule_engine` health report). Each step
is itself bounded: windows are checked again when rules are loaded (a rule stored
with a window the API would refuse is judged without it, and logged).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import functools
import itertools
import json
import logging
import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import msgspec
from psycopg import AsyncConnection, AsyncCursor
from psycopg.abc import Buffer
from psycopg.rows import AsyncRowFactory, class_row
from psycopg.types.json import Jsonb, JsonbLoader
from psycopg_pool import AsyncConnectionPool

from ..db import arrays
from . import engine, outbox, rule_kinds
from .engine import Rule, RuleState, Transition, Window
from .lifecycle import AuditEntry, Change, transition, write_audit

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = timedelta(minutes=10)
CHECKPOINT_KEEP = timedelta(hours=25)
MAX_READINGS = 20000  # per channel and pass; the rest is picked up by the next pass
MAX_PASS_READINGS = 50000  # per pass, shared by its channels (memory, and time to fetch)
SLICE_STEPS = 512  # engine steps between two yields to the event loop
PASS_BUDGET_S = 0.25  # the default of OPENSENSE_ALARM_PASS_BUDGET_MS

_META_COLUMNS = """
SELECT c.num, c.id, c.account_id, c.device_id, s.timezone,
  coalesce((SELECT json_agg(json_build_object('id', r.id, 'kind', r.kind, 'params', r.params,
      'grace_min', r.grace_min, 'clear_min', r.clear_min, 'severity', r.severity,
      'windows', r.windows, 'renotify_min', r.renotify_min) ORDER BY r.created_at)
    FROM rules r WHERE r.channel_id = c.id AND r.enabled), '[]'::json)::text"""
# (every column and table this reads is watched by migration 0028's triggers)
META_SQL = (
    _META_COLUMNS
    + """
FROM channels c JOIN devices d ON d.id = c.device_id JOIN sites s ON s.id = d.site_id
WHERE c.num = ANY(%s)
"""
)
# The same for the channels of a pass whose META_SQL row `MetaCache` does not hold at
# their state's meta_rev (NULL: none held). Run after the pass locked the state rows,
# so meta_rev cannot change under it (migration 0028).
META_STALE_SQL = (
    _META_COLUMNS
    + """
FROM unnest(%b::int4[], %b::int8[]) AS k(num, rev)
  JOIN alarm_state a ON a.channel_num = k.num AND a.meta_rev IS DISTINCT FROM k.rev
  JOIN channels c ON c.num = k.num JOIN devices d ON d.id = c.device_id
  JOIN sites s ON s.id = d.site_id
"""
)


_json_decode = msgspec.json.Decoder().decode
# the states, events and checkpoints a pass saves, written by msgspec instead of
# `json.dumps` (psycopg's default): the same JSON for what they hold (strings, finite
# floats, integers, booleans, None, in lists and objects; a reading is never NaN or
# infinite), ~6x faster (0.9 against 6.2 µs on a channel's state of two rules)
_json_encode = msgspec.json.Encoder().encode


class _JsonbLoader(JsonbLoader):
    """jsonb read by msgspec instead of `json.loads`: the same values for any text
    PostgreSQL gives out for a jsonb (valid JSON, no NaN, no lone surrogates, integers
    of any size as int), about 3x faster on a channel's state; used by the evaluator's
    own cursors only (`_cursor`)."""

    def load(self, data: Buffer) -> Any:
        return _json_decode(data)


def _cursor(conn: AsyncConnection[Any], row_factory: AsyncRowFactory[Any] | None = None) -> Any:
    """A cursor of `conn` whose jsonb columns are read by `_JsonbLoader`."""
    cur: AsyncCursor[Any] = (
        conn.cursor(row_factory=row_factory) if row_factory is not None else conn.cursor()
    )
    cur.adapters.register_loader("jsonb", _JsonbLoader)
    return cur


class StateRow(NamedTuple):
    """A channel's `alarm_state` row as the evaluator reads it. Its checkpoints (up to
    150 of them after a day: the bulk of the row) are not read: the times of the first
    and last one, kept beside them (migration 0029), are all a pass needs unless it
    rewinds; a rewind reads them whole (`_full_checkpoints`). A named tuple, made
    straight from the row's values (`_state_row`): a frozen dataclass through
    `class_row` cost ~6 µs a channel, a tenth of the evaluator's Python at a fleet's
    trickle."""

    channel_num: int
    rules: dict[str, Any]  # rule id -> RuleState JSON
    events: dict[str, Any]  # rule id -> open event id
    # of the checkpoints ([[iso time, rules, events], ...] stored, oldest first):
    last_checkpoint: datetime | None  # the time of the last one
    # the time of the first one: the oldest, as every checkpoint is added at least
    # CHECKPOINT_EVERY after the one before it (or to none), and dropping keeps the order
    first_checkpoint: datetime | None
    last_ts: datetime | None  # judged up to this reading
    # changes with anything META_SQL reads for the channel (migration 0028): what
    # `MetaCache` keeps is good while this is the same
    meta_rev: int


def _state_row(_cur: Any) -> Any:
    """Row factory of STATE_SQL: its columns are StateRow's fields, in order."""
    return StateRow._make


# (cp_last and cp_first, not the array's own ends: each of `checkpoints -> -1`,
# `checkpoints -> 0` decompressed the whole array, ~30 kB after a day: migration 0029)
STATE_SQL = (
    "SELECT channel_num, rules, events, cp_last, cp_first, last_ts, meta_rev FROM alarm_state"
)


async def _states(conn: AsyncConnection[Any], sql: str, args: Any) -> dict[int, StateRow]:
    cur = _cursor(conn, _state_row)
    await cur.execute(STATE_SQL + sql, args)
    return {r.channel_num: r for r in await cur.fetchall()}


async def _full_checkpoints(conn: AsyncConnection[Any], nums: list[int]) -> dict[int, list[Any]]:
    """The checkpoints of channels that rewind (their alarm_state rows locked by the
    caller), each [iso time, rules, events], oldest first (migration 0030)."""
    if not nums:
        return {}
    cur = await _cursor(conn).execute(
        "SELECT channel_num, cp FROM alarm_checkpoints WHERE channel_num = ANY(%s)"
        " ORDER BY channel_num, id",
        (nums,),
    )
    out: dict[int, list[Any]] = {n: [] for n in nums}
    for n, cp in await cur.fetchall():
        out[int(n)].append(cp)
    return out


@dataclass
class Meta:
    num: int
    channel_id: str
    account_id: str
    device_id: str
    tz: ZoneInfo
    rules: list[Rule]

    @functools.cached_property
    def band(self) -> tuple[float, float] | None:
        """`calm_band` of the rules (built once: Meta never changes after it is made)."""
        return calm_band(self.rules)


def calm_band(rules: Sequence[Rule]) -> tuple[float, float] | None:
    """The values no reading of which can move any of these rules from ok, whatever
    their state's times (migration 0032): every rule's kind has a band
    (RuleBehaviour.band: judged by the value alone) and none has a time window (whose
    limits change with the time); the band is where theirs overlap. None: some rule
    is judged by more than the value, so every reading is the engine's. With no rule
    at all every value is calm."""
    low, high = -math.inf, math.inf
    for r in rules:
        b = rule_kinds.BEHAVIOURS.get(r.kind)
        if b is None or b.band is None or r.windows:
            return None
        got = b.band(r.params)
        if got is None:
            return None
        low, high = max(low, got[0]), min(high, got[1])
    return low, high


def _windows(r: dict[str, Any]) -> tuple[Window, ...]:
    """The rule's windows that the API would accept today. One stored otherwise (put
    in the database by hand, or by an older release that accepted any RFC 5545 rule)
    is left out, so the rule is judged by its own limits (an alarm too many, never a
    silent one or a frozen server), and logged."""
    global _logged
    out = []
    for w in r.get("windows") or []:
        why = engine.check_window(w)
        if why is not None:
            _logged += 1
            log.warning("rule %s: window ignored (%s)", r.get("id"), why)
            continue
        out.append(
            Window(
                w["rrule"],
                int(w["duration_min"]),
                w.get("params"),
                w.get("dtstart", Window.dtstart),
            )
        )
    return tuple(out)


def rule_from_json(r: dict[str, Any]) -> Rule:
    return Rule(
        id=r["id"],
        kind=r["kind"],
        params=dict(r["params"] or {}),
        grace_min=int(r["grace_min"]),
        clear_min=r.get("clear_min"),
        severity=r.get("severity") or "alarm",
        windows=_windows(r),
        renotify_min=r.get("renotify_min"),
    )


async def _meta(conn: AsyncConnection[Any], nums: list[int]) -> dict[int, Meta]:
    cur = await _cursor(conn).execute(META_SQL, (nums,))
    return _meta_rows(await cur.fetchall())


def _meta_rows(rows: list[Any], keep: Any = None) -> dict[int, Meta]:
    """Meta by channel number; `keep(m)` is called with each one whose rules were
    built without a word in the log."""
    out = {}
    for num, cid, acc, dev, tz, rules in rows:
        before = _logged
        m = out[num] = Meta(num, cid, acc, dev, ZoneInfo(tz), _rules(rules))
        if keep is not None and _logged == before:
            keep(m)
    return out


class MetaCache:
    """What META_SQL answered for a channel, with its state row's `meta_rev` then
    (migration 0028 says why an equal `meta_rev` means nothing it reads changed).
    The background evaluator's passes read the rules only of channels missing here
    or at another `meta_rev`: at a fleet's trickle META_SQL was ~13 µs of PostgreSQL
    a channel and pass (docs/ingest-cost.md, stop 30). A channel whose rules `_usable`
    or `_windows` logs about is not kept, so it is read (and logged) on every pass, as
    before. Bounded: emptied when it holds MAX channels. Meta is never changed after
    it is built; passes share it. One a process and database (alarms/tasks.py):
    channel numbers are the database's."""

    MAX = 131072

    def __init__(self) -> None:
        self._by_num: dict[int, tuple[int, Meta]] = {}

    def held(self, nums: list[int]) -> dict[int, tuple[int, Meta]]:
        """(meta_rev, Meta) of those of `nums` kept."""
        by_num = self._by_num
        return {n: hit for n in nums if (hit := by_num.get(n)) is not None}

    def put(self, m: Meta, rev: int) -> None:
        if len(self._by_num) >= self.MAX:
            self._by_num.clear()
        self._by_num[m.num] = (rev, m)


# A channel's rules as judged, by the text of META_SQL's aggregate of them (every
# field the rules are built from is in it: an edited rule is another text). Only
# rules that were taken as stored are kept: one that `_usable` or `_windows` logs
# about is built (and logged) again on every pass, as before. Bounded: emptied when
# full. The Rule objects are shared by the passes that find them here; nothing
# changes a Rule (frozen) or its params after it is built.
_RULES_CACHE: dict[str, tuple[Rule, ...]] = {}
RULES_CACHE_MAX = 16384
_logged = 0  # rules that `_usable` or `_windows` logged about, so far

# Below that, one rule as built, by everything but its id (the JSON of the rest): a
# fleet's channels share a few rule bodies (their site's default rule) but each
# channel's rules have ids of their own, so with more channels than RULES_CACHE_MAX
# (57,600 in tools/bench/fleet at 19,200 nodes) the cache above misses on every pass
# and each rule was checked and built anew (~7 µs a channel). A body is kept only if
# nothing was logged about it; the same bound.
_BODY_CACHE: dict[bytes, Rule] = {}


def _rules(text: str) -> list[Rule]:
    hit = _RULES_CACHE.get(text)
    if hit is not None:
        return list(hit)
    before = _logged
    rules = [x for r in _json_decode(text) if (x := _usable_cached(r))]
    if _logged == before:
        if len(_RULES_CACHE) >= RULES_CACHE_MAX:
            _RULES_CACHE.clear()
        _RULES_CACHE[text] = tuple(rules)
    return rules


def _usable_cached(r: dict[str, Any]) -> Rule | None:
    """`_usable(r)`, by way of `_BODY_CACHE`."""
    key = _json_encode({k: v for k, v in r.items() if k != "id"})
    like = _BODY_CACHE.get(key)
    if like is not None:  # (every field but the id from the body: Rule's own list)
        return dataclasses.replace(like, id=r["id"])
    before = _logged
    rule = _usable(r)
    if rule is not None and _logged == before:
        if len(_BODY_CACHE) >= RULES_CACHE_MAX:
            _BODY_CACHE.clear()
        _BODY_CACHE[key] = rule
    return rule


def _usable(r: dict[str, Any]) -> Rule | None:
    """The rule, if the API would accept its kind and parameters today. One that it
    would not (stored by hand: `ok_max` as a string, say) cannot be judged, and would
    make every pass that claims its channel fail, holding back the evaluation of every
    other channel (of every account) in the same pass: it is left out and logged."""
    global _logged
    rk = engine.RULE_KINDS.get(str(r.get("kind")))
    params = r.get("params") or {}
    if rk is not None and isinstance(params, dict):
        for p in rk.params:  # a window longer than the API allows now: judged over the most
            v = params.get(p.name)
            if p.maximum is not None and isinstance(v, int | float) and v > p.maximum:
                _logged += 1
                log.warning("rule %s: %s %s taken as %g", r.get("id"), p.name, v, p.maximum)
                r = {**r, "params": params | {p.name: p.maximum}}
                params = r["params"]
    why = (
        engine.check_params(str(r.get("kind")), params)
        if isinstance(params, dict)
        else "params must be an object"
    )
    if why is None:
        try:
            return rule_from_json(r)
        except (KeyError, TypeError, ValueError) as exc:
            why = repr(exc)
    _logged += 1
    log.error("rule %s cannot be judged and is skipped: %s", r.get("id"), why)
    return None


@dataclass
class Stats:
    channels: int = 0
    readings: int = 0
    transitions: int = 0
    rewinds: int = 0
    deferred: int = 0  # channels left dirty for the next pass: the pass ran out of budget
    calm: int = 0  # channels whose readings moved no rule, passed at once (engine.calm_run)


class Recent:
    """The channels this process judged in the last `gap_s` seconds, by when
    (monotonic). `evaluate_dirty` leaves such a channel's new mark for later, until
    `gap_s` after its judgement or after the mark, whichever is first: a channel under
    a steady stream is judged about once in `gap_s`, over all it got meanwhile (a pass
    costs a fixed amount a channel: docs/ingest-cost.md), while one that gets a
    reading now and then is judged as soon as its commit's wake-up comes. Per process:
    another process's evaluator does not see it (it may judge the channel sooner,
    which is correct, only less gathered). Bounded by the channels judged in `gap_s`."""

    def __init__(self, gap_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.gap_s = gap_s
        self._clock = clock
        self._at: dict[int, float] = {}

    def judged(self, nums: Sequence[int]) -> None:
        t = self._clock()
        self._prune(t)
        for n in nums:
            self._at.pop(n, None)  # (re-inserted: the dict stays in judgement order)
            self._at[n] = t

    def nums(self) -> list[int]:
        self._prune(self._clock())
        return list(self._at)

    def next_due(self) -> float | None:
        """Seconds until the earliest of them may be judged again (None: none held)."""
        self._prune(self._clock())
        if not self._at:
            return None
        first = next(iter(self._at.values()))
        return max(0.0, first + self.gap_s - self._clock())

    def _prune(self, t: float) -> None:
        at = self._at
        while at:
            n, when = next(iter(at.items()))
            if t - when < self.gap_s:
                break
            del at[n]


# The claim: the oldest marks first, settled for `settled` s, and not of a channel
# judged in the last `gap` s (`recent`) unless marked that long ago (NOT IN over a
# subquery: hashed once a statement). Three parts, each for a reason measured under
# the ingest bench's HTTP 32 load (docs/ingest-cost.md, stops 38 and 39):
# - the marks are chosen and locked in a MATERIALIZED CTE, computed once: as
#   `DELETE … WHERE channel_num IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)` the
#   subquery could run again within the statement and lock a further n each time (a
#   claim took 2,048 marks at a limit of 128; tests/test_alarm_claim.py);
# - they are read along migration 0034's index on `marked_at`, the scan stopping at
#   the limit, with the clock read once (`c`);
# - they are deleted by `ctid`, where they were locked: a TID scan whatever the
#   table's statistics. By `channel_num` the plan followed them and, with those of a
#   new or turned-over table, compared every mark with each one taken (2–14 ms a
#   claim). A mark a writer updated after this statement's snapshot is locked in its
#   new version, which the DELETE does not see: it stays, locked until the pass
#   commits, and the next claim takes it.
CLAIM_SQL = """
WITH c AS MATERIALIZED (SELECT clock_timestamp() AS t),
pick AS MATERIALIZED (
  SELECT ctid FROM alarm_dirty
  WHERE marked_at <= (SELECT t FROM c) - make_interval(secs => %(settled)s)
    AND (marked_at <= (SELECT t FROM c) - make_interval(secs => %(gap)s)
         OR channel_num NOT IN (SELECT unnest(%(recent)b::int4[])))
  ORDER BY marked_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
DELETE FROM alarm_dirty d WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM pick))
RETURNING d.channel_num, d.since, d.marked_at
"""


# A channel the pass could not finish is marked again with the time it was first
# marked, so it keeps its place (oldest first) and is settled at once: the loop goes
# on with it, rather than waiting a gather for a mark of its own (`settled_s`).
REMARK_SQL = (
    "INSERT INTO alarm_dirty (channel_num, since, marked_at)"
    " SELECT * FROM unnest(%s::int4[], %s::timestamptz[], %s::timestamptz[]) ORDER BY 1"
    " ON CONFLICT (channel_num) DO UPDATE SET since = least(alarm_dirty.since, excluded.since),"
    "  marked_at = least(alarm_dirty.marked_at, excluded.marked_at)"
)


async def evaluate_dirty(
    pool: AsyncConnectionPool,
    now: datetime,
    # 512 measured too (docs/ingest-cost.md): the fleet's line 88,778 / 87,733 ->
    # 100,166 / 106,932 nodes, but HTTP 32 a request 38.1-42.6 -> 40.5-52.7 µs a
    # reading (four pairs, alternating); HTTP 32 is issue 14's target
    limit: int = 128,
    budget_s: float = PASS_BUDGET_S,
    settled_s: float = 0.0,
    metas: MetaCache | None = None,
    recent: Recent | None = None,
) -> Stats:
    """One pass over (up to `limit`) channels with new readings, oldest wake-up first,
    whose first unjudged reading was marked at least `settled_s` ago, and — with
    `recent` (the background evaluator's) — that this process did not judge in the
    last `recent.gap_s` (OPENSENSE_ALARM_GATHER_MS), unless their mark is that old:
    under a steady stream a channel is judged about once in that time, over what came
    meanwhile, not once a pass; a channel with a reading now and then is judged at
    once (its alarm too).
    A fixed number of statements whatever the batch size: claim; create and lock the
    states, and the rules (one round trip); readings; (the checkpoints of channels
    that rewind); mark again; save — each one statement for all the pass's channels;
    only a transition (an event step) and a comparison rule's other channel cost a
    statement of their own.
    Past `budget_s` of run time the pass stops feeding readings (see the module doc).
    `metas`: the channels' rules and ids kept from earlier passes (the background
    evaluator's); without it every pass reads them all."""
    st = Stats()
    deadline = time.monotonic() + budget_s
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            CLAIM_SQL,
            {
                "settled": settled_s,
                "gap": recent.gap_s if recent is not None else 0.0,
                "recent": arrays.int4s(recent.nums() if recent is not None else []),
                "limit": limit,
            },
        )
        claimed = await cur.fetchall()
        dirty = {int(n): s for n, s, _ in claimed}
        marked = {int(n): m for n, _, m in claimed}
        if not dirty:
            return st
        nums = sorted(dirty)
        packed_nums = arrays.int4s(nums)
        scur = _cursor(conn, _state_row)
        mcur = _cursor(conn)
        if metas is None:
            metas = MetaCache()  # (this pass's own: it reads every channel's rules)
        held = metas.held(nums)
        icur = _cursor(conn)
        async with conn.pipeline():  # one round trip for the three
            await icur.execute(  # (the rows not there yet: an ON CONFLICT check costs more)
                "INSERT INTO alarm_state (channel_num, channel_id) SELECT c.num, c.id"
                " FROM unnest(%b::int4[]) AS u(num) JOIN channels c ON c.num = u.num"
                " WHERE NOT EXISTS (SELECT FROM alarm_state s WHERE s.channel_num = u.num)"
                " ORDER BY c.num ON CONFLICT DO NOTHING RETURNING channel_num",
                (packed_nums,),
            )
            # SKIP LOCKED: a pass never waits for a lock another transaction holds on a
            # state row. The batch writer locks the rows of the channels it settles
            # (storage/batcher.py CALM_CTE) and waits for this pass's claims on
            # alarm_dirty; were a pass to wait here in turn, the two could deadlock.
            await scur.execute(
                STATE_SQL
                + " WHERE channel_num = ANY(%b) ORDER BY channel_num FOR UPDATE SKIP LOCKED",
                (packed_nums,),
            )
            # only those not held at their meta_rev, which the lock above fixes
            revs = [hit[0] if (hit := held.get(n)) is not None else None for n in nums]
            await mcur.execute(META_STALE_SQL, (packed_nums, arrays.int8s(revs)))
        states = {r.channel_num: r for r in await scur.fetchall()}
        busy: list[int] = []  # claimed, their state row locked elsewhere: marked again
        if len(states) < len(nums):
            bcur = await conn.execute(
                "SELECT channel_num FROM alarm_state WHERE channel_num = ANY(%s)"
                " ORDER BY channel_num",
                ([n for n in nums if n not in states],),
            )
            busy = [int(r[0]) for r in await bcur.fetchall()]  # (the rest: no channel)
        # A state row made by this pass is not kept: a rule edit that commits after
        # the rules were read below, before this pass commits, finds no row for its
        # trigger to move (this one is not visible to it yet), so its `meta_rev`
        # would vouch for rules that are no longer so. The next pass reads them again
        # with the row committed (tests/test_evaluator_meta_cache.py).
        made = {int(r[0]) for r in await icur.fetchall()}
        keep = metas.put

        def kept(m: Meta) -> None:
            row = states.get(m.num)  # (None: locked elsewhere, not judged here)
            if m.num not in made and row is not None:
                keep(m, row.meta_rev)

        meta = _meta_rows(await mcur.fetchall(), kept)
        for num, (rev, m) in held.items():
            row = states.get(num)
            if num not in meta and row is not None and row.meta_rev == rev:
                meta[num] = m
        todo = [num for num in nums if num in meta and num in states]
        full = await _full_checkpoints(conn, [n for n in todo if _rewinds(states[n], dirty[n])])
        plans = {num: _plan(states[num], dirty[num], st, full.get(num)) for num in todo}
        per_channel = max(100, min(MAX_READINGS, MAX_PASS_READINGS // max(1, len(plans))))
        lower = {num: p.lower for num, p in plans.items()}
        readings = await _readings(conn, lower, per_channel)
        saves: list[Save] = []
        remarks: list[tuple[int, datetime]] = [(n, dirty[n]) for n in busy]
        pending: list[AuditEntry] = []
        for num, p in plans.items():
            rs = readings.get(num, [])
            if not rs:
                continue
            if st.channels and time.monotonic() >= deadline:
                st.deferred += 1  # not started: judged by the next pass, from where it was
                remarks.append((num, dirty[num]))
                continue
            band_rev = None if num in made else states[num].meta_rev
            ran = await _run(conn, meta[num], p, rs, now, st, pending, deadline, band_rev)
            if ran is None:
                continue  # logged; the channel's next reading brings these back
            row, fed = ran
            saves.append(row)
            st.channels += 1
            if fed < len(rs):
                st.deferred += 1
            if fed < len(rs) or len(rs) >= per_channel:  # more to come: mark it again
                remarks.append((num, rs[fed - 1][0] + timedelta(microseconds=1)))
        if remarks:
            await conn.execute(
                REMARK_SQL,
                ([n for n, _ in remarks], [t for _, t in remarks], [marked[n] for n, _ in remarks]),
            )
        await save(conn, saves, now)
        await write_audit(conn, pending)  # last: after every row lock of this pass
        if len(busy) < len(nums):  # the claim made progress: look again
            st.channels = max(st.channels, 1)
    if recent is not None:  # committed: judged up to their last reading
        again = {n for n, _ in remarks}
        recent.judged([x.num for x in saves if x.num not in again])
    if st.deferred:
        log.warning(
            "rule evaluation: pass over its %.0f ms budget after %d readings;"
            " %d channel(s) continue in the next pass",
            budget_s * 1000, st.readings, st.deferred,
        )  # fmt: skip
    return st


@dataclass
class Plan:
    rules_json: dict[str, Any]
    events: dict[str, Any]
    # all the channel's checkpoints when `stored` is None (read for a rewind); else
    # only those this pass adds after the stored ones
    checkpoints: list[Any]
    lower: datetime  # readings after this are (re)judged
    judged_to: datetime | None = None  # where the channel stood (a replay ends there)
    stored: StateRow | None = None  # the stored checkpoints (their summary), kept


def _rewinds(row: StateRow, since: datetime) -> bool:
    """Whether the pass goes back before where the channel stands (late readings,
    a recompute): then it needs the checkpoints themselves."""
    return row.last_ts is not None and since <= row.last_ts


def _plan(row: StateRow, since: datetime, st: Stats, checkpoints: list[Any] | None = None) -> Plan:
    """From where to judge: where the channel stands, or — for late readings — the
    last checkpoint before them (or a fresh state a day earlier). `checkpoints`: all
    of the channel's, read when it rewinds (`_rewinds`)."""
    rules_json, events = dict(row.rules), dict(row.events)
    last_ts = row.last_ts
    tiny = timedelta(microseconds=1)
    if last_ts is None:
        return Plan(rules_json, events, [], since - tiny, stored=row)
    if since > last_ts:
        return Plan(rules_json, events, [], last_ts, last_ts, stored=row)
    assert checkpoints is not None, "a rewind reads the checkpoints"
    st.rewinds += 1
    keep = [c for c in checkpoints if datetime.fromisoformat(c[0]) < since]
    if keep:
        at = datetime.fromisoformat(keep[-1][0])
        return Plan(dict(keep[-1][1]), dict(keep[-1][2]), keep, at, last_ts)
    return Plan({}, events, [], since - timedelta(hours=24) - tiny, last_ts)


def _last_checkpoint(p: Plan) -> datetime | None:
    if p.checkpoints:
        return datetime.fromisoformat(p.checkpoints[-1][0])
    return p.stored.last_checkpoint if p.stored is not None else None


async def _readings(
    conn: AsyncConnection[Any], lower: dict[int, datetime], per_channel: int = MAX_READINGS
) -> dict[int, list[tuple[datetime, float]]]:
    if not lower:
        return {}
    nums = list(lower)
    # binary rows and parameters: the timestamps and values need no text parsing
    cur = await conn.cursor(binary=True).execute(
        "SELECT f.num, m.ts, m.value FROM unnest(%b::int4[], %b::timestamptz[]) AS f(num, lo)"
        " CROSS JOIN LATERAL (SELECT ts, value FROM measurements"
        "   WHERE channel_num = f.num AND ts > f.lo ORDER BY ts LIMIT %b) m"
        " ORDER BY f.num, m.ts",
        (arrays.int4s(nums), arrays.timestamptzs([lower[n] for n in nums]), per_channel),
    )
    # rows in channel order: one list a channel (value is float8: a float already)
    return {
        int(num): [(ts, value) for _, ts, value in rows]
        for num, rows in itertools.groupby(await cur.fetchall(), key=_first)
    }


_first = operator.itemgetter(0)


async def _lookup_for(
    conn: AsyncConnection[Any], m: Meta, lo: datetime, hi: datetime
) -> engine.Lookup:
    """The other channels' values around the readings, for the rules whose kind
    compares against another channel (RuleBehaviour.other_channel)."""
    series: dict[str, tuple[list[datetime], list[float]]] = {}
    for r in m.rules:
        other_of = rule_kinds.behaviour(r.kind).other_channel
        if other_of is None:
            continue
        other = other_of(r.params)
        cur = await conn.execute(
            "SELECT m.ts, m.value FROM measurements m JOIN channels c ON c.num = m.channel_num"
            " WHERE c.id = %s AND c.account_id = %s AND m.ts BETWEEN %s AND %s ORDER BY m.ts",
            (other, m.account_id, lo - timedelta(hours=1), hi),
        )
        rows = await cur.fetchall()
        series[other] = ([ts for ts, _ in rows], [float(v) for _, v in rows])

    def lookup(cid: str, t: datetime) -> float | None:
        ts, vs = series.get(cid, ([], []))
        i = bisect.bisect_right(ts, t)
        return vs[i - 1] if i else None

    return lookup


def _calm(
    rules: Sequence[Rule], states: dict[str, RuleState], readings: list[tuple[datetime, float]]
) -> dict[str, RuleState] | None:
    """Each rule's state after `readings` when every rule is calm over them
    (engine.calm_run), else None."""
    out: dict[str, RuleState] = {}
    for r in rules:
        c = engine.calm_run(r, states[r.id], readings)
        if c is None:
            return None
        out[r.id] = c
    return out


# the kinds judged from the channel's own readings alone (no RuleBehaviour.other_channel)
_SELF_ONLY_KINDS = frozenset(k for k, b in rule_kinds.BEHAVIOURS.items() if b.other_channel is None)


async def _run(
    conn: AsyncConnection[Any],
    m: Meta,
    p: Plan,
    readings: list[tuple[datetime, float]],
    now: datetime,
    st: Stats,
    pending: list[AuditEntry],
    deadline: float,
    rev: int | None = None,
) -> tuple[Save, int] | None:
    """Feed the readings, in slices, until done or past `deadline` (at least one
    slice); apply the transitions; return the state row to save (with the calm band
    at `rev`: `save_params`) and how many readings were fed."""
    states = {r.id: RuleState.from_json(p.rules_json.get(r.id)) for r in m.rules}
    events, checkpoints = p.events, p.checkpoints
    last = max((s.last_ts for s in states.values() if s.last_ts), default=None)
    if p.judged_to is not None and p.lower == p.judged_to and (last is None or last < p.lower):
        # going on from where the channel stands, which the batch writer moved past the
        # rules' own last readings with calm ones (migration 0032): the states hold
        # there too (a calm reading changes nothing but that time), so a checkpoint
        # is taken there
        last = p.lower
    prev = _last_checkpoint(p)
    if last is not None and (prev is None or last - prev >= CHECKPOINT_EVERY):
        # a copy of `events`: apply() changes the dict in place later in this pass, and a
        # checkpoint holding it would replay with events opened after the checkpoint
        # (a replayed clear then closed the wrong event)
        checkpoints.append(
            [last.isoformat(), {k: s.to_json() for k, s in states.items()}, dict(events)]
        )
    # every rule calm over the whole run (the usual case: in range, in ok): each state
    # moves to the last reading at once, with what feeding them one by one gives
    calm = _calm(m.rules, states, readings)
    if calm is not None:
        st.readings += len(readings)
        st.calm += 1
        saved = save_params(m, calm, events, checkpoints, readings[-1][0], p.stored, rev)
        return saved, len(readings)
    lookup = (
        engine._no_lookup
        if _SELF_ONLY_KINDS.issuperset([r.kind for r in m.rules])
        else await _lookup_for(conn, m, readings[0][0], readings[-1][0])
    )
    trs: list[Transition] = []
    fed = 0
    # slice by slice, each rule over the slice (engine.feed: what `step` gives reading
    # by reading, with the stretches a rule in ok passes unmoved taken at once); all
    # rules stop at the same reading. A rule's transitions come in time order, and the
    # sort below is stable, so they are applied in the order reading-by-reading gave.
    rules, tz, feed = m.rules, m.tz, engine.feed
    sts = [states[r.id] for r in rules]
    idx = range(len(rules))
    per_slice, n = max(1, SLICE_STEPS // max(1, len(rules))), len(readings)
    try:
        while fed < n:
            piece = readings[fed : fed + per_slice] if fed or n > per_slice else readings
            for i in idx:
                sts[i], out = feed(rules[i], sts[i], piece, tz, lookup)
                if out:
                    trs.extend(out)
            fed += len(piece)
            if fed < n:
                await asyncio.sleep(0)  # let ingest, MQTT and HTTP run
                if time.monotonic() >= deadline:
                    break
    except Exception:
        # nothing of this channel is written yet: skip it, not the whole pass
        log.exception("rule evaluation of channel %s failed; the channel is skipped", m.channel_id)
        return None
    for i, r in enumerate(rules):
        states[r.id] = sts[i]
    st.readings += fed
    if trs:  # (no transition: apply() has nothing to do)
        trs.sort(key=lambda t: t.at)
        await apply(conn, m, trs, events, now, pending)
        st.transitions += len(trs)
    upto = readings[fed - 1][0]
    if fed < len(readings) and p.judged_to is not None and upto < p.judged_to:
        # a replay cut short: a checkpoint where it stopped, so the next pass goes on
        # from there instead of rewinding to the same place again
        checkpoints.append(
            [upto.isoformat(), {k: s.to_json() for k, s in states.items()}, dict(events)]
        )
    return save_params(m, states, events, checkpoints, upto, p.stored, rev), fed


async def apply(
    conn: AsyncConnection[Any],
    m: Meta,
    trs: list[Transition],
    events: dict[str, Any],
    now: datetime,
    pending: list[AuditEntry],
) -> None:
    by_id = {r.id: r for r in m.rules}
    # of an event's peaks in this batch only the last counts: one UPDATE, not one per
    # rising reading (a peak is superseded by a later one before the event closes)
    superseded: set[int] = set()
    later: set[str] = set()
    for i in range(len(trs) - 1, -1, -1):
        t = trs[i]
        if t.what == "peak":
            if t.rule_id in later:
                superseded.add(i)
            later.add(t.rule_id)
        elif t.what in ("alarm", "cleared"):
            later.discard(t.rule_id)
    for i, t in enumerate(trs):
        if i in superseded:
            continue
        rule = by_id[t.rule_id]
        if t.what == "alarm":
            ev = await transition(
                conn,
                Change(
                    "open", t.at, now, account_id=m.account_id, channel_id=m.channel_id,
                    device_id=m.device_id, rule_id=rule.id, kind=rule.kind,
                    severity=rule.severity, started_at=t.since, value=t.value,
                ),
                pending,
            )  # fmt: skip
            events[rule.id] = ev["id"]
        elif t.what == "peak" and events.get(rule.id):
            await transition(
                conn, Change("peak", t.at, now, event_id=events[rule.id], value=t.value)
            )
        elif t.what == "cleared" and events.get(rule.id):
            await transition(
                conn,
                Change("clear", t.at, now, event_id=events.pop(rule.id), value=t.value),
                pending,
            )


@dataclass(frozen=True)
class Save:
    """A channel's new `alarm_state`, as `save` writes it. Checkpoints: `set` writes
    `checkpoints` as they are (a rewind read them all); `append` adds them after the
    stored ones; `merge` does too and drops those before `cutoff`; `keep` leaves the
    stored ones as they are (most passes: a checkpoint is added every 10 minutes of
    readings, and one drops out as often)."""

    num: int
    rules: Jsonb
    events: Jsonb
    cp_mode: str  # set | append | merge | keep
    checkpoints: Jsonb | None
    cutoff: datetime | None
    last_ts: datetime | None
    due_at: datetime | None
    status: str
    # the channel's calm band (migration 0032) and the meta_rev it holds at (None: no
    # band: the writer marks every reading for the engine)
    calm: tuple[float, float] | None = None
    calm_rev: int | None = None


# One statement for every channel of a pass (rows locked by the pass already). The
# arrays go in binary (%b): a text array would escape every quote of every state's
# JSON (psycopg does it by regular expression: a third of a pass's CPU before).
# cp_first and cp_last (migration 0029) are the times of the channel's first and
# last checkpoint rows once `save` has written them: looked up only for the saves
# that changed them (one in ten at most under a steady stream); kept otherwise.
SAVE_SQL = """
UPDATE alarm_state s SET rules = x.rules, events = x.events,
  cp_first = CASE WHEN x.cp_mode = 'keep' THEN s.cp_first
    ELSE (SELECT c.at FROM alarm_checkpoints c WHERE c.channel_num = x.num ORDER BY c.id LIMIT 1)
    END,
  cp_last = CASE WHEN x.cp_mode = 'keep' THEN s.cp_last
    ELSE (SELECT c.at FROM alarm_checkpoints c WHERE c.channel_num = x.num
          ORDER BY c.id DESC LIMIT 1)
    END,
  last_ts = greatest(s.last_ts, x.last_ts), due_at = x.due_at, status = x.status,
  calm_lo = x.calm_lo, calm_hi = x.calm_hi, calm_rev = x.calm_rev, updated_at = %(now)s
FROM unnest(%(nums)b::int4[], %(rules)b::jsonb[], %(events)b::jsonb[], %(cp_mode)b::text[],
    %(last_ts)b::timestamptz[], %(due_at)b::timestamptz[], %(status)b::text[],
    %(calm_lo)b::float8[], %(calm_hi)b::float8[], %(calm_rev)b::int8[])
  AS x(num, rules, events, cp_mode, last_ts, due_at, status, calm_lo, calm_hi, calm_rev)
WHERE s.channel_num = x.num
"""

# The checkpoints a save drops (migration 0030): all of a channel's (`set`: NULL
# cutoff) or those before its cutoff (`merge`); then those it adds, in order.
CHECKPOINTS_DROP_SQL = """
DELETE FROM alarm_checkpoints c
USING unnest(%b::int4[], %b::timestamptz[]) AS x(num, cutoff)
WHERE c.channel_num = x.num AND (x.cutoff IS NULL OR c.at < x.cutoff)
"""
CHECKPOINTS_ADD_SQL = """
INSERT INTO alarm_checkpoints (channel_num, at, cp)
SELECT num, at, cp FROM unnest(%b::int4[], %b::timestamptz[], %b::jsonb[])
  WITH ORDINALITY AS x(num, at, cp, i)
ORDER BY i
"""


async def save(conn: AsyncConnection[Any], saves: list[Save], now: datetime) -> None:
    if not saves:
        return
    # the checkpoints first: SAVE_SQL reads the times of the rows they leave
    drop = [x for x in saves if x.cp_mode in ("set", "merge")]
    if drop:
        await conn.execute(
            CHECKPOINTS_DROP_SQL,
            (
                arrays.int4s([x.num for x in drop]),
                arrays.opt_timestamptzs([x.cutoff if x.cp_mode == "merge" else None for x in drop]),
            ),
        )
    added: list[tuple[int, datetime, Any]] = []
    for x in saves:
        if x.cp_mode == "keep" or x.checkpoints is None:
            continue
        for cp in x.checkpoints.obj:
            at = datetime.fromisoformat(cp[0])
            # merge: those added before the cutoff go too, as stored ones do
            if x.cp_mode != "merge" or x.cutoff is None or at >= x.cutoff:
                added.append((x.num, at, cp))
    if added:
        await conn.execute(
            CHECKPOINTS_ADD_SQL,
            (
                arrays.int4s([n for n, _, _ in added]),
                arrays.timestamptzs([t for _, t, _ in added]),
                arrays.jsonbs([_json_encode(cp) for _, _, cp in added]),
            ),
        )
    # the arrays packed here (db/arrays.py): psycopg dumps a binary array element by
    # element from a Python loop (packed, a pass judging one reading a channel costs
    # x0.88 of the server's CPU: tools/bench/evaluator --readings 1)
    await conn.execute(
        SAVE_SQL,
        {
            "now": now,
            "nums": arrays.int4s([x.num for x in saves]),
            "rules": arrays.jsonbs([_json_text(x.rules) for x in saves]),
            "events": arrays.jsonbs([_json_text(x.events) for x in saves]),
            "cp_mode": arrays.texts([x.cp_mode for x in saves]),
            "last_ts": arrays.opt_timestamptzs([x.last_ts for x in saves]),
            "due_at": arrays.opt_timestamptzs([x.due_at for x in saves]),
            "status": arrays.texts([x.status for x in saves]),
            "calm_lo": arrays.opt_float8s([x.calm[0] if x.calm else None for x in saves]),
            "calm_hi": arrays.opt_float8s([x.calm[1] if x.calm else None for x in saves]),
            "calm_rev": arrays.int8s([x.calm_rev if x.calm else None for x in saves]),
        },
    )


def _json_text(j: Jsonb | None) -> bytes | None:
    """A Jsonb's JSON text, as psycopg's jsonb dumper writes it (its own `dumps`, else
    json.dumps)."""
    if j is None:
        return None
    data = (j.dumps or json.dumps)(j.obj)
    return data.encode() if isinstance(data, str) else bytes(data)


def save_params(
    m: Meta,
    states: dict[str, RuleState],
    events: dict[str, Any],
    checkpoints: list[Any] | None,
    last_ts: datetime | None,
    stored: StateRow | None = None,
    rev: int | None = None,
) -> Save:
    """The channel's row to save. `checkpoints`: all of them (`stored` None), or those
    added after the stored ones (`stored`: their summary), or None: left as stored.
    Checkpoints more than CHECKPOINT_KEEP before `last_ts` are dropped. `rev`: the
    `meta_rev` of the locked row the rules `m` holds were read at, which the calm band
    is saved with (None: none saved; a row this pass made, see `evaluate_dirty`)."""
    cutoff = last_ts - CHECKPOINT_KEEP if last_ts is not None else None
    mode, cps = "keep", None
    if checkpoints is not None and stored is None:
        if cutoff is not None:
            checkpoints = [c for c in checkpoints if datetime.fromisoformat(c[0]) >= cutoff]
        mode, cps = "set", Jsonb(checkpoints, _json_encode)
    elif checkpoints is not None and stored is not None:
        times = [datetime.fromisoformat(c[0]) for c in checkpoints]
        if stored.first_checkpoint is not None:
            times.append(stored.first_checkpoint)
        if cutoff is not None and any(t < cutoff for t in times):
            # some go: the database drops them
            mode, cps = "merge", Jsonb(checkpoints, _json_encode)
        elif checkpoints:
            mode, cps = "append", Jsonb(checkpoints, _json_encode)
    dues = [d for r in m.rules if (d := engine.due_at(r, states[r.id])) is not None]
    return Save(
        m.num,
        Jsonb({k: s.to_json() for k, s in states.items()}, _json_encode),
        Jsonb(events, _json_encode),
        mode,
        cps,
        cutoff,
        last_ts,
        min(dues) if dues else None,
        engine.channel_status(m.rules, states),
        m.band if rev is not None else None,
        rev,
    )


async def tick_due(pool: AsyncConnectionPool, now: datetime, limit: int = 500) -> int:
    """Time-driven steps: grace running out with no new reading, absence gaps.
    A channel with readings waiting for a pass (marked in `alarm_dirty`) is left to
    that pass: its grace has not run out "with no new reading", and ticking it first
    opened an alarm (and sent it) that the waiting readings, judged a moment later,
    would never have opened (tests/test_alarms.py). Under a stream of readings whose
    times lag the clock (a node's buffer, the ingest bench) that was every grace. The
    pass judges them by their own times; whatever it leaves due, the next tick takes."""
    n = 0
    async with pool.connection() as conn, conn.transaction():
        rows = await _states(
            conn,
            " WHERE due_at <= %s AND NOT EXISTS (SELECT FROM alarm_dirty d"
            "  WHERE d.channel_num = alarm_state.channel_num)"
            " ORDER BY channel_num LIMIT %s FOR UPDATE SKIP LOCKED",
            (now, limit),
        )
        if not rows:
            return 0
        meta = await _meta(conn, sorted(rows))
        pending: list[AuditEntry] = []
        saves: list[Save] = []
        for num, row in rows.items():
            m = meta.get(num)
            if m is None:
                continue
            states = {r.id: RuleState.from_json(row.rules.get(r.id)) for r in m.rules}
            events = dict(row.events)
            trs: list[Transition] = []
            for r in m.rules:
                states[r.id], out = engine.tick(r, states[r.id], now)
                trs.extend(out)
            trs.sort(key=lambda t: t.at)
            await apply(conn, m, trs, events, now, pending)
            # (checkpoints kept)
            saves.append(save_params(m, states, events, None, None, rev=row.meta_rev))
            n += len(trs)
        await save(conn, saves, now)
        await write_audit(conn, pending)
    return n


@dataclass(frozen=True)
class DeviceSeen:
    """A device whose connectivity changed: silent past 2 x cadence, or back."""

    id: str
    account_id: str
    last_seen_at: datetime
    cadence_s: int
    offline_since: datetime | None  # set: it was offline (device_alarm_state)
    event_id: str | None  # its open device_offline event
    channel_id: str | None  # its first channel, to hang the event on


async def check_devices(pool: AsyncConnectionPool, now: datetime) -> int:
    """device_offline after 2 x cadence without a message; device_online when back."""
    n = 0
    async with pool.connection() as conn, conn.transaction():
        cur = conn.cursor(row_factory=class_row(DeviceSeen))
        await cur.execute(
            "SELECT d.id, d.account_id, d.last_seen_at, d.cadence_s, a.offline_since, a.event_id,"
            " (SELECT c.id FROM channels c WHERE c.device_id = d.id ORDER BY c.num LIMIT 1)"
            " AS channel_id"
            " FROM devices d LEFT JOIN device_alarm_state a ON a.device_id = d.id"
            " WHERE d.deleted_at IS NULL AND d.last_seen_at IS NOT NULL AND ("
            "  (a.offline_since IS NULL AND d.last_seen_at < %s - make_interval(secs => 2 * d.cadence_s))"
            "  OR (a.offline_since IS NOT NULL AND d.last_seen_at > a.offline_since))"
            " ORDER BY d.id FOR UPDATE OF d SKIP LOCKED",
            (now,),
        )
        pending: list[AuditEntry] = []
        for d in await cur.fetchall():
            dev, acc, seen, cadence = d.id, d.account_id, d.last_seen_at, d.cadence_s
            off_since, ev_id, chan = d.offline_since, d.event_id, d.channel_id
            if off_since is None:
                if chan is None:
                    continue  # no channel to hang the event on yet
                at = seen + timedelta(seconds=2 * cadence)
                ev = await transition(
                    conn,
                    Change(
                        "offline", at, now, account_id=acc, channel_id=chan, device_id=dev,
                        kind="device_offline", started_at=seen,
                    ),
                    pending,
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO device_alarm_state (device_id, offline_since, event_id)"
                    " VALUES (%s, %s, %s) ON CONFLICT (device_id) DO UPDATE"
                    " SET offline_since = excluded.offline_since, event_id = excluded.event_id",
                    (dev, seen, ev["id"]),
                )
            else:
                if ev_id:
                    await transition(conn, Change("online", seen, now, event_id=ev_id), pending)
                await conn.execute(
                    "UPDATE device_alarm_state SET offline_since = NULL, event_id = NULL"
                    " WHERE device_id = %s",
                    (dev,),
                )
            n += 1
        await write_audit(conn, pending)
    return n


async def silences(pool: AsyncConnectionPool, now: datetime) -> int:
    async with pool.connection() as conn, conn.transaction():
        return await outbox.silence_webhooks(conn, now)


async def renotify(pool: AsyncConnectionPool, now: datetime) -> int:
    """An acknowledged alarm still out of range re-notifies after renotify_min."""
    n = 0
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "SELECT e.id FROM events e JOIN rules r ON r.id = e.rule_id"
            " JOIN alarm_state s ON s.channel_id = e.channel_id"
            " WHERE e.state = 'acknowledged' AND r.renotify_min IS NOT NULL"
            " AND s.rules -> r.id ->> 'status' = 'alarm'"
            " AND greatest(e.acknowledged_at, e.renotified_at) + make_interval(mins => r.renotify_min) <= %s"
            " ORDER BY e.id FOR UPDATE OF e SKIP LOCKED",
            (now,),
        )
        for (eid,) in await cur.fetchall():
            await transition(conn, Change("renotify", now, now, event_id=eid))
            n += 1
    return n


async def recompute(
    conn: AsyncConnection[Any], channel_num: int, now: datetime, hours: int = 24
) -> None:
    """Replay the last `hours` of a channel: it is marked dirty from then, so the next
    pass rewinds to the checkpoint before that time and replays (idempotent: events
    are keyed by rule and true start, so existing events are found, not duplicated)."""
    await conn.execute(
        "INSERT INTO alarm_dirty (channel_num, since) VALUES (%s, %s)"
        " ON CONFLICT (channel_num) DO UPDATE SET since = least(alarm_dirty.since, excluded.since)",
        (channel_num, now - timedelta(hours=hours)),
    )
