# The node: sample, queue, send, obey commands, report health; one loop, no threads.
# Order per step (mqtt_as habit: the link never holds up sampling or the watchdog):
# feed the watchdog, take a sample when due, keep Wi-Fi and the clock, drain the
# queue over the uplink a few batches at a time, climb the reboot ladder if needed,
# sleep until the next thing to do.
import gc
import json

from sense import config, ds18b20, fq, payload, policy
from sense import contract as C
from sense.uplink import Refused, Uplink

FW_VERSION = "0.4.0"
STEP_MS = 1000  # longest sleep between two watchdog feeds / command polls
SENDS_PER_STEP = 4  # batches per step before sampling and feeding again
NTP_EVERY_MS = 3600000  # re-sync hourly (the ESP32 RTC drifts several s/day)


def _read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None


def _write(path, data):
    # whole-file replace by rename: a power cut leaves the old or the new file
    with open(path + ".new", "w") as f:
        f.write(data)
    import os

    os.rename(path + ".new", path)


class Node:
    def __init__(self, board):
        self.b = board
        b = board
        self.root = b.flash_root()
        try:
            import os

            os.mkdir(self.root)  # /data on the ESP32's root littlefs, made at first boot
        except OSError:
            pass
        crumb = self._crumb()
        try:
            st = json.loads(_read(self.root + "/boot") or "{}")
        except ValueError:
            st = {}
        self.boots = st.get("boots", 0) + 1
        _write(self.root + "/boot", json.dumps({"boots": self.boots}))
        cause = b.reset_cause()
        self.reset_cause = self._cause(cause, crumb)
        # Only crashes count toward safe mode: an exception (main.py's crumb "x") or a
        # watchdog reset we did not ask for. The count lives in RTC memory, so a power
        # cut (which clears it) never counts, and a full flash cannot stop the counting.
        crashed = not crumb.get("w") and (crumb.get("x") or cause == "watchdog")
        self.crashes = crumb.get("c", 0) + (1 if crashed else 0)
        # "s": NTP answered since the last power-on. Only then is the RTC's time ours:
        # the installer's RTC may be local time, a power cut resets it (issue 17 item 3)
        self.crumbs = {"b": self.boots, "c": self.crashes, "s": crumb.get("s", 0)}
        self.clock_ok = bool(crumb.get("s")) and b.time() is not None
        self._crumb_set("w", "")  # clears the reason of the last deliberate reset
        self._crumb_set("p", "boot")
        self.safe = policy.safe_mode(self.crashes)
        raw = _read(b.config_path())
        cfg, self.problems = {}, []
        if not raw:
            self.problems = ["no config: run opensense node flash"]
        else:
            try:
                cfg = json.loads(raw)
            except ValueError as e:  # a torn or hand-edited file: say so, never crash
                self.problems = ["config.json is not JSON (%s): run opensense node flash" % e]
            if not isinstance(cfg, dict):
                cfg, self.problems = {}, self.problems or ["config.json is not a JSON object"]
        self.cfg = config.with_defaults(cfg)
        if not self.problems:
            self.problems = config.problems(self.cfg)
        if self.problems or self.safe:
            return
        c = self.cfg
        self.cadence = int(_read(self.root + "/cadence") or c["cadence"])
        self.ca = _read(b.ca_path(), "rb")
        self.q = fq.Queue(self.root + "/q", self.boots, c["queue_bytes"], 4000, c["batch"])
        self.errors = {}  # rom -> failed reads
        self.status = {}  # rom hex -> last status name
        self.probes = {}  # rom bytes -> (label, offset, channel)
        for rom in c.get("probes", {}):
            p = c["probes"][rom]
            rb = bytes(int(rom[i : i + 2], 16) for i in range(0, 16, 2))
            self.probes[rb] = (
                p["label"],
                p.get("offset", 0),
                self.q.chan("temperature", p["label"], "°C"),
            )
        self.up = Uplink(b, c, self.ca, self._cmd)
        self.samples = 0
        self.sync_ms = None
        self.next_ntp = 0
        self.attempt = 0
        self.next_try = 0
        self.last_ok = b.ticks_ms()
        self.rung = 0
        self.wifi_at = None  # ticks of the Wi-Fi attempt under way (None: none)
        self.wifi_tries = 0  # failed attempts in a row, for the backoff
        self.next_wifi = b.ticks_ms()
        self.refused = ""
        self.n_refused = 0  # readings the server refused (…/err): dropped, counted in health
        self.solo = 0  # records to send one at a time: a refused batch being picked apart
        self.healthy = False

    # --- breadcrumbs in RTC memory ---------------------------------------------------
    def _crumb(self):
        try:
            return json.loads(self.b.rtc_mem() or b"{}")
        except ValueError:
            return {}

    def _crumb_set(self, k, v):
        if self.crumbs.get(k) == v and k != "b":
            return
        self.crumbs[k] = v
        self.b.rtc_mem(json.dumps(self.crumbs).encode())

    def _cause(self, cause, crumb):
        # reset_cause() says power_on after a brown-out too; RTC memory survives a
        # brown-out but not a power cut, so a crumb left there tells them apart
        why, phase = crumb.get("w"), crumb.get("p")
        if why:
            return why  # a reset we asked for: "ladder", "cmd", "safe", "config"
        if crumb.get("x"):
            return "crash (during %s): %s" % (phase, crumb["x"])
        if cause == "power_on" and crumb:
            return "brownout (during %s)" % phase
        if cause == "watchdog":
            return "watchdog (during %s)" % phase
        return cause

    # --- Wi-Fi (policy.wifi_step; mqtt_as's wifi_connect) ---------------------------
    def _wifi(self):
        # Never connect() while an attempt is under way: on the ESP32 that raises
        # OSError('Wifi Internal Error') (micropython#17661). One connect() per attempt,
        # status() polled each step, disconnect() before the next attempt, every call
        # guarded: a Wi-Fi error must never reach the watchdog.
        b = self.b
        now = b.ticks_ms()
        st = None
        if self.wifi_at is not None:
            try:
                st = b.wifi_status()
            except OSError:
                st = -1
        step = policy.wifi_step(st, 0 if self.wifi_at is None else b.ticks_diff(now, self.wifi_at))
        if step == policy.WIFI_UP:
            if self.wifi_tries:
                b.event("wifi up")
            self.wifi_tries = 0
            return
        if step == policy.WIFI_WAIT or b.ticks_diff(now, self.next_wifi) < 0:
            return
        if self.wifi_at is not None:
            self.wifi_tries += 1
            b.event("wifi failed %s" % st)
            try:
                b.wifi_disconnect()  # ends the attempt: the next connect() is allowed
            except OSError:
                pass
        self.wifi_at = None
        self.next_wifi = b.ticks_add(now, policy.backoff_ms(self.wifi_tries, b.rand16()))
        c = self.cfg["wifi"]
        try:
            b.wifi_connect(c["ssid"], c.get("password") or "")
            self.wifi_at = now
        except OSError as e:
            self.wifi_tries += 1
            b.event("wifi error %r" % (e,))

    # --- time --------------------------------------------------------------------
    def _now(self):
        # Unix seconds once the clock is confirmed (NTP since the last power-on), else
        # None: a reading then carries uptime, and no TLS connection is opened
        return self.b.time() if self.clock_ok else None

    def _clock(self):
        b = self.b
        now = b.ticks_ms()
        if not b.wifi_up() or b.ticks_diff(now, self.next_ntp) < 0:
            return
        self._crumb_set("p", "ntp")
        first = not self.clock_ok
        if b.ntp_sync(self.cfg["ntp_host"]):
            self.clock_ok = True
            self._crumb_set("s", 1)
            self.sync_ms = b.ticks_ms()
            self.next_ntp = b.ticks_add(now, NTP_EVERY_MS)
            if first:
                # readings so far carry this boot's uptime: now they get their time
                off = b.time() - b.uptime_s()
                self.q.set_clock(off)
                b.event("clock %d %d" % (self.boots, off))
        else:
            self.next_ntp = b.ticks_add(now, 30000)

    # --- sampling ------------------------------------------------------------------
    def sample(self):
        b = self.b
        self._crumb_set("p", "sample")
        b.convert_all()
        b.sleep_ms(ds18b20.conv_ms(self.cfg["resolution"]))  # datasheet table 2, worst case
        b.wdt_feed()
        vals = []
        for rom in self.probes:
            # addressed directly (Match ROM), no bus search per sample: a shorted line
            # would "find" 255 devices and cost seconds of bus time every time
            label, off, ch = self.probes[rom]
            st, v = ds18b20.read(b.read_scratch, rom, self.errors)
            if st == ds18b20.OK and self.status.get(label) != "ok":
                self._resolution(rom)  # back after a replug: its register is the default
            self.status[label] = ds18b20.FAULTS[st]
            if st == ds18b20.OK:
                vals.append((ch, v + off))  # a missing or faulty probe sends nothing
        t = self._now()
        u = b.uptime_s()  # read once: the queue and the log must agree to the second
        self.samples += 1
        if vals:
            # logged (sim only) before the queue write, so the harness's true time is
            # taken at the instant the clock was read
            b.event(
                "sample %d %d %d %s"
                % (
                    self.q.seq,
                    t if t is not None else -u,
                    self.boots,
                    " ".join("%s=%r" % (self.q.chans[c][1], v) for c, v in vals),
                )
            )
            self.q.add(t if t is not None else u, t is not None, vals)
        if self.samples % self.cfg["health_every"] == 1:
            self.q.add(t if t is not None else u, t is not None, self.health_vals(), True)

    def scan_bus(self):
        # At boot and on cmd/scan: search the bus, keep DS18B20s with a good ROM CRC
        # (at most ds18b20.MAX_SCAN), set the configured probes' resolution, and name
        # the probes found but not configured in info
        b = self.b
        try:
            found, bad = ds18b20.bus_roms(b.scan())
        except OSError:
            found, bad = [], 0
        for rom in found:
            if rom in self.probes:
                self._resolution(rom)
            else:
                self.status[ds18b20.rom_hex(rom)] = "unconfigured"
        self.bus_bad = bad
        b.event("scan %d ok %d rejected" % (len(found), bad))

    def _resolution(self, rom):
        try:
            self.b.write_config(rom, ds18b20.config_byte(self.cfg["resolution"]))
        except OSError:
            pass  # the read path reports the probe's trouble

    def health(self):
        b = self.b
        q = self.q
        recs, _ = q.peek(1)
        t = self._now()
        oldest = (t - recs[0][1]) if recs and t is not None and recs[0][1] is not None else 0
        h = {
            "uptime": b.uptime_s(),
            "boots": self.boots,
            "heap_free": b.free_heap(),
            "idf_largest": b.idf_largest(),
            "queue_depth": q.depth(),
            "oldest_unsent": max(0, oldest),
            "drops": q.drops,
            "refused": self.n_refused,
            "clock_sync_age": -1
            if self.sync_ms is None
            else b.ticks_diff(b.ticks_ms(), self.sync_ms) // 1000,
        }
        for rom in self.probes:
            h["probe_errors_" + self.probes[rom][0]] = self.errors.get(rom, 0)
        return h

    def health_vals(self):
        q = self.q
        out = []
        r = self.b.rssi()
        if r is not None:
            out.append((q.chan("signal", "wifi", "dBm"), r))
        h = self.health()
        for k in h:
            unit = (
                "s"
                if k in ("uptime", "oldest_unsent", "clock_sync_age")
                else "B"
                if k in ("heap_free", "idf_largest")
                else "1"
            )
            if h[k] >= 0:
                out.append((q.chan("health", k, unit), h[k]))
        return out

    def info(self):
        return {
            "fw_version": FW_VERSION,
            "model": self.b.model,
            "reset_cause": self.reset_cause,
            "boots": self.boots,
            "cadence": self.cadence,
            "probes": self.status,
            "health": self.health(),
        }

    # --- commands ----------------------------------------------------------------------
    def _cmd(self, name, msg):
        b = self.b
        if name == "identify":
            b.event("identify")
            for _ in range(10):  # blink 2 s: the installer finds the node in a row of fridges
                b.led(1)
                b.sleep_ms(100)
                b.led(0)
                b.sleep_ms(100)
                b.wdt_feed()
        elif name == "scan":
            self.scan_bus()
        elif name == "cadence":
            try:
                s = int(msg)
            except ValueError:
                s = 0
            if policy.cadence_ok(s):
                self.cadence = s
                _write(self.root + "/cadence", str(s))
                b.event("cadence %d" % s)
            else:
                b.event("cadence refused %r" % (msg,))

    # --- uplink ------------------------------------------------------------------------
    def _uplink(self):
        b = self.b
        up = self.up
        now = b.ticks_ms()
        if self.refused or not self.clock_ok:
            return  # no TLS before the clock is confirmed: certificate dates need it
        if not up.connected():
            if not b.wifi_up() or b.ticks_diff(now, self.next_try) < 0:
                return
            self._crumb_set("p", "connect")
            try:
                ok = up.connect(self.info())
            except Refused as e:
                self._refuse(e)
                return
            if not ok:
                self.attempt += 1
                self.next_try = b.ticks_add(now, policy.backoff_ms(self.attempt, b.rand16()))
                b.event("connect failed %s" % up.last_error)
                return
            self.attempt = 0
            b.event("connected %s" % ("mqtt" if up.mode == 0 else "https"))
        self._crumb_set("p", "send")
        for _ in range(SENDS_PER_STEP):
            recs, cur = self.q.peek(C.MAX_MEASUREMENTS)
            if not recs:
                break
            if recs[0][1] is None:
                if recs[0][2] == self.boots & 0xFFFF:
                    break  # this boot's clock is not known yet: wait for NTP
                # an old boot that never learned the time: its records only. The batch
                # can go on into the next boot's, timed once it learned the time (the
                # bench rig's six-hour AP cut lost those when the whole batch went)
                n = 1
                while n < len(recs) and recs[n][1] is None and recs[n][2] == recs[0][2]:
                    n += 1
                if n < len(recs):
                    recs, cur = self.q.peek_n(n)
                self.q.skip_untimed(cur, n)
                continue
            n = 0
            while n < len(recs) and recs[n][1] is not None:
                n += 1
            if self.solo and n > 1:
                n = 1
            if n < len(recs):
                recs, cur = self.q.peek_n(n)
            gc.collect()  # one ~3 KB string next: make room before, not after, it is needed
            body = payload.body(recs, self.q.chans, self.cfg["local_id"] if up.mode else None)
            try:
                ok = up.send(body)
            except Refused as e:
                self._refuse(e)
                return
            if not ok:
                self.attempt += 1
                self.next_try = b.ticks_add(
                    b.ticks_ms(), policy.backoff_ms(self.attempt, b.rand16())
                )
                b.event("send failed %s" % up.last_error)
                return
            if up.refusal and len(recs) > 1:
                # The server refused the whole batch for one bad record (a time in the
                # future, a value out of range): nothing of it was stored. Send its
                # records one at a time, so only the bad one is lost; each record is
                # sent at most twice, and the queue moves on.
                self.solo = len(recs)
                b.event(
                    "refused batch %s: sending its %d records one by one" % (up.refusal, len(recs))
                )
                continue
            if up.refusal:
                # One record the server will never take (retrying cannot change it): it
                # is dropped, counted in health (`refused`), and the queue goes on.
                self.n_refused += len(recs[0][4])
                b.event("refused record %d %s" % (recs[0][0], up.refusal))
            if self.solo:
                self.solo -= 1
            self.q.ack(cur, len(recs))
            self._ok()
        if not up.poll() or not up.ping():
            b.event("link lost %s" % up.last_error)
            self.next_try = b.ticks_add(b.ticks_ms(), policy.backoff_ms(0, b.rand16()))
        elif up.c is not None:
            self._ok()

    def _ok(self):
        self.last_ok = self.b.ticks_ms()
        self.rung = 0
        if not self.healthy:
            self._healthy()

    def _healthy(self):
        self.healthy = True
        self._crumb_set("c", 0)

    def _refuse(self, e):
        # a wrong token or config: retrying cannot help; keep sampling and queueing,
        # say why, and wait for the installer (mpremote) or a reset
        self.refused = str(e)
        self.b.event("refused %s" % e)
        print("server refused this node:", e, "- check token/device id with the installer")

    def _ladder(self):
        b = self.b
        since = b.ticks_diff(b.ticks_ms(), self.last_ok) // 1000
        step = policy.ladder_step(since, self.rung, self.cfg["ladder"])
        if step == policy.WIFI_RESTART:
            self.rung = step
            self.up.close()
            try:
                b.wifi_restart()
            except OSError:
                pass
            self.wifi_at = None
        elif step == policy.RESET:
            self.q.flush()
            self._crumb_set("w", "ladder")
            b.reset()

    def _park(self, why):
        # Safe mode or a bad config: give the REPL to mpremote, but not for good. The
        # watchdog (started by main.py, it cannot be stopped) is re-timed to
        # SAFE_WAIT_S and resets the chip then; the crumb makes that reset ours (not a
        # crash), and the crash count is left one short of safe mode: the app gets one
        # more try, and one more crash parks it again.
        self._crumb_set("c", min(self.crashes, policy.BOOTLOOP_N - 1))
        self._crumb_set("w", why)
        self.b.wdt_start(policy.SAFE_WAIT_S)

    # --- loop ----------------------------------------------------------------------------
    def run(self, steps=None):
        b = self.b
        if self.safe:
            print("safe mode: %d crashes in a row; the app is not started." % self.crashes)
            print(
                "The REPL is free for mpremote for %d s; then the node resets and tries again."
                % policy.SAFE_WAIT_S
            )
            b.event("safe_mode")
            return self._park("safe")
        if self.problems:
            for p in self.problems:
                print("config:", p)
            b.event("config_invalid")
            return self._park("config")
        c = self.cfg
        b.wdt_start(c["wdt_s"])
        self.scan_bus()
        try:
            self._loop(steps)
        except KeyboardInterrupt:
            # mpremote taking the REPL (`opensense node flash` over a running node):
            # the readings held in RAM go to flash first, or every reinstall loses up
            # to `batch` of them (the bench rig's twenty-reinstalls scenario)
            self.q.flush()
            raise

    def _loop(self, steps):
        b = self.b
        next_sample = b.ticks_ms()
        while steps is None or steps > 0:
            if steps:
                steps -= 1
            b.wdt_feed()
            if b.ticks_diff(b.ticks_ms(), next_sample) >= 0:
                self.sample()
                next_sample = b.ticks_add(next_sample, self.cadence * 1000)  # ticks wrap: ticks_add
                if b.ticks_diff(b.ticks_ms(), next_sample) >= 0:
                    next_sample = b.ticks_add(
                        b.ticks_ms(), self.cadence * 1000
                    )  # fell behind: no burst
            self._wifi()
            self._clock()
            self._uplink()
            self._ladder()
            if not self.healthy and b.uptime_s() >= policy.HEALTHY_S:
                self._healthy()
            self._crumb_set("p", "idle")
            gc.collect()
            wait = b.ticks_diff(next_sample, b.ticks_ms())
            if wait > 0:
                b.sleep_ms(min(wait, STEP_MS))


def main(board):
    Node(board).run()
