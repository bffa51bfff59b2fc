# The flash queue on littlefs over a RAM flash chip, under the real micropython:
# round trip, reboots, clock resolution, oldest-first drops, and a power cut at every
# program/erase step of a queue write, an acknowledgement and a drop.
import os

from ramflash import RamFlash
from sense import fq

ROOT = "/f/q"


def _q(boot, **kw):
    kw.setdefault("batch", 3)
    kw.setdefault("seg_bytes", 300)
    kw.setdefault("cap_bytes", 6000)
    return fq.Queue(ROOT, boot, **kw)


def _all(q):
    # drain with peek/ack; -> list of (seq, t, values)
    out = []
    while True:
        recs, cur = q.peek(32)
        if not recs:
            return out
        for r in recs:
            out.append((r[0], r[1], [round(v, 3) for _, v in r[4]]))
        q.ack(cur, len(recs))


_FL = []


def _fresh():
    import gc

    gc.collect()
    if not _FL:
        _FL.append(RamFlash())
    fl = _FL[0]
    try:
        fl.umount()  # a failed case left it mounted
    except OSError:
        pass
    fl.reset()
    fl.mount(fresh=True)
    return fl


def _reboot(fl):
    fl.umount()
    fl.budget = None
    fl.cut = False
    fl.mount()


def case_roundtrip_and_seq_survive_reboot():
    fl = _fresh()
    q = _q(1)
    c = q.chan("temperature", "front", "°C")
    seqs = [q.add(1795512000 + 60 * i, True, [(c, 4.0 + i / 16)]) for i in range(7)]
    assert seqs == list(range(7))
    q.flush()
    _reboot(fl)
    q = _q(2)
    assert q.depth() == 7 and q.chans == [["temperature", "front", "°C"]]
    got = _all(q)
    assert [g[0] for g in got] == seqs
    assert [g[2][0] for g in got] == [round(4.0 + i / 16, 3) for i in range(7)]
    assert got[3][1] == 1795512180
    assert q.add(1795513000, True, [(c, 1.0)]) > 6  # never reuses a number
    fl.umount()


def case_unflushed_seq_is_never_reused():
    fl = _fresh()
    q = _q(1, batch=100)
    c = q.chan("temperature", "a", "°C")
    s1 = q.add(1795512000, True, [(c, 1.0)])
    recs, cur = q.peek()
    q.ack(cur, len(recs))  # sent straight from RAM: never on flash
    _reboot(fl)
    q = _q(2)
    assert q.add(1795512060, True, [(c, 2.0)]) > s1
    fl.umount()


def case_untimed_readings_get_their_time_when_the_clock_is_known():
    fl = _fresh()
    q = _q(5)
    c = q.chan("temperature", "a", "°C")
    q.add(10, False, [(c, 1.0)])  # uptime 10 s, clock unknown
    q.add(70, False, [(c, 2.0)])
    q.add(130, False, [(c, 3.0)])  # third: flushed to flash, untimed
    q.add(190, False, [(c, 4.0)])  # in RAM
    recs, _ = q.peek()
    assert [r[1] for r in recs] == [None] * 4
    q.set_clock(1795512000)  # Unix time at uptime 0 of boot 5
    _reboot(fl)
    q = _q(6)
    assert [g[1] for g in _all(q)] == [1795512010, 1795512070, 1795512130]  # the 4th was in RAM
    fl.umount()


def case_full_queue_drops_oldest_and_counts():
    fl = _fresh()
    q = _q(1, cap_bytes=1200, seg_bytes=300)
    c = q.chan("temperature", "a", "°C")
    for i in range(200):
        q.add(1795512000 + 60 * i, True, [(c, float(i))])
    q.flush()
    got = _all(q)
    assert q.drops > 0 and len(got) + q.drops == 200, (len(got), q.drops)
    assert [g[2][0] for g in got] == [float(i) for i in range(200 - len(got), 200)]
    fl.umount()


def case_health_integers_stay_integers():
    # an f32 keeps 24 bits: an uptime of 194 days came back as 16777216.0, on the
    # wire too; integer records keep every bit and stay ints in the payload
    from sense import payload

    fl = _fresh()
    q = _q(1)
    c = q.chan("health", "uptime", "s")
    d = q.chan("health", "drops", "1")
    q.add(1795512000, False, [(c, 16777217), (d, 2147483647)], True)
    q.set_clock(0)  # re-packs the untimed record held in RAM
    q.add(1795512060, True, [(c, 16777277), (d, 0)], True)
    q.flush()
    _reboot(fl)
    q = _q(2)
    recs, _ = q.peek(32)
    got = [v for r in recs for _, v in r[4]]
    assert got == [16777217, 2147483647, 16777277, 0], got
    assert all(isinstance(v, int) for v in got), got
    body = payload.body(recs, q.chans)
    assert '"value": 16777217' in body and "16777216" not in body, body
    fl.umount()


def _free_blocks():
    return os.statvfs("/f")[3]


def _drain_count(q):
    # -> (records, first value, last value); the values must be consecutive
    k = 0
    first = last = None
    while True:
        recs, cur = q.peek(32)
        if not recs:
            return k, first, last
        for r in recs:
            v = r[4][0][1]
            assert last is None or v == last + 1, (last, v)
            first = v if first is None else first
            last = v
            k += 1
        q.ack(cur, len(recs))


