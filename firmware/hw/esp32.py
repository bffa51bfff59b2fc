# ESP32 board: DS18B20 bus on one GPIO (4.7 kOhm pull-up to 3V3, datasheet fig. 5),
# station Wi-Fi, RTC + NTP, task watchdog, status LED.
import gc
import time

import machine
import network
import onewire

# Pins of the OpenSense DIY node (docs/firmware.md): probes' DQ on GPIO4, LED on GPIO2
ONEWIRE_PIN = 4
LED_PIN = 2
# 2000-01-01 - 1970-01-01: older ESP32 ports count from 2000 (time.gmtime(0)[0] == 2000)
EPOCH_FIX = 946684800 if time.gmtime(0)[0] == 2000 else 0
FLASH_ROOT = "/data"  # littlefs is the root filesystem; the queue lives in /data


class Board:
    model = "diy_esp32"

    def __init__(self):
        self.ow = onewire.OneWire(machine.Pin(ONEWIRE_PIN))
        self.led_pin = machine.Pin(LED_PIN, machine.Pin.OUT, value=0)
        self.wlan = network.WLAN(network.STA_IF)
        self.rtc = machine.RTC()
        self.wdt = None
        self._last_ticks = time.ticks_ms()
        self._up_ms = self._last_ticks

    # --- time ---------------------------------------------------------------
    def ticks_ms(self):
        return time.ticks_ms()

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def ticks_add(self, a, b):
        return time.ticks_add(a, b)

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def uptime_s(self):
        # ticks_ms wraps every 2^30 ms (~12.4 days): accumulate differences instead
        now = time.ticks_ms()
        self._up_ms += time.ticks_diff(now, self._last_ticks)
        self._last_ticks = now
        return self._up_ms // 1000

    def time(self):
        # what the RTC says, in Unix seconds, or None while it was plainly never set.
        # Not trusted by itself: the node uses it only after NTP answered since the
        # last power-on (sense/node.py _now), since an installer may have set it to
        # local time (mpremote's `rtc --set`)
        t = time.time() + EPOCH_FIX
        return t if t >= 1704067200 else None

    def ntp_sync(self, host="pool.ntp.org"):
        import ntptime

        ntptime.host = host
        try:
            ntptime.settime()  # sets the RTC to UTC
        except (OSError, OverflowError):
            return False
        return True

    # --- watchdog / reset -----------------------------------------------------
    def wdt_start(self, timeout_s):
        # also re-times a running watchdog: the ESP32 port's machine.WDT() calls
        # esp_task_wdt_reconfigure() every time and adds its task user once
        # (ports/esp32/machine_wdt.c, IDF 5); it cannot be stopped
        self.wdt = machine.WDT(timeout=timeout_s * 1000)

    def wdt_feed(self):
        if self.wdt:
            self.wdt.feed()

    def reset(self):
        machine.reset()

    def reset_cause(self):
        return {
            machine.PWRON_RESET: "power_on",
            machine.HARD_RESET: "hard",
            machine.WDT_RESET: "watchdog",
            machine.DEEPSLEEP_RESET: "deepsleep",
            machine.SOFT_RESET: "soft",
        }.get(machine.reset_cause(), "unknown")

    def rtc_mem(self, data=None):
        # RTC slow memory survives every reset except a power cut (and a brown-out)
        if data is None:
            return self.rtc.memory()
        self.rtc.memory(data)

    def free_heap(self):
        return gc.mem_free()

    def idf_largest(self):
        # the largest free block of the IDF heap, outside the MicroPython heap: mbedTLS
        # and Wi-Fi allocate there (micropython#14421), and a TLS handshake needs its
        # record buffers in one piece; a shrinking figure over days is fragmentation
        try:
            import esp32

            return max([h[2] for h in esp32.idf_heap_info(esp32.HEAP_DATA)] or [0])
        except (ImportError, AttributeError, OSError):
            return -1  # left out of health

    def rand16(self):
        import random

        return random.getrandbits(16)

    # --- Wi-Fi -------------------------------------------------------------------
    # network.WLAN on the ESP32 port: connect() only starts an attempt; status() is
    # STAT_CONNECTING (1001) until STAT_GOT_IP (1010) or a failure code (200-204).
    # connect() again before disconnect() raises OSError('Wifi Internal Error'), also
    # after a failed attempt (micropython#17661): the node calls wifi_connect once per
    # attempt and disconnects before the next (sense/node.py, mqtt_as's wifi_connect).
    # Every call can raise OSError; the node catches it.
    def wifi_connect(self, ssid, password):
        self.wlan.active(True)
        self.wlan.connect(ssid, password)

    def wifi_disconnect(self):
        self.wlan.disconnect()

    def wifi_status(self):
        return self.wlan.status()

    def wifi_up(self):
        return self.wlan.isconnected()

    def wifi_restart(self):
        self.wlan.disconnect()
        self.wlan.active(False)

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except (OSError, ValueError):
            return None

    def getaddrinfo(self, host, port):
        import socket

        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)

    # --- probes: 1-Wire, DS18B20 --------------------------------------------
    def scan(self):
        return [bytes(r) for r in self.ow.scan()]

    def convert_all(self):
        # skip ROM + Convert T (0x44) to every probe at once; the caller waits tCONV
        self.ow.reset()
        self.ow.writebyte(0xCC)
        self.ow.writebyte(0x44)

    def read_scratch(self, rom):
        if not self.ow.reset():
            return None  # no presence pulse: nothing on the bus
        self.ow.select_rom(rom)
        self.ow.writebyte(0xBE)  # Read Scratchpad
        buf = bytearray(9)
        self.ow.readinto(buf)
        return buf

    def write_config(self, rom, cfg_byte):
        # Write Scratchpad (0x4E): TH, TL, configuration (datasheet "Function commands").
        # Not copied to EEPROM: the node writes it at every boot and after a replug.
        if not self.ow.reset():
            return False
        self.ow.select_rom(rom)
        self.ow.write(bytes((0x4E, 0x4B, 0x46, cfg_byte)))
        return True

    def led(self, on):
        self.led_pin.value(1 if on else 0)

    def flash_root(self):
        return FLASH_ROOT

    def config_path(self):
        return "/config.json"

    def ca_path(self):
        return "/ca.der"

    def event(self, what):
        pass  # the simulated board logs these for the test harness
