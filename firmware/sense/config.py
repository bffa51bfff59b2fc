# Node config: checked before the installer writes anything, and again at boot.
# Pure: a dict in, a list of problems out (each says what to do). Runs under CPython
# (opensense node flash) and MicroPython (the node) alike.
from sense import contract as C
from sense.ds18b20 import crc8

DEFAULTS = {
    "cadence": 60,  # s between samples
    "resolution": 12,  # DS18B20 bits: 0.0625 degC, 750 ms conversion
    "health_every": 15,  # a health record every N samples
    "batch": 5,  # records held in RAM before one flash append (while not acknowledged)
    # flash for the queue, at most: the queue also stops at the filesystem's free blocks
    # less a reserve (sense/fq.py); a 4 MB ESP32's 2 MiB littlefs holds ~1.6 MB of it
    # beside the firmware (`opensense node check` refuses more)
    "queue_bytes": 1500000,
    "wdt_s": 120,
    "io_timeout_s": 10,
    "ladder": [900, 3600],  # s without uplink: restart Wi-Fi, then reset the chip
    "ntp_host": "pool.ntp.org",
    "http_after": 3,  # failed MQTT connects in a row before the HTTPS fallback
    "mqtt_keepalive": 60,  # s, MQTT 3.1.1 3.1.2.10: the broker's will after 1.5x of silence
    "mqtt_retry_s": 300,  # on the HTTPS fallback, MQTT is tried again this often
}
MAX_PROBES = 8
# every key a config may hold, by section; DEFAULTS' keys too (issue 17 item 12)
KEYS = ("wifi", "server", "account", "device_id", "local_id", "token", "probes")
SECTION_KEYS = {"wifi": ("ssid", "password"), "server": ("host", "mqtt_port", "https_url")}
PROBE_KEYS = ("label", "offset")


def unknown_keys(cfg):
    # the installer's check: a misspelt key ("cadance") would silently be a default.
    # Not run at boot: a node keeps working with a key a newer installer wrote.
    p = []
    for k in cfg:
        if k not in KEYS and k not in DEFAULTS:
            p.append("%s: not a config key (a typo? the keys are in docs/firmware.md)" % k)
    for sec in SECTION_KEYS:
        if isinstance(cfg.get(sec), dict):
            for k in cfg[sec]:
                if k not in SECTION_KEYS[sec]:
                    p.append(
                        "%s.%s: not a config key (%s takes %s)"
                        % (sec, k, sec, ", ".join(SECTION_KEYS[sec]))
                    )
    probes = cfg.get("probes")
    if isinstance(probes, dict):
        for rom in probes:
            if isinstance(probes[rom], dict):
                for k in probes[rom]:
                    if k not in PROBE_KEYS:
                        p.append(
                            "probes.%s.%s: not a config key (a probe takes label, offset)"
                            % (rom, k)
                        )
    return p


def with_defaults(cfg):
    out = dict(DEFAULTS)
    out.update(cfg)
    return out


def _str(v, lo, hi):
    return isinstance(v, str) and lo <= len(v.encode()) <= hi


