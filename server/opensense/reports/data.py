"""What a compliance report says, computed from injected inputs (no I/O).

The loader (reports/load.py) reads a site's period from the database into
`ReportInput`; `compute` turns it into `ReportData`, which the templates print. Kept
pure so every number on the page can be recomputed by a test from the same inputs.

Conventions (docs/reports.md):
- The period is [from_date, to_date] in the site's time zone, both ends inclusive:
  it runs from local midnight of from_date to local midnight after to_date, so a
  month with a DST change has its real length (743 or 745 hours).
- Days are the site's local days; a DST day has 23 or 25 hours.
- Readings are UTC epoch seconds with values, ascending, in parallel arrays: a
  month of 20 channels at one a minute is 864,000 readings, and tuples of datetime
  objects would take ~10x the memory of two float arrays.
- A reading stands for the time until the next reading, but for at most two
  cadences: a longer silence is a gap, and a gap is never counted as in range.
- Excursion peaks come from the readings between the excursion's start and its
  close (the worst value in the direction of the broken limit).
- Mean kinetic temperature: T_k = (ΔH/R) / -ln(mean(exp(-ΔH/(R·T_i)))), T in kelvin,
  every reading weighted alike (readings come at a fixed cadence).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from itertools import compress, repeat
from operator import sub, truediv
from zoneinfo import ZoneInfo

MKT_DELTA_H_DEFAULT = 83_144.0  # J/mol (83.144 kJ/mol, the pharma default)
GAS_CONSTANT = 8.314  # J/(mol·K)
KELVIN = 273.15
GAP_CADENCES = 2  # a silence longer than this many cadences is a gap
CHART_BUCKET_S = 3600  # the overview chart's resolution: an hour's min and max
ZOOM_PAD_S = 3600  # a zoom chart shows an hour either side of its excursion
ZOOM_POINTS = 240  # at most this many (min, max) buckets in a zoom chart


@dataclass(frozen=True)
class Threshold:
    """The range in force on a channel from `since` (epoch s; None: from before the
    period). `who`: who set it, when it changed during the period."""

    since: float | None
    ok_min: float | None
    ok_max: float | None
    who: str = ""


@dataclass(frozen=True)
class Offset:
    """A channel's calibration offset from `since` (epoch s), as stored in
    `channel_offsets` (devices/store.py writes one row per change). Readings are stored
    with the offset in force when they arrived; the offsets are printed, never applied
    again."""

    since: float
    offset: float


@dataclass(frozen=True)
class Excursion:
    """An alarm event as stored (events table), with its acknowledgement."""

    id: str
    channel_id: str
    kind: str
    severity: str
    started_at: float  # first reading out of range
    alarm_at: float | None  # grace elapsed
    cleared_at: float | None
    value: float | None  # the event's recorded worst value
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    ack_note: str | None = None
    ack_cause: str | None = None
    ack_action: str | None = None
    ack_product: str | None = None
    cleared_by: str | None = None
    clear_note: str | None = None


@dataclass(frozen=True)
class ChannelInput:
    id: str
    name: str
    device: str  # the device's name
    unit: str
    cadence_s: int
    ts: Sequence[float]  # epoch seconds (UTC), ascending
    values: Sequence[float]
    thresholds: Sequence[Threshold] = ()  # ascending by since; the first may be None
    kind: str = "temperature"
    offsets: Sequence[Offset] = ()  # the calibration history up to the period's end, ascending


@dataclass(frozen=True)
class ReportInput:
    site_id: str
    site_name: str
    address: str
    timezone: str
    period_from: date
    period_to: date  # inclusive
    channels: Sequence[ChannelInput]
    excursions: Sequence[Excursion] = ()
    mkt_delta_h: float = MKT_DELTA_H_DEFAULT
    logo: bytes | None = None  # PNG or JPEG for the cover (render.check_logo bounds it)


@dataclass(frozen=True)
class DayStats:
    day: date
    hours: float  # the day's real length (23, 24 or 25)
    n: int
    vmin: float | None
    vmean: float | None
    vmax: float | None
    hours_in_range: float
    hours_with_data: float


@dataclass(frozen=True)
class Gap:
    start: float  # last reading before the silence (or the period's start)
    end: float  # next reading (or the period's end)

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class ExcursionRow:
    excursion: Excursion
    channel_name: str
    opened: float
    closed: float | None  # None: still open at the period's end
    duration_s: float  # to its close, or to the period's end when open
    peak: float | None  # from the readings; the event's value when none in the period
    # the zoom chart: (bucket start, min, max) around the excursion, at most ZOOM_POINTS
    zoom: list[tuple[float, float, float]] = field(default_factory=list)
    zoom_from: float = 0.0
    zoom_to: float = 0.0


@dataclass(frozen=True)
class ThresholdChange:
    channel_name: str
    at: float
    ok_min: float | None
    ok_max: float | None
    who: str


@dataclass(frozen=True)
class Note:
    """A footnote of a channel's daily table: what changed or was noted that day
    (`what`: threshold, offset, excursion). Readings themselves are never edited."""

    at: float
    what: str
    text: dict[str, str]


@dataclass
class ChannelReport:
    channel: ChannelInput
    days: list[DayStats]
    gaps: list[Gap]
    n: int
    vmin: float | None
    vmean: float | None
    vmax: float | None
    hours_in_range: float
    hours_with_data: float
    uptime: float  # share of the period covered by readings (0..1)
    mkt_c: float | None  # mean kinetic temperature in °C (temperature channels only)
    chart: list[tuple[float, float, float]] = field(default_factory=list)  # (t, min, max)
    hours_above: float = 0.0  # covered hours above the upper limit in force
    hours_below: float = 0.0  # covered hours below the lower limit in force
    notes: list[Note] = field(default_factory=list)


@dataclass
class ReportData:
    input: ReportInput
    start: float  # epoch s of the period's first local midnight
    end: float  # epoch s of the local midnight after period_to
    channels: list[ChannelReport]
    excursions: list[ExcursionRow]
    threshold_changes: list[ThresholdChange]

    @property
    def hours(self) -> float:
        return (self.end - self.start) / 3600

    @property
    def has_data(self) -> bool:
        return any(c.n for c in self.channels)


def local_midnight(d: date, tz: ZoneInfo) -> float:
    """Epoch seconds of local midnight starting day d."""
    return datetime.combine(d, time(0), tzinfo=tz).astimezone(UTC).timestamp()


def period_bounds(period_from: date, period_to: date, tz: str) -> tuple[float, float]:
    z = ZoneInfo(tz)
    return local_midnight(period_from, z), local_midnight(period_to + timedelta(days=1), z)


def mean_kinetic_temperature(
    celsius: Sequence[float], delta_h: float = MKT_DELTA_H_DEFAULT, r: float = GAS_CONSTANT
) -> float | None:
    """MKT in °C of equally weighted readings; None without readings."""
    if not celsius:
        return None
    k = delta_h / r
    # factor out the largest term (the warmest reading's) so exp() never underflows
    top = -k / (max(celsius) + KELVIN)
    # exp(-k / (c + KELVIN) - top) for each reading, as C-level maps (864,000 readings
    # a month for 20 channels)
    terms = map(math.exp, map(top.__rsub__, map(truediv, repeat(-k), map(KELVIN.__add__, celsius))))
    s = math.fsum(terms) / len(celsius)
    return k / -(top + math.log(s)) - KELVIN


def _threshold_at(thresholds: Sequence[Threshold], t: float) -> Threshold | None:
    cur = None
    for th in thresholds:
        if th.since is None or th.since <= t:
            cur = th
        else:
            break
    return cur


def _in_range_fn(th: Threshold | None) -> Callable[[float], bool]:
    lo = th.ok_min if th is not None else None
    hi = th.ok_max if th is not None else None
    if lo is not None and hi is not None:
        return lambda v: lo <= v <= hi
    if lo is not None:
        return lo.__le__
    if hi is not None:
        return hi.__ge__
    return lambda v: True


def in_range(th: Threshold | None, v: float) -> bool:
    if th is None:
        return True
    if th.ok_min is not None and v < th.ok_min:
        return False
    return not (th.ok_max is not None and v > th.ok_max)


def _channel(
    ch: ChannelInput, days_of: list[date], bounds: list[float], delta_h: float
) -> ChannelReport:
    start, end = bounds[0], bounds[-1]
    lo, hi = bisect_left(ch.ts, start), bisect_left(ch.ts, end)
    ts, vals = ch.ts, ch.values
    ndays = len(bounds) - 1
    in_range_s = [0.0] * ndays
    data_s = [0.0] * ndays
    above_s = below_s = 0.0
    # Each reading's coverage (until the next reading, at most 2 cadences), credited
    # to the day it falls in. The period is cut into pieces at day bounds and limit
    # changes; inside a piece the day and the limits are fixed, every reading but the
    # last covers up to the next one (all within the piece), and the sums run in C
    # (map/compress over array slices): a Python loop per reading was most of a
    # 20-channel month's time. The piece's last reading may run past the piece.
    limit = float(GAP_CADENCES * ch.cadence_s)
    ths = ch.thresholds
    cuts = sorted(
        {*bounds, *(th.since for th in ths if th.since is not None and start < th.since < end)}
    )
    for p0, p1 in zip(cuts, cuts[1:], strict=False):
        a = bisect_left(ts, p0, lo, hi)
        b = bisect_left(ts, p1, lo, hi)
        if a == b:
            continue
        th = _threshold_at(ths, p0)
        ok = _in_range_fn(th)
        hi_lim = th.ok_max if th is not None else None
        lo_lim = th.ok_min if th is not None else None
        j = bisect_right(bounds, p0) - 1
        if b - a > 1:
            covers = list(map(min, map(sub, ts[a + 1 : b], ts[a : b - 1]), repeat(limit)))
            data_s[j] += math.fsum(covers)
            in_range_s[j] += math.fsum(compress(covers, map(ok, vals[a : b - 1])))
            if hi_lim is not None:
                above_s += math.fsum(compress(covers, map(hi_lim.__lt__, vals[a : b - 1])))
            if lo_lim is not None:
                below_s += math.fsum(compress(covers, map(lo_lim.__gt__, vals[a : b - 1])))
        t0 = ts[b - 1]
        t1 = min(ts[b] if b < len(ts) else end, t0 + limit, end)
        last_ok = ok(vals[b - 1])
        if hi_lim is not None and vals[b - 1] > hi_lim:
            above_s += max(0.0, t1 - t0)
        if lo_lim is not None and vals[b - 1] < lo_lim:
            below_s += max(0.0, t1 - t0)
        while t0 < t1:
            k = bisect_right(bounds, t0) - 1
            cut = min(t1, bounds[k + 1])
            data_s[k] += cut - t0
            if last_ok:
                in_range_s[k] += cut - t0
            t0 = cut
    days = []
    for j in range(ndays):
        a, b = bisect_left(ts, bounds[j], lo, hi), bisect_left(ts, bounds[j + 1], lo, hi)
        day_vals = vals[a:b]
        days.append(
            DayStats(
                day=days_of[j],
                hours=(bounds[j + 1] - bounds[j]) / 3600,
                n=b - a,
                vmin=min(day_vals) if b > a else None,
                vmean=math.fsum(day_vals) / (b - a) if b > a else None,
                vmax=max(day_vals) if b > a else None,
                hours_in_range=in_range_s[j] / 3600,
                hours_with_data=data_s[j] / 3600,
            )
        )
    gaps = _gaps(ch, lo, hi, start, end)
    period_vals = vals[lo:hi]
    n = hi - lo
    chart = _chart(ts, vals, lo, hi, start, end)
    return ChannelReport(
        channel=ch,
        days=days,
        gaps=gaps,
        n=n,
        vmin=min(period_vals) if n else None,
        vmean=math.fsum(period_vals) / n if n else None,
        vmax=max(period_vals) if n else None,
        hours_in_range=sum(in_range_s) / 3600,
        hours_with_data=sum(data_s) / 3600,
        uptime=sum(data_s) / (end - start),
        mkt_c=mean_kinetic_temperature(period_vals, delta_h) if ch.kind == "temperature" else None,
        chart=chart,
        hours_above=above_s / 3600,
        hours_below=below_s / 3600,
    )


def _gaps(ch: ChannelInput, lo: int, hi: int, start: float, end: float) -> list[Gap]:
    """Silences longer than 2 cadences, the period's edges included."""
    limit = float(GAP_CADENCES * ch.cadence_s)
    ts = ch.ts
    if lo == hi:
        return [Gap(start, end)]
    out = [Gap(start, ts[lo])] if ts[lo] - start > limit else []
    long = map(limit.__lt__, map(sub, ts[lo + 1 : hi], ts[lo : hi - 1]))
    out += [Gap(ts[i], ts[i + 1]) for i in compress(range(lo, hi - 1), long)]
    if end - ts[hi - 1] > limit:
        out.append(Gap(ts[hi - 1], end))
    return out