def case_capacity_comes_from_free_blocks_with_a_reserve():
    # a queue_bytes far beyond the chip (64 KiB): the queue holds what the free blocks
    # allow, keeps RESERVE_BLOCKS free, drops the oldest and counts, never raises ENOSPC
    fl = _fresh()
    q = _q(1, cap_bytes=16000000, seg_bytes=400)
    assert q.cap < 64 * 1024, q.cap
    c = q.chan("temperature", "a", "°C")
    n = 2000
    for i in range(n):
        q.add(1795512000 + 60 * i, True, [(c, float(i)), (c, -float(i))])
    q.flush()
    assert _free_blocks() >= fq.RESERVE_BLOCKS, _free_blocks()
    assert q.drops > 0
    k, first, last = _drain_count(q)
    assert k * 2 + q.drops == 2 * n, (k, q.drops)
    assert last == n - 1 and first == n - k, (first, last, k)
    fl.umount()


def case_a_full_filesystem_drops_the_oldest_segment_and_counts():
    # another file takes the flash after the queue sized itself: the append that meets
    # ENOSPC drops the oldest segment (counted) instead of crashing the node
    fl = _fresh()
    q = _q(1, cap_bytes=40000, seg_bytes=400)
    c = q.chan("temperature", "a", "°C")
    for i in range(60):
        q.add(1795512000 + 60 * i, True, [(c, float(i))])
    q.flush()
    with open("/f/hog", "wb") as f:
        chunk = b"x" * 512
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    n = 60
    for i in range(60, 400):
        try:
            q.add(1795512000 + 60 * i, True, [(c, float(i))])
        except OSError as e:
            raise AssertionError("add %d raised %r" % (i, e)) from None
        n += 1
    q.flush()
    assert q.full > 0 and q.drops > 0, (q.full, q.drops)
    got = _all(q)
    assert len(got) + q.drops == n, (len(got), q.drops, n)
    vals = [g[2][0] for g in got]
    assert vals == sorted(vals) and vals[-1] == float(n - 1), vals[-5:]
    fl.umount()


def _setup(fl):
    q = _q(1, cap_bytes=1100)
    c = q.chan("temperature", "a", "°C")
    for i in range(40):
        q.add(1795512000 + 60 * i, True, [(c, float(i)), (c, -float(i))])
    q.flush()
    recs, cur = q.peek(10)
    q.ack(cur, len(recs))
    return q, c


def _op(q, c, committed, acking):
    # the step under test: a write of 3 records (a flush, maybe a new segment and a
    # drop), then an acknowledgement (head moves, a segment is deleted). `committed`
    # gets the records once their flush returned, `acking` the records handed to ack()
    # (whose head move may or may not have reached flash when the power goes).
    base = len(committed)
    for i in range(40 + base, 43 + base):
        q.add(1795512000 + 60 * i, True, [(c, float(i)), (c, -float(i))])
    q.flush()
    for i in range(40 + base, 43 + base):
        committed.append(i)
    recs, cur = q.peek(6)
    acking.extend(r[0] for r in recs)
    q.ack(cur, len(recs))
    return [r[0] for r in recs]


VALS_PER_REC = 2  # every record of this case carries two values; `drops` counts values


def case_power_cut_at_every_step_loses_nothing_committed():
    # reference run: how many flash operations the step takes
    fl = _fresh()
    q, c = _setup(fl)
    d0 = q.drops
    ops0 = fl.ops
    _op(q, c, [], [])
    total = fl.ops - ops0
    fl.umount()
    assert total > 3 and q.drops > d0, (total, q.drops, d0)  # the step includes a drop
    for n in range(total + 1):  # a cut before each of the `total` steps, then a clean run
        fl = _fresh()
        q, c = _setup(fl)
        before = [g[0] for g in _peek_all(q)]
        seq_hi = q.seq
        d0 = q.drops  # drops of the setup: not this step's
        fl.budget = n
        committed = []
        acking = []
        try:
            _op(q, c, committed, acking)
        except OSError:
            pass  # littlefs saw the dead flash; the power is gone anyway
        cut = fl.cut
        assert cut == (n < total), (n, total, cut)
        _reboot(fl)
        q2 = _q(2, cap_bytes=1100)
        got = _peek_all(q2)
        seqs = [g[0] for g in got]
        # ordered, no duplicates, every value intact (a torn record would fail its CRC)
        assert seqs == sorted(set(seqs)), (n, seqs)
        for s, t, vals in got:
            i = s  # seq i carries value i in this test
            assert vals == [float(i), -float(i)] and t == 1795512000 + 60 * i, (n, s, vals)
        # nothing committed is lost, counted in records: of what was there before plus
        # the committed writes, exactly the oldest ones are gone, as many as this step's
        # drops own up to, plus the acknowledged ones if the head move reached flash
        dv = q2.drops - d0
        assert dv >= 0 and dv % VALS_PER_REC == 0, (n, q2.drops, d0)
        dropped = dv // VALS_PER_REC
        expect = before + [seq_hi + k for k in range(len(committed))]
        missing = [s for s in expect if s not in seqs]
        assert missing == expect[: len(missing)], (n, cut, missing)  # the oldest go first
        allowed = [dropped]
        if acking and set(acking) <= set(expect):
            allowed.append(dropped + len(acking))  # the head move is atomic: all or none
        if not cut:
            allowed = allowed[-1:]  # the clean run acknowledged for sure
        assert len(missing) in allowed, (n, cut, missing, dropped, acking)
        assert q2.add(1795600000, True, [(0, 1.0), (0, -1.0)]) >= seq_hi  # no seq reuse
        fl.umount()
    print("power cuts tested:", total, "plus a clean run")


def _peek_all(q):
    out = []
    seg, off = q.head
    saved = (list(q.head), q.rows, list(q.ram))
    while True:
        recs, cur = q.peek(32)
        if not recs:
            break
        for r in recs:
            out.append((r[0], r[1], [round(v, 3) for _, v in r[4]]))
        # walk on without acknowledging: move the head in RAM only
        q.head = [cur[0], cur[1]]
        q.ram = q.ram[cur[2] :]
    q.head, q.rows, q.ram = saved
    return out
