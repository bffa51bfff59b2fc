# ruff: noqa: UP031 - MicroPython code, kept in the firmware's %-format style
# Runs under micropython (tools/bench/fwqueue.py starts it): the firmware's flash queue
# (firmware/sense/fq.py) on littlefs over a RAM flash chip with the ESP32's geometry
# (4 KiB erase blocks, a 2 MiB vfs partition as on a 4 MB ESP32). Prints key=value.
import sys
import time

sys.path.append("tests/firmware")
from ramflash import RamFlash  # noqa: E402
from sense import fq  # noqa: E402

QUICK = "--quick" in sys.argv
# --install <file>: lines "<host path> <chip path>" of what `opensense node flash`
# copies (fwqueue.py writes it): the footprint the queue shares the partition with
INSTALL = sys.argv[sys.argv.index("--install") + 1] if "--install" in sys.argv else None
PROBES = 3
DAY = 1440  # one sampling tick a minute
HEALTH_EVERY = 15
fl = RamFlash(blocks=512, bs=4096)


def fresh():
    fl.reset()
    try:
        fl.umount()
    except OSError:
        pass
    fl.mount(fresh=True)


def day(q, chans, hch, online, ticks):
    for i in range(ticks):
        q.add(1795000000 + 60 * i, True, [(c, 4.0 + (i % 16) / 16) for c in chans])
        if i % HEALTH_EVERY == 0:
            q.add(1795000000 + 60 * i, True, [(c, float(i)) for c in hch])
        if online:
            recs, cur = q.peek(32)
            q.ack(cur, len(recs))


def channels(q, probes):
    """The probes' temperature channels and the node's nine health channels."""
    chans = [q.chan("temperature", "p%d" % i, "°C") for i in range(probes)]
    return chans, [q.chan("health", "h%d" % i, "1") for i in range(9)]


def fill(q, probes, limit):
    """Offline, a reading a minute from each probe (and the health record every
    HEALTH_EVERY ticks) until the queue's first drop or `limit` ticks; returns the
    ticks written."""
    chans, hch = channels(q, probes)
    n = 0
    while q.drops == 0 and n < limit:
        q.add(1795000000 + 60 * n, True, [(c, 4.0) for c in chans])
        if n % HEALTH_EVERY == 0:
            q.add(1795000000 + 60 * n, True, [(c, float(n)) for c in hch])
        n += 1
    q.flush()
    return n


def run(batch, online, ticks):
    fresh()
    q = fq.Queue("/f/q", 1, 1600000, 4000, batch)
    chans, hch = channels(q, PROBES)
    e0, o0 = fl.erases, fl.ops
    t0 = time.ticks_ms()
    day(q, chans, hch, online, ticks)
    q.flush()
    ms = time.ticks_diff(time.ticks_ms(), t0)
    scale = DAY / ticks
    return (fl.erases - e0) * scale, (fl.ops - o0) * scale, q.bytes, ms


ticks = 240 if QUICK else DAY
for batch in (1, 5):
    er, ops, _, ms = run(batch, False, ticks)
    print("offline_batch%d_erases_per_day=%d" % (batch, er))
    print("offline_batch%d_flash_ops_per_day=%d" % (batch, ops))
er, ops, _, _ = run(5, True, ticks)
print("online_erases_per_day=%d" % er)
# capacity: fill the default 1.6 MB queue, offline, until the first drop
fresh()
q = fq.Queue("/f/q", 1, 1600000, 4000, 5)
n = fill(q, PROBES, (3 if QUICK else 45) * DAY)
print("queue_bytes=%d" % q.bytes)
print("bytes_per_tick=%.1f" % (q.bytes / n))
print("capacity_days=%.1f" % ((1600000 / (q.bytes / n)) / DAY))
print("filled_to_first_drop=%d" % (1 if q.drops else 0))
st = __import__("os").statvfs("/f")
print("fs_free_bytes=%d" % (st[0] * st[3]))
# drain: the whole backlog read and acknowledged in batches of 32 values
t0 = time.ticks_ms()
k = 0
while True:
    recs, cur = q.peek(32)
    if not recs:
        break
    q.ack(cur, len(recs))
    k += len(recs)
print("drain_records=%d" % k)
print("drain_ms_host=%d" % time.ticks_diff(time.ticks_ms(), t0))


# days of outage the queue holds beside the installed firmware, for 1, 3 and 8 probes:
# the files `opensense node flash` copies on a fresh 2 MiB littlefs, then the queue with
# no queue_bytes limit (only the free blocks and the reserve bound it), filled offline
# at a reading a minute plus the node's health record every 15 minutes until its
# first drop
def install():
    n = 0
    if not INSTALL:
        return 0
    import os

    for line in open(INSTALL):
        src, dest = line.split()
        parts = dest.split("/")[1:-1]
        for i in range(1, len(parts) + 1):
            try:
                os.mkdir("/f/" + "/".join(parts[:i]))
            except OSError:
                pass
        with open(src, "rb") as f, open("/f" + dest, "wb") as g:
            while True:
                b = f.read(4096)
                if not b:
                    break
                g.write(b)
                n += len(b)
    return n


for probes in (1, 3, 8):
    fresh()
    footprint = install()
    free0 = __import__("os").statvfs("/f")[3]
    q = fq.Queue("/f/q", 1, 16000000, 4000, 5)
    cap = q.cap
    n = fill(q, probes, (1 if QUICK else 90) * DAY)
    print("footprint_bytes=%d" % footprint)
    print("free_blocks_after_install=%d" % free0)
    print("probes%d_capacity_bytes=%d" % (probes, cap))
    print("probes%d_bytes_per_day=%d" % (probes, q.bytes * DAY // n))
    # filled: the ticks it held until its first drop; --quick: from its capacity
    print("probes%d_days=%.1f" % (probes, (n - 1) / DAY if q.drops else cap / (q.bytes / n) / DAY))
    print("probes%d_filled=%d" % (probes, 1 if q.drops else 0))
