# The flash queue: every reading is kept until the server has acknowledged it.
#
# Layout in `root` (a directory on littlefs):
#   s00000001, s00000002, ...   segments, append-only, consecutive numbers, <= seg_bytes
#   state                        head position, drop counter, reserved sequence numbers,
#                                clock offsets of recent boots (JSON + CRC32 line)
#   chans                        channel table: index -> [type, label, unit] (JSON + CRC32)
# A record (one sampling tick) is
#   <seq u32><t u32><boot u16><flags u8><n u8> n * (<chan u8><value f32>) <crc32 u32>
# little-endian; t is Unix seconds, or uptime seconds of `boot` while flags&1 (the clock
# was not known yet: the time is filled in from the boot's clock offset once known).
# flags&2: the values are <i32> integers, not <f32> (health counters: an f32 keeps 24
# bits, so an uptime past 194 days or a large count would come back rounded, and as a
# float on the wire).
#
# Why it survives a power cut: littlefs commits a file's new data only at close (its
# metadata log is CRC-checked and copy-on-write), so an append is all or nothing;
# `state` and `chans` are replaced by write-to-temp + rename (atomic in littlefs).
# The per-record CRC32 catches what a filesystem without those guarantees (FAT) could
# leave: reading stops at the first bad record and new data goes to a new segment.
#
# Memory habits: no segment is held in RAM; records are read one at a time into a
# reused buffer; RAM holds at most `batch` unflushed records.
import json
import os
import struct

try:
    from binascii import crc32
except ImportError:  # pragma: no cover
    from ubinascii import crc32

HDR = "<IIHBB"
HDR_LEN = 12
VAL = "<Bf"
VAL_LEN = 5
UNTIMED = 1
INTS = 2
I32 = "<Bi"
SEQ_RESERVE = 256  # sequence numbers reserved per state write (a reboot skips the rest)
KEEP_BOOTS = 8  # clock offsets remembered for this many boots
# Erase blocks the queue never takes: littlefs needs free blocks for its copy-on-write
# metadata (directory pairs, `state` replaces) and the node for config/cadence writes;
# a littlefs with none left fails every write, the queue's `state` included.
RESERVE_BLOCKS = 32
ENOSPC = 28


def free_blocks(root):
    # -> (free erase blocks, block size), or (None, 0) where the port has no statvfs
    try:
        st = os.statvfs(root)
    except (OSError, AttributeError):
        return None, 0
    return st[3], st[0]


def pack(seq, t, boot, flags, vals):
    n = len(vals)
    b = bytearray(HDR_LEN + n * VAL_LEN + 4)
    struct.pack_into(HDR, b, 0, seq, t, boot & 0xFFFF, flags, n)
    o = HDR_LEN
    ints = flags & INTS
    for c, v in vals:
        if ints:
            struct.pack_into(I32, b, o, c, max(-0x7FFFFFFF, min(0x7FFFFFFF, int(v))))
        else:
            struct.pack_into(VAL, b, o, c, v)
        o += VAL_LEN
    struct.pack_into("<I", b, o, crc32(memoryview(b)[:o]) & 0xFFFFFFFF)
    return bytes(b)


def unpack(b):
    seq, t, boot, flags, n = struct.unpack_from(HDR, b, 0)
    vals = []
    o = HDR_LEN
    fmt = I32 if flags & INTS else VAL
    for _ in range(n):
        vals.append(struct.unpack_from(fmt, b, o))
        o += VAL_LEN
    return [seq, t, boot, flags, vals]


def read_rec(f):
    # -> record bytes, None at a clean end, False at a torn/corrupt record
    h = f.read(HDR_LEN)
    if not h:
        return None
    if len(h) < HDR_LEN:
        return False
    n = h[11]
    rest = f.read(n * VAL_LEN + 4)
    if len(rest) < n * VAL_LEN + 4:
        return False
    b = h + rest
    (crc,) = struct.unpack_from("<I", b, len(b) - 4)
    if crc32(memoryview(b)[: len(b) - 4]) & 0xFFFFFFFF != crc:
        return False
    return b