def _chart(
    ts: Sequence[float],
    vals: Sequence[float],
    lo: int,
    hi: int,
    start: float,
    end: float,
    width: float = CHART_BUCKET_S,
) -> list[tuple[float, float, float]]:
    """(bucket start, min, max) per `width` seconds (hourly: what the overview chart
    draws); a bucket without readings is left out."""
    out: list[tuple[float, float, float]] = []
    a = lo
    t = start
    while t < end and a < hi:
        b = bisect_left(ts, t + width, a, hi)
        if b > a:
            chunk = vals[a:b]
            out.append((t, min(chunk), max(chunk)))
        a, t = b, t + width
    return out


def zoom(
    ch: ChannelInput, opened: float, closed: float | None, start: float, end: float
) -> tuple[float, float, list[tuple[float, float, float]]]:
    """The zoom chart of an excursion: from an hour before it opened to an hour
    after it closed (within the period), in at most ZOOM_POINTS buckets of at least
    one cadence. (from, to, buckets)."""
    a = max(start, opened - ZOOM_PAD_S)
    b = min(end, (closed if closed is not None else end) + ZOOM_PAD_S)
    width = max(float(ch.cadence_s), math.ceil((b - a) / ZOOM_POINTS))
    lo, hi = bisect_left(ch.ts, a), bisect_left(ch.ts, b)
    return a, b, _chart(ch.ts, ch.values, lo, hi, a, b, width)


