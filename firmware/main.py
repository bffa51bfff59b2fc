# Runs at every boot (ESP32: after boot.py; unix port: micropython main.py).
# The hardware is chosen in hw/__init__.py; everything else is in sense/.
# Never stuck (issue 17 item 2): the watchdog starts before anything that can fail or
# hang (imports, the config, the flash), and any exception ends in a reset, never at
# the REPL. Only Ctrl-C (mpremote taking the REPL) gets through.
import sys

# The pinned umqtt.simple / urequests are in /lib; a MicroPython build may freeze its
# own copies, and sys.path searches '.frozen' before '/lib'. /lib goes first.
if "/lib" in sys.path:
    sys.path.remove("/lib")
    sys.path.insert(0, "/lib")

import hw

WDT_BOOT_S = 120  # config.DEFAULTS["wdt_s"]; the node re-times it from its config


def _crashed(b, e):
    # leave a crumb in RTC memory (kept through the reset, lost in a power cut) so the
    # next boot counts a crash toward safe mode and says what it was
    sys.print_exception(e)
    try:
        import json

        crumb = json.loads(b.rtc_mem() or b"{}")
        crumb["x"] = repr(e)[:60]
        b.rtc_mem(json.dumps(crumb).encode())
    except Exception:  # noqa: BLE001 - RTC memory unreadable: reset all the same
        pass


def run():
    b = None
    try:
        b = hw.board()
        b.wdt_start(WDT_BOOT_S)
        import sense.node

        sense.node.main(b)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a crash anywhere ends in a reset
        if b is not None:
            _crashed(b, e)
        hw.reset()


run()