def _write_json(path, obj):
    # whole-file replace: temp file + rename; CRC so a FAT volume cannot fool us either
    s = json.dumps(obj)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("%08x %s" % (crc32(s.encode()) & 0xFFFFFFFF, s))
    os.rename(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            s = f.read()
    except OSError:
        return None
    if len(s) < 10 or int(s[:8], 16) != crc32(s[9:].encode()) & 0xFFFFFFFF:
        return None
    return json.loads(s[9:])


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


class Queue:
    def __init__(self, root, boot, cap_bytes=1500000, seg_bytes=4000, batch=5):
        self.root = root
        self.boot = boot
        self.cap = cap_bytes
        self.seg_bytes = seg_bytes
        self.batch = batch
        self.ram = []  # packed records not yet on flash
        try:
            os.mkdir(root)
        except OSError:
            pass
        for name in os.listdir(root):
            if name.endswith(".new"):
                os.remove(root + "/" + name)  # a replace cut short: the old file stands
        st = _read_json(root + "/state") or {}
        self.drops = st.get("drops", 0)
        self.untimed = st.get("untimed", 0)
        self.offsets = st.get("off", {})  # str(boot) -> Unix time at uptime 0
        self.chans = _read_json(root + "/chans") or []
        segs = [int(n[1:]) for n in os.listdir(root) if n[0] == "s" and len(n) == 9]
        segs.sort()
        self.lo = segs[0] if segs else 1
        self.hi = segs[-1] if segs else 0
        head = st.get("head", [self.lo, 0])
        if head[0] < self.lo:
            head = [self.lo, 0]
        self.head = head
        self.bytes = 0
        self.rows = 0
        last = -1
        self.tail_ok = True
        for s in segs:
            size = os.stat(self._seg(s))[6]
            self.bytes += size
            with open(self._seg(s), "rb") as f:
                if s == head[0]:
                    f.seek(head[1])
                pos_ok = True
                while s >= head[0]:
                    r = read_rec(f)
                    if not r:
                        pos_ok = r is None
                        break
                    self.rows += 1
                    last = struct.unpack_from("<I", r, 0)[0]
                if s == self.hi:
                    self.tail_ok = pos_ok
        self._gc()
        # capacity from what the filesystem really has free (issue 17 item 5): the
        # configured queue_bytes is an upper bound, never a promise the flash can't keep
        # (a first estimate: a segment takes whole blocks; littlefs's metadata is
        # checked for at every new segment, _room)
        free, bs = free_blocks(root)
        if free is not None:
            per_seg = (seg_bytes + bs - 1) // bs
            self.cap = min(
                cap_bytes, self.bytes + max(0, free - RESERVE_BLOCKS) // per_seg * seg_bytes
            )
        self.full = 0  # times the filesystem itself was full (ENOSPC) at an append
        self.seq = max(st.get("seq", 0), last + 1)
        self.reserved = self.seq  # forces a state write before the first new seq is used
        self.flash_writes = 0  # appends + state replaces, for the wear figures

    def _gc(self):
        # segments wholly behind the head: acknowledged, their delete was cut short
        while self.lo < self.head[0] and self.lo <= self.hi:
            p = self._seg(self.lo)
            if _exists(p):
                self.bytes -= os.stat(p)[6]
                os.remove(p)
            self.lo += 1
        if self.hi < self.lo - 1:
            self.hi = self.lo - 1

    def _seg(self, i):
        return "%s/s%08d" % (self.root, i)

    def _save(self):
        try:
            self._write_state()
        except OSError as e:
            # no block left even for the state: the oldest segment makes room
            if e.args[0] != ENOSPC or self.lo >= self.hi:
                raise
            self._shrink()
            self._write_state()

    def _shrink(self):
        # the filesystem is fuller than the capacity said: the capacity becomes what
        # the queue holds now less a segment, and the oldest segment goes (counted)
        self.full += 1
        self.cap = max(self.seg_bytes, self.bytes - self.seg_bytes)
        self._drop_oldest()

    def _room(self):
        # before a new segment: RESERVE_BLOCKS stay free, whatever littlefs's metadata
        # took meanwhile (statvfs walks the filesystem: once a segment, not per append)
        while self.lo < self.hi:
            free, bs = free_blocks(self.root)
            if free is None or free >= RESERVE_BLOCKS + (self.seg_bytes + bs - 1) // bs:
                return
            self._shrink()

    def _write_state(self):
        off = self.offsets
        if len(off) > KEEP_BOOTS:
            for k in sorted(off, key=int)[:-KEEP_BOOTS]:
                del off[k]
        _write_json(
            self.root + "/state",
            {
                "head": self.head,
                "seq": self.reserved,
                "drops": self.drops,
                "untimed": self.untimed,
                "off": off,
            },
        )
        self.flash_writes += 1

    def chan(self, kind, label, unit):
        key = [kind, label, unit]
        for i, c in enumerate(self.chans):
            if c == key:
                return i
        if len(self.chans) >= 255:
            raise ValueError("more than 255 channels")
        self.chans.append(key)
        _write_json(self.root + "/chans", self.chans)
        self.flash_writes += 1
        return len(self.chans) - 1

    def add(self, t, timed, vals, ints=False):
        # one sampling tick; -> its sequence number. On flash after flush(). `ints`: the
        # values are integers and stay so (INTS)
        if self.seq >= self.reserved:
            self.reserved = self.seq + SEQ_RESERVE
            self._save()
        seq = self.seq
        self.seq += 1
        flags = (0 if timed else UNTIMED) | (INTS if ints else 0)
        self.ram.append(pack(seq, int(t), self.boot, flags, vals))
        self.rows += 1
        if len(self.ram) >= self.batch:
            self.flush()
        return seq

    def flush(self):
        # one append (one littlefs commit) for all records held in RAM
        if not self.ram:
            return
        n = sum(len(r) for r in self.ram)
        self._drop_oldest(n)  # room first: the append must not be the write that fails
        if (
            self.hi < self.lo
            or not self.tail_ok
            or os.stat(self._seg(self.hi))[6] + n > self.seg_bytes
        ):
            self._room()
            self.hi += 1
            self.tail_ok = True
            if self.head[0] > self.hi:
                self.head = [self.hi, 0]
        while True:
            try:
                with open(self._seg(self.hi), "ab") as f:
                    for r in self.ram:
                        f.write(r)
                break
            except OSError as e:
                if e.args[0] != ENOSPC:
                    raise
                # The flash is fuller than the capacity said (littlefs metadata, another
                # file): littlefs committed nothing of this append. The oldest segment
                # goes, counted in `drops` (_shrink); with nothing older left, these
                # records are the ones lost (counted too).
                if self.lo >= self.hi:
                    self.full += 1
                    self.drops += sum(r[11] for r in self.ram)
                    self.rows -= len(self.ram)
                    self.ram = []
                    self._save()
                    return
                self._shrink()
        self.flash_writes += 1
        self.bytes += n
        self.ram = []

    def _drop_oldest(self, incoming=0):
        # full: the oldest segment goes first; `drops` counts the readings lost with it
        while self.bytes + incoming > self.cap and self.lo < self.hi:
            p = self._seg(self.lo)
            recs = vals = 0
            if self.head[0] <= self.lo:
                with open(p, "rb") as f:
                    if self.head[0] == self.lo:
                        f.seek(self.head[1])
                    while True:
                        r = read_rec(f)
                        if not r:
                            break
                        recs += 1
                        vals += r[11]
            self.bytes -= os.stat(p)[6]
            self.drops += vals
            self.rows -= recs
            if self.head[0] <= self.lo:
                self.head = [self.lo + 1, 0]
            self.lo += 1
            if self._state_fits():  # the head moves past the segment before the segment goes
                os.remove(p)
            else:
                # no room for the state: the segment first (a reboot in between finds
                # the head behind the oldest segment and moves it on, see __init__;
                # only this drop's count could be lost)
                os.remove(p)
                self._write_state()

    def _state_fits(self):
        try:
            self._write_state()
            return True
        except OSError as e:
            if e.args[0] != ENOSPC:
                raise
            return False

    def set_clock(self, offset):
        # this boot's clock became known: Unix time = offset + uptime
        self.offsets[str(self.boot)] = int(offset)
        self._save()
        for i, r in enumerate(self.ram):
            if r[10] & UNTIMED and struct.unpack_from("<H", r, 8)[0] == self.boot & 0xFFFF:
                rec = unpack(r)
                self.ram[i] = pack(rec[0], rec[1] + int(offset), rec[2], rec[3] & ~UNTIMED, rec[4])

    def _time(self, rec):
        if not rec[3] & UNTIMED:
            return rec[1]
        off = self.offsets.get(str(rec[2]))
        return None if off is None else off + rec[1]

    def peek(self, max_vals=32, max_recs=255):
        # -> (records, cursor): the oldest unacknowledged records, at most max_vals values,
        # each [seq, unix time or None, boot, flags, [(chan, value)...]]
        out = []
        nv = 0
        seg, off = self.head
        while seg <= self.hi and _exists(self._seg(seg)):
            with open(self._seg(seg), "rb") as f:
                f.seek(off)
                while True:
                    r = read_rec(f)
                    if not r:
                        break
                    if out and (nv + r[11] > max_vals or len(out) >= max_recs):
                        return out, (seg, off, 0)
                    rec = unpack(r)
                    rec[1] = self._time(rec)
                    out.append(rec)
                    nv += r[11]
                    off += len(r)
            if seg == self.hi:
                break
            seg, off = seg + 1, 0
        k = 0
        for r in self.ram:
            if out and (nv + r[11] > max_vals or len(out) >= max_recs):
                break
            rec = unpack(r)
            rec[1] = self._time(rec)
            out.append(rec)
            nv += r[11]
            k += 1
        return out, (seg, off, k)

    def peek_n(self, n, max_vals=32):
        return self.peek(max_vals, n)

    def ack(self, cursor, n):
        # the server acknowledged the n records of the last peek: forget them
        seg, off, k = cursor
        self.rows -= n
        if k:
            self.ram = self.ram[k:]
        if [seg, off] != self.head:
            old = self.head[0]
            self.head = [seg, off]
            self._save()  # head first, then the files behind it
            for s in range(old, seg):
                if s >= self.lo:
                    p = self._seg(s)
                    self.bytes -= os.stat(p)[6]
                    os.remove(p)
                    self.lo = s + 1
            if seg == self.hi and off and off >= os.stat(self._seg(seg))[6] and not self.ram:
                pass  # keep appending to it; deleted once a later segment exists

    def skip_untimed(self, cursor, n):
        # records whose boot never learned the time cannot be sent; count and forget them
        self.untimed += n
        self.ack(cursor, n)

    def depth(self):
        return self.rows