def _notes(
    ch: ChannelInput, excursions: Sequence[Excursion], start: float, end: float
) -> list[Note]:
    """The channel's footnotes in the period: limit changes, calibration changes and
    excursions with a note (acknowledgement or clearing)."""
    out = [
        Note(th.since, "threshold", {"lo": _s(th.ok_min), "hi": _s(th.ok_max), "who": th.who})
        for th in ch.thresholds
        if th.since is not None and start <= th.since < end
    ]
    out += [
        Note(o.since, "offset", {"offset": f"{o.offset:+.2f}"})
        for o in ch.offsets
        if start <= o.since < end
    ]
    for ex in excursions:
        text = " · ".join(x for x in (ex.ack_note, ex.ack_action, ex.clear_note) if x)
        if ex.channel_id == ch.id and text and start <= ex.started_at < end:
            out.append(Note(ex.started_at, "excursion", {"note": text}))
    out.sort(key=lambda n: (n.at, n.what))
    return out


def _s(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _peak(ch: ChannelInput | None, ex: Excursion, end: float) -> float | None:
    """The worst reading of a `range` excursion: furthest past the limit it broke.
    Other kinds (delta, absence, device_offline…) keep the event's own value: their
    worst is not a distance from the range."""
    if ch is None or ex.kind != "range":
        return ex.value
    stop = ex.cleared_at if ex.cleared_at is not None else end
    a, b = bisect_left(ch.ts, ex.started_at), bisect_right(ch.ts, stop)
    worst: float | None = None
    worst_by = -math.inf
    for i in range(a, b):
        v = ch.values[i]
        th = _threshold_at(ch.thresholds, ch.ts[i])
        if th is None:
            continue
        by = max(
            v - th.ok_max if th.ok_max is not None else -math.inf,
            th.ok_min - v if th.ok_min is not None else -math.inf,
        )
        if by > worst_by:
            worst, worst_by = v, by
    return worst if worst is not None else ex.value


def compute(inp: ReportInput) -> ReportData:
    z = ZoneInfo(inp.timezone)
    ndays = (inp.period_to - inp.period_from).days + 1
    days = [inp.period_from + timedelta(days=k) for k in range(ndays + 1)]
    bounds = [local_midnight(d, z) for d in days]
    start, end = bounds[0], bounds[-1]
    channels = [_channel(ch, days, bounds, inp.mkt_delta_h) for ch in inp.channels]
    for c in channels:
        c.notes = _notes(c.channel, inp.excursions, start, end)
    by_id = {c.id: c for c in inp.channels}
    rows = []
    for ex in sorted(inp.excursions, key=lambda e: (e.started_at, e.id)):
        if ex.started_at >= end or (ex.cleared_at is not None and ex.cleared_at < start):
            continue
        ch = by_id.get(ex.channel_id)
        closed = ex.cleared_at if ex.cleared_at is not None and ex.cleared_at <= end else None
        z_from, z_to, zpts = zoom(ch, ex.started_at, closed, start, end) if ch else (0.0, 0.0, [])
        rows.append(
            ExcursionRow(
                excursion=ex,
                channel_name=ch.name if ch else ex.channel_id,
                opened=ex.started_at,
                closed=closed,
                duration_s=(closed if closed is not None else end) - ex.started_at,
                peak=_peak(ch, ex, end),
                zoom=zpts,
                zoom_from=z_from,
                zoom_to=z_to,
            )
        )
    changes = [
        ThresholdChange(ch.name, th.since, th.ok_min, th.ok_max, th.who)
        for ch in inp.channels
        for th in ch.thresholds
        if th.since is not None and start <= th.since < end
    ]
    changes.sort(key=lambda c: (c.at, c.channel_name))
    return ReportData(inp, start, end, channels, rows, changes)