def _int(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def rom_problem(rom):
    if not isinstance(rom, str) or len(rom) != 16:
        return "must be 16 hex digits (the probe's 64-bit ROM id, e.g. 28ff4a1b2c3d045a)"
    try:
        b = bytes(int(rom[i : i + 2], 16) for i in range(0, 16, 2))
    except ValueError:
        return "must be 16 hex digits"
    if b[0] != 0x28:
        return "is not a DS18B20 (family code 28); check the probe type"
    if crc8(b, 7) != b[7]:
        return "has a bad CRC: a typo in the ROM id? copy it from the bus scan (docs/firmware.md, Flashing a node, step 3)"
    return None


def problems(cfg):
    p = []
    w = cfg.get("wifi")
    if not isinstance(w, dict) or not _str(w.get("ssid"), 1, 32):
        p.append("wifi.ssid: give the network name (1 to 32 bytes)")
    elif not (w.get("password") in ("", None) or _str(w.get("password"), 8, 63)):
        p.append(
            "wifi.password: WPA2 passwords have 8 to 63 characters (empty for an open network)"
        )
    s = cfg.get("server")
    if not isinstance(s, dict) or not _str(s.get("host"), 1, 253) or " " in s.get("host", " "):
        p.append("server.host: give the broker's host name as on its certificate")
    else:
        if not _int(s.get("mqtt_port", 8883), 1, 65535):
            p.append("server.mqtt_port: a TCP port 1..65535 (the TLS listener, usually 8883)")
        u = s.get("https_url")
        if u not in (None, "") and not (isinstance(u, str) and u.startswith("https://")):
            p.append("server.https_url: must start with https:// (the HTTPS fallback is TLS only)")
    if not _str(cfg.get("account"), 5, 64) or not cfg["account"].startswith("acc_"):
        p.append("account: the account id (acc_...) from the dashboard")
    if not _str(cfg.get("device_id"), 5, 64) or not cfg["device_id"].startswith("dev_"):
        p.append("device_id: the device id (dev_...) from the dashboard")
    lid = cfg.get("local_id")
    if not _str(lid, 1, 64) or any(c in lid for c in "/+# "):
        p.append("local_id: the device's local id (e.g. fridge01) without / + # or spaces")
    if not _str(cfg.get("token"), 9, 200) or not cfg["token"].startswith("ds_live_"):
        p.append("token: the device's ingest token (ds_live_...), shown once when it was made")
    probes = cfg.get("probes", {})
    if not isinstance(probes, dict):
        p.append("probes: a map of ROM id -> {label, offset}")
        probes = {}
    if len(probes) > MAX_PROBES:
        p.append("probes: at most %d probes on one bus" % MAX_PROBES)
    labels = []
    for rom in probes:
        why = rom_problem(rom)
        if why:
            p.append("probes.%s: %s" % (rom, why))
        v = probes[rom]
        if not isinstance(v, dict) or not _str(v.get("label"), 1, 64):
            p.append("probes.%s.label: a short name for the probe (e.g. front, back)" % rom)
            continue
        if v["label"] in labels:
            p.append(
                "probes.%s.label: %r is used twice; each probe needs its own" % (rom, v["label"])
            )
        labels.append(v["label"])
        off = v.get("offset", 0)
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not -5 <= off <= 5:
            p.append("probes.%s.offset: a calibration offset in degC, -5..5" % rom)
    c = with_defaults(cfg)
    if not _int(c["cadence"], C.CADENCE_MIN_S, C.CADENCE_MAX_S):
        p.append(
            "cadence: whole seconds between readings, %d..%d" % (C.CADENCE_MIN_S, C.CADENCE_MAX_S)
        )
    if c["resolution"] not in (9, 10, 11, 12):
        p.append("resolution: 9, 10, 11 or 12 bits")
    if not _int(c["wdt_s"], 30, 600):
        p.append("wdt_s: watchdog timeout 30..600 s")
    if not _int(c["io_timeout_s"], 1, 60) or c["io_timeout_s"] * 3 >= c["wdt_s"]:
        p.append("io_timeout_s: 1..60 s and well under wdt_s (a TLS handshake takes several reads)")
    if not _int(c["batch"], 1, 60):
        p.append("batch: 1..60 records per flash append")
    if not _int(c["mqtt_keepalive"], 2, 1200):
        p.append(
            "mqtt_keepalive: 2..1200 s (the server sees a dead node as offline after 1.5x this)"
        )
    if not _int(c["mqtt_retry_s"], 10, 86400):
        p.append("mqtt_retry_s: 10..86400 s between MQTT attempts while on the HTTPS fallback")
    if not _int(c["queue_bytes"], 16384, 16000000):
        p.append("queue_bytes: 16384..16000000")
    return p
