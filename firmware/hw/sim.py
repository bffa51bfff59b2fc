# Simulated board for the MicroPython unix port. The test harness (or the demo)
# drives it through files in $OPENSENSE_SIM:
#   ctl.json    written by the harness, read here: clock (epoch0 at host time t0,
#               `speed` virtual seconds per real second), ntp/wifi up or down, RSSI,
#               probes [{rom (hex), temp, fault: null|"absent"|"crc"|"power_on"|"zero"|
#               "flaky" (bad CRC twice, then good)}], dns overrides {name: address}
#   flash.img   the node's flash: littlefs on a file-backed block device (4 KiB blocks
#               like the ESP32's SPI flash), survives resets and power cuts
#   rtc.bin     RTC slow memory: survives a reset, the harness deletes it for a power cut
#   config.json the node config the installer would write; ca.der the broker's CA
#               hold_write: stop half-way through the next flash write (a power cut
#               is timed to it: the harness waits for the file `held`, then SIGKILLs)
#   events.log  what the board did (led, reset, wdt, sync), one line each, for tests
# A reset ends the process with exit code 3; the harness starts it again (the chip
# running main.py from the top).
import gc
import json
import os
import sys
import time

import vfs
from sense import ds18b20

DIR = os.getenv("OPENSENSE_SIM") or "sim"
BLOCK = 4096
RESET_EXIT = 3


