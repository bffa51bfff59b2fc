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


def run(batch, online, ticks):
    fresh()
    q = fq.Queue("/f/q", 1, 1600000, 4000, batch)
    chans = [q.chan("temperature", "p%d" % i, "°C") for i in range(PROBES)]
    hch = [q.chan("health", "h%d" % i, "1") for i in range(9)]
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
chans = [q.chan("temperature", "p%d" % i, "°C") for i in range(PROBES)]
hch = [q.chan("health", "h%d" % i, "1") for i in range(9)]
n = 0
limit = (3 if QUICK else 45) * DAY
while q.drops == 0 and n < limit:
    q.add(1795000000 + 60 * n, True, [(c, 4.0) for c in chans])
    if n % HEALTH_EVERY == 0:
        q.add(1795000000 + 60 * n, True, [(c, float(n)) for c in hch])
    n += 1
q.flush()
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
