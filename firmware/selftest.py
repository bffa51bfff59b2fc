# Installer self-test (`opensense node flash` runs `import selftest` over mpremote):
# prints the probes found, where the MQTT/HTTP modules come from (a frozen copy must
# not shadow the pinned one in /lib), and the first reading accepted by the server.
# Ends with "SELFTEST OK" or "SELFTEST FAILED: <why>".
import sys

if "/lib" in sys.path:
    sys.path.remove("/lib")
    sys.path.insert(0, "/lib")

import json

import hw

# fq unused here: importing it proves the queue module loads on this chip
from sense import config, ds18b20, fq, payload, tls  # noqa: F401
from sense.uplink import Uplink


def run():
    b = hw.board()
    cfg_path = b.config_path()
    with open(cfg_path) as f:
        cfg = config.with_defaults(json.loads(f.read()))
    bad = config.problems(cfg)
    if bad:
        return "config: " + "; ".join(bad)
    with open(b.ca_path(), "rb") as f:
        ca = f.read()
    # the socket shim first: umqtt.simple and urequests bind `usocket` when imported, and
    # imported before tls.install they get the bare socket (no timeout: a broker that
    # never answers hangs the self-test; no DNS through the board)
    tls.install(ca, cfg["server"]["host"], cfg["io_timeout_s"], b.wdt_feed, b.getaddrinfo)
    import umqtt.simple
    import urequests

    print("modules:", umqtt.simple.__file__, urequests.__file__)
    if b.model != "sim_unix" and not umqtt.simple.__file__.startswith("/lib"):
        return "umqtt.simple is not the pinned copy in /lib (a frozen module shadows it)"
    found, bad = ds18b20.bus_roms(b.scan())  # ROM CRC and family checked, bounded
    print("probes on the bus:", len(found))
    if bad:
        print("  %d devices refused (bad ROM CRC or not a DS18B20): a shorted or noisy bus?" % bad)
    b.convert_all()
    b.sleep_ms(ds18b20.conv_ms(cfg["resolution"]))
    names = {}
    for rom in cfg["probes"]:
        names[rom] = cfg["probes"][rom]["label"]
    vals = []
    for rom in found:
        h = ds18b20.rom_hex(rom)
        st, v = ds18b20.read(b.read_scratch, rom)
        print(
            "  %s %-12s %s"
            % (
                h,
                names.get(h, "(not in config)"),
                "%.4f C" % v if st == ds18b20.OK else ds18b20.FAULTS[st],
            )
        )
        if st == ds18b20.OK and h in names:
            vals.append((names[h], v + cfg["probes"][h].get("offset", 0)))
    for rom in names:
        if rom not in [ds18b20.rom_hex(r) for r in found]:
            print("  %s %-12s absent: check its wiring" % (rom, names[rom]))
    if not vals:
        return "no configured probe gave a reading"
    if not b.wifi_up():
        # main.py may have left an attempt under way (mpremote interrupted it): a
        # second connect() would raise 'Wifi Internal Error' (micropython#17661)
        try:
            b.wifi_disconnect()
        except OSError:
            pass
        try:
            b.wifi_connect(cfg["wifi"]["ssid"], cfg["wifi"].get("password") or "")
        except OSError as e:
            return "Wi-Fi: %r" % (e,)
    for _ in range(150):
        if b.wifi_up():
            break
        b.sleep_ms(100)
    else:
        return "Wi-Fi %r did not connect: check the name and password" % cfg["wifi"]["ssid"]
    # always NTP: the RTC may hold what the installer's PC set (local time, not UTC),
    # and a reading dated by it is refused as "in the future" east of UTC
    if not b.ntp_sync(cfg["ntp_host"]):
        return (
            "no time from NTP (%s): the node dates no reading and opens no TLS without it"
            % cfg["ntp_host"]
        )
    up = Uplink(b, cfg, ca, lambda *a: None)
    if not up.connect({"fw_version": "selftest", "model": b.model}):
        return "could not reach the broker %s:%s: %s" % (up.host, up.port, up.last_error)
    # the server acknowledges a payload it refuses too, and says why on .../err
    errs = []
    up.c.set_callback(lambda t, m: errs.append(m))
    up.c.subscribe(up.root + "/err", qos=1)
    chans = [["temperature", label, "°C"] for label, _ in vals]
    recs = [[0, b.time(), 0, 0, [(i, v) for i, (_, v) in enumerate(vals)]]]
    ok = up.send(payload.body(recs, chans))
    for _ in range(20):  # an error answer comes right after the PUBACK
        up.poll()
        if errs:
            break
        b.sleep_ms(50)
    up.close()
    if not ok:
        return "the server did not acknowledge the reading: " + up.last_error
    if errs:
        return "the server refused the reading: %s" % errs[0]
    print("first reading accepted by the server:", ", ".join("%s=%.4f" % x for x in vals))
    return None


why = run()
print("SELFTEST OK" if why is None else "SELFTEST FAILED: " + why)