class FileFlash:
    # littlefs block device over a file (extended protocol: offsets within blocks)
    def __init__(self, path, blocks):
        self.n = blocks
        try:
            self.f = open(path, "r+b")
        except OSError:
            with open(path, "wb") as f:
                z = b"\xff" * BLOCK
                for _ in range(blocks):
                    f.write(z)
            self.f = open(path, "r+b")
        self.erases = 0
        self.blank = b"\xff" * BLOCK  # allocated once: erases must not churn the heap
        self.hold = None  # -> True: stop half-way through the next write (a power cut)

    def readblocks(self, n, buf, off=0):
        self.f.seek(n * BLOCK + off)
        self.f.readinto(buf)

    def writeblocks(self, n, buf, off=None):
        if off is None:
            self.ioctl(6, n)
            off = 0
        self.f.seek(n * BLOCK + off)
        if self.hold is not None and self.hold():
            # ctl hold_write (the bench rig's power cut during a flash write): half the
            # bytes reach the flash, then the board waits for the harness's SIGKILL
            self.f.write(memoryview(buf)[: len(buf) // 2])
            self.f.flush()
            with open(DIR + "/held", "w") as f:
                f.write("%d %d" % (n, off))
            while True:
                time.sleep(0.05)
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return BLOCK
        if op == 6:
            self.erases += 1
            self.f.seek(arg * BLOCK)
            self.f.write(self.blank)
            return 0
        if op == 3:
            self.f.flush()
        return 0


def _host():
    return time.time_ns() / 1e9


class Board:
    model = "sim_unix"

    def __init__(self):
        self.start = _host()
        self.ctl = {}
        self.ctl_at = -1.0
        # the RTC keeps its time through a reset (not a power cut: the harness deletes
        # rtc_clock with rtc.bin), as the ESP32's does
        self.synced_offset = None
        self.read_true = None  # true time of the last time() read (for the sample log)
        self.wifi_at = None  # ticks of the connect() under way, None: idle
        self.wifi_got = self.wifi_lost = False
        self.wdt_s = 0
        self.last_feed = 0
        self._flash = None
        self._ctl(True)
        try:
            with open(DIR + "/rtc_clock") as f:  # the RTC's time, kept through a reset
                self.synced_offset = float(f.read()) + self.start * self._speed()
        except (OSError, ValueError):
            pass

    def _ctl(self, force=False):
        # re-read the harness's control file at most every 20 ms of real time
        h = _host()
        if force or h - self.ctl_at > 0.02:
            self.ctl_at = h
            try:
                with open(DIR + "/ctl.json") as f:
                    self.ctl = json.loads(f.read())
            except (OSError, ValueError):
                pass  # a harness half-way through writing it: keep the last one
        return self.ctl

    def _speed(self):
        return self.ctl.get("speed", 1)

    # --- time (virtual: `speed` virtual seconds per real second) -----------------
    def ticks_ms(self):
        return int((_host() - self.start) * self._speed() * 1000)

    def ticks_diff(self, a, b):
        return a - b

    def ticks_add(self, a, b):
        return a + b

    def sleep_ms(self, ms):
        # at least 2 ms of real time: a fast clock must not turn the loop into a busy wait
        time.sleep(max(ms / 1000 / self._speed(), 0.002))

    def uptime_s(self):
        # the true time of this read too: a reading taken before the clock is known
        # is placed by its uptime (the sample's log line takes it from read_true)
        h = _host()
        c = self._ctl()
        self.read_true = c.get("epoch0", 1795500000) + (h - c.get("t0", self.start)) * self._speed()
        return int((h - self.start) * self._speed())

    def _true_time(self):
        c = self._ctl()
        return c.get("epoch0", 1795500000) + (_host() - c.get("t0", self.start)) * self._speed()

    def time(self):
        # the RTC: NTP's time once synced; before, what an installer set (ctl
        # rtc_offset: s ahead of UTC, e.g. 7200 for a PC's local time in UTC+2), or
        # None for an RTC never set. The true (harness) time is taken at this very
        # read, for the sample logged right after: on a busy host the log line can
        # come many fast-clock seconds later
        h = _host()
        c = self._ctl()
        self.read_true = c.get("epoch0", 1795500000) + (h - c.get("t0", self.start)) * self._speed()
        if self.synced_offset is None:
            off = c.get("rtc_offset")
            return None if off is None else int(self.read_true + off)
        return int(int((h - self.start) * self._speed()) + self.synced_offset)

    def ntp_sync(self, host=None):
        if not self._ctl().get("ntp", True) or not self.wifi_up():
            return False
        # true time and uptime of one host instant: two reads would put whatever a busy
        # host stalls between them (times the fast clock's speed) into the node's clock
        h = _host()
        c = self._ctl()
        true = c.get("epoch0", 1795500000) + (h - c.get("t0", self.start)) * self._speed()
        self.synced_offset = true - (h - self.start) * self._speed()
        with open(DIR + "/rtc_clock", "w") as f:
            f.write(repr(self.synced_offset - self.start * self._speed()))  # host-time based
        self.event("ntp")
        return True

    # --- watchdog / reset -------------------------------------------------------
    def wdt_start(self, timeout_s):
        # started, or re-timed (machine.WDT(timeout=) again on the ESP32 port). The
        # harness reads `wdt`: with it, a crash or main.py returning ends in a watchdog
        # reset after the timeout; without it the chip would sit at the REPL for good
        self.wdt_s = timeout_s
        self.last_feed = _host()
        with open(DIR + "/wdt", "w") as f:
            f.write(str(timeout_s))

    def wdt_feed(self):
        # the watchdog is a hardware timer: real seconds, like the socket timeouts,
        # not the fast virtual clock
        now = _host()
        if self.wdt_s and now - self.last_feed > self.wdt_s:
            self.event("wdt_starved %.1f" % (now - self.last_feed))  # the chip would reset here
        self.last_feed = now

    def reset(self):
        self.event("reset")
        sys.exit(RESET_EXIT)

    def reset_cause(self):
        try:
            with open(DIR + "/cause") as f:
                return f.read().strip()  # the harness says how it restarted us
        except OSError:
            return "power_on"

    def rtc_mem(self, data=None):
        if data is None:
            try:
                with open(DIR + "/rtc.bin", "rb") as f:
                    return f.read()
            except OSError:
                return b""
        with open(DIR + "/rtc.bin", "wb") as f:
            f.write(data)

    def free_heap(self):
        return gc.mem_free()

    def idf_largest(self):
        # the unix port has no IDF heap: a plausible ESP32 figure (largest free block
        # after Wi-Fi and one TLS session), steerable through ctl.json
        return self._ctl().get("idf_largest", 30720)

    def rand16(self):
        return int.from_bytes(os.urandom(2), "little")

    # --- Wi-Fi -------------------------------------------------------------------
    # As the ESP32 port's network.WLAN (ports/esp32/network_wlan.c, IDF 5): connect()
    # starts an attempt and returns; status() says STAT_CONNECTING (1001) until it
    # ends in STAT_GOT_IP (1010) or a failure (201 no AP found, 202 wrong password,
    # 200 beacon timeout after losing the AP). A second connect() before disconnect()
    # raises OSError('Wifi Internal Error'): the IDF answers "sta is connecting, return
    # error", also after a failed attempt (micropython#17661). ctl: wifi (AP there),
    # wifi_connect_s (virtual seconds an attempt takes), wifi_fail (status when no AP).
    def _wifi_state(self):
        if self.wifi_at is None:
            return 1000  # STAT_IDLE
        if self.wifi_lost:
            return 200  # STAT_BEACON_TIMEOUT: the AP went away after we had an IP
        c = self._ctl()
        if (self.ticks_ms() - self.wifi_at) < c.get("wifi_connect_s", 2) * 1000:
            return 1001  # STAT_CONNECTING
        if not self.wifi_got:
            if not c.get("wifi", True):
                return c.get("wifi_fail", 201)  # STAT_NO_AP_FOUND: the attempt is over
            self.wifi_got = True
        if not c.get("wifi", True):
            self.wifi_lost = True
            return 200
        return 1010  # STAT_GOT_IP

    def wifi_connect(self, ssid, password):
        if self.wifi_at is not None:
            self.event("wifi_internal_error")
            raise OSError("Wifi Internal Error")  # the chip's answer (micropython#17661)
        self.wifi_at = self.ticks_ms()
        self.wifi_got = self.wifi_lost = False
        self.event("wifi_connect")

    def wifi_disconnect(self):
        self.wifi_at = None
        self.wifi_got = self.wifi_lost = False

    def wifi_status(self):
        return self._wifi_state()

    def wifi_up(self):
        return self._wifi_state() == 1010

    def wifi_restart(self):
        self.wifi_disconnect()
        self.event("wifi_restart")

    def rssi(self):
        return self._ctl().get("rssi", -60) if self.wifi_up() else None

    def getaddrinfo(self, host, port):
        import socket

        if not self.wifi_up():
            raise OSError(-2)  # no network: name resolution fails as on the chip
        host = self._ctl().get("dns", {}).get(host, host)
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)

    # --- probes --------------------------------------------------------------------
    def _probes(self):
        return self._ctl().get("probes", [])

    def scan(self):
        if self._ctl().get("crash"):
            raise RuntimeError("simulated crash")  # for the boot-loop tests
        self.event("bus_search")
        if self._ctl().get("short"):
            # DQ shorted to ground: every bit reads 0, the search "finds" 255 devices
            return [bytes(8) for _ in range(255)]
        out = []
        for p in self._probes():
            if p.get("fault") != "absent":
                out.append(bytes(int(p["rom"][i : i + 2], 16) for i in range(0, 16, 2)))
        return out

    def convert_all(self):
        self.reads = {}

    def write_config(self, rom, cfg_byte):
        if self._ctl().get("short"):
            return False
        h = ds18b20.rom_hex(rom)
        self.bits = getattr(self, "bits", {})
        self.bits[h] = 9 + ((cfg_byte >> 5) & 3)
        self.event("resolution %s %d" % (h, self.bits[h]))
        return True

    def read_scratch(self, rom):
        if self._ctl().get("short"):
            return bytearray(9)  # the data line held low reads as zeros
        h = ds18b20.rom_hex(rom)
        for p in self._probes():
            if p["rom"] != h:
                continue
            f = p.get("fault")
            if f == "absent":
                return None
            if f == "zero":
                return bytearray(9)
            if f == "power_on":
                return ds18b20.encode(85.0, byte6=0x0C)
            temp = p.get("temp", 4.0)
            if p.get("amp"):
                # warming and cooling: a compressor cycle of `period` s around `temp`
                import math

                ph = (
                    2
                    * math.pi
                    * (self._true_time() % p.get("period", 2400))
                    / p.get("period", 2400)
                )
                temp += p["amp"] * math.sin(ph)
            sp = ds18b20.encode(temp, getattr(self, "bits", {}).get(h, p.get("bits", 12)))
            n = self.reads.get(h, 0) if hasattr(self, "reads") else 0
            if hasattr(self, "reads"):
                self.reads[h] = n + 1
            if f == "crc" or (f == "flaky" and n < 2):
                sp[0] ^= 0x01  # a flipped bit on the wire
            return sp
        return None

    def led(self, on):
        self.event("led %d" % (1 if on else 0))

    # --- storage -------------------------------------------------------------------
    def flash_root(self):
        if self._flash is None:
            blocks = self.ctl.get("flash_blocks", 512)  # 2 MiB like the ESP32's vfs partition
            self._flash = FileFlash(DIR + "/flash.img", blocks)
            self._flash.hold = lambda: self._ctl().get("hold_write")
            try:
                fs = vfs.VfsLfs2(self._flash)
            except OSError:
                vfs.VfsLfs2.mkfs(self._flash)
                fs = vfs.VfsLfs2(self._flash)
            vfs.mount(fs, "/flash")
        return "/flash"

    def config_path(self):
        return DIR + "/config.json"

    def ca_path(self):
        return DIR + "/ca.der"

    def event(self, what):
        with open(DIR + "/events.log", "a") as f:
            # uptime and the true (harness) time, so tests can check the node's clock
            true = self._true_time()
            if what.startswith("sample ") and self.read_true is not None:
                true = self.read_true  # the instant the sample's clock was read
            f.write("%d %d %s\n" % (self.uptime_s(), true, what))
