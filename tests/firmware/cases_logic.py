# Pure firmware logic: every case runs under CPython (pytest) and under the real
# micropython with an ESP32-sized heap (tests/test_firmware_logic.py).
import json

from sense import config, payload, policy, timefmt
from sense import ds18b20 as ds


def case_crc8_maxim_an27_vector():
    # Maxim application note 27: ROM 02 1C B8 01 00 00 00 has CRC A2
    assert ds.crc8(bytes([0x02, 0x1C, 0xB8, 0x01, 0x00, 0x00, 0x00])) == 0xA2
    assert ds.rom_ok(bytes([0x28, 1, 2, 3, 4, 5, 6, ds.crc8(bytes([0x28, 1, 2, 3, 4, 5, 6]))]))
    assert not ds.rom_ok(bytes([0x28, 1, 2, 3, 4, 5, 6, 0]))


def case_decode_datasheet_table1():
    # datasheet table 1: temperature/data relationship
    for raw, deg in (
        (0x07D0, 125.0),
        (0x0191, 25.0625),
        (0x00A2, 10.125),
        (0x0008, 0.5),
        (0x0000, 0.0),
        (0xFFF8, -0.5),
        (0xFF5E, -10.125),
        (0xFE6F, -25.0625),
        (0xFC90, -55.0),
    ):
        sp = ds.encode(deg)
        assert sp[0] | sp[1] << 8 == raw, (deg, sp)
        assert ds.decode(sp) == (ds.OK, deg), (deg, ds.decode(sp))


def case_power_on_85_rejected_but_real_85_kept():
    sp = ds.encode(85.0, byte6=0x0C)
    assert ds.decode(sp) == (ds.POWER_ON, None)
    assert ds.decode(ds.encode(85.0)) == (ds.OK, 85.0)  # a real 85 has byte 6 = 0x10


def case_all_zero_and_absent_and_crc():
    assert ds.decode(bytes(9)) == (ds.ZERO, None)
    assert ds.decode(None) == (ds.ABSENT, None)
    assert ds.decode(b"\xff" * 9)[0] == ds.CRC  # bus pulled high, nobody answering
    sp = bytearray(ds.encode(4.5))
    sp[0] ^= 1
    assert ds.decode(sp) == (ds.CRC, None)


def case_resolution_masks_undefined_bits_and_conv_time():
    sp = bytearray(ds.encode(4.5, bits=9))
    sp[0] |= 7  # bits 2..0 undefined at 9 bit
    sp[8] = ds.crc8(sp, 8)
    assert ds.decode(sp) == (ds.OK, 4.5)
    assert [ds.conv_ms(b) for b in (9, 10, 11, 12)] == [94, 188, 375, 750]


def case_retries_at_most_three_and_count_errors():
    good = ds.encode(3.25)
    bad = bytearray(good)
    bad[2] ^= 0xFF
    seq = [bytes(bad), bytes(bad), good]
    calls = []

    def rd(rom):
        calls.append(rom)
        return seq[len(calls) - 1]

    errs = {}
    assert ds.read(rd, b"r", errs) == (ds.OK, 3.25) and len(calls) == 3 and errs == {}
    calls.clear()
    seq = [bytes(bad)] * 5
    assert ds.read(rd, b"r", errs) == (ds.CRC, None) and len(calls) == 3
    assert errs == {b"r": 1}
    calls.clear()
    seq = [None] * 5
    assert ds.read(rd, b"r", errs) == (ds.ABSENT, None) and len(calls) == 1
    assert errs == {b"r": 2}

    def oserr(rom):
        raise OSError(5)

    assert ds.read(oserr, b"x", errs)[0] == ds.ABSENT and errs[b"x"] == 1


def case_backoff_doubles_caps_and_jitters():
    assert policy.backoff_ms(0, 0) == 500 and policy.backoff_ms(0, 65535) == 1000
    assert policy.backoff_ms(3, 65535) == 8000
    assert policy.backoff_ms(30, 65535) == 60000 and policy.backoff_ms(30, 0) == 30000
    vals = set(policy.backoff_ms(5, r) for r in range(0, 65536, 4096))
    assert len(vals) > 10  # jitter spreads nodes out


def case_http_retry_rule():
    assert policy.http_retry(200) == 0
    assert policy.http_retry(429, 7) == 7000
    # Retry-After within the contract's bounds, as the gateway reads it (the old
    # firmware waited 60 s for a "0" and 27 h for a "99999")
    assert policy.http_retry(429) == 60000
    assert policy.http_retry(429, 0) == 1000 and policy.http_retry(429, 99999) == 3600000
    assert policy.http_retry(401) == -1 and policy.http_retry(422) == -1
    assert policy.http_retry(503) is None


def case_reboot_ladder_each_rung_once():
    assert policy.ladder_step(100, 0) == 0
    assert policy.ladder_step(900, 0) == policy.WIFI_RESTART
    assert policy.ladder_step(1000, policy.WIFI_RESTART) == 0
    assert policy.ladder_step(3600, policy.WIFI_RESTART) == policy.RESET
    assert policy.ladder_step(4000, 0) == policy.RESET


def case_bootloop_and_batches_and_cadence():
    assert not policy.safe_mode(4) and policy.safe_mode(5)
    b = policy.batches(list(range(70)))
    assert [len(x) for x in b] == [32, 32, 6]
    assert policy.cadence_ok(60) and not policy.cadence_ok(5) and not policy.cadence_ok(True)
    assert not policy.cadence_ok(60.5)


def case_rfc3339():
    assert timefmt.rfc3339(0) == "1970-01-01T00:00:00Z"
    assert timefmt.rfc3339(951782400) == "2000-02-29T00:00:00Z"
    assert timefmt.rfc3339(1795512896) == "2026-11-24T09:34:56Z"
    assert timefmt.rfc3339(4107542399) == "2100-02-28T23:59:59Z"
    assert not timefmt.known(5) and timefmt.known(1795512896)


def case_payload_shape():
    chans = [["temperature", "front", "°C"], ["signal", "wifi", "dBm"]]
    recs = [[7, 1795512896, 3, 0, [(0, 4.0625), (1, -61.0)]]]
    d = json.loads(payload.body(recs, chans, "fridge01"))
    assert d["device"] == "fridge01"
    assert d["measurements"][0] == {
        "type": "temperature",
        "value": 4.0625,
        "label": "front",
        "unit": "°C",
        "ts": "2026-11-24T09:34:56Z",
        "seq": 7,
    }
    assert d["measurements"][1]["type"] == "signal"


def case_wifi_step_connects_once_and_retries_only_after_a_failure_or_timeout():
    # network.WLAN status codes of the ESP32 port; micropython#17661
    W = policy
    assert W.wifi_step(None, 0) == W.WIFI_RETRY  # no attempt yet: start one
    assert W.wifi_step(W.STAT_CONNECTING, 0) == W.WIFI_WAIT
    assert W.wifi_step(W.STAT_CONNECTING, W.WIFI_TIMEOUT_MS - 1) == W.WIFI_WAIT
    assert W.wifi_step(W.STAT_CONNECTING, W.WIFI_TIMEOUT_MS) == W.WIFI_RETRY
    assert W.wifi_step(W.STAT_GOT_IP, 10**9) == W.WIFI_UP
    for failed in (200, 201, 202, 203, 204, W.STAT_IDLE, -1):
        assert W.wifi_step(failed, 0) == W.WIFI_RETRY, failed


def case_err_code_reads_the_error_envelope_and_never_raises():
    env = {"error": {"code": "out_of_range", "message": "in the future", "request_id": "req_1"}}
    assert policy.err_code(json.dumps(env).encode()) == "out_of_range"
    for bad in (b"", b"not json", b"[]", b'{"error": null}', b'{"error": {"code": 5}}', b"\xff"):
        assert policy.err_code(bad) == "unknown", bad


def case_bus_roms_keeps_only_ds18b20s_with_a_good_crc_and_bounds_the_count():
    good = bytes([0x28, 1, 2, 3, 4, 5, 6])
    good += bytes([ds.crc8(good)])
    other = bytes([0x10, 1, 2, 3, 4, 5, 6])  # DS18S20: another family
    other += bytes([ds.crc8(other)])
    found, bad = ds.bus_roms([bytes(8)] * 255 + [good, good, other, good[:7] + b"\x00"])
    assert found == [good] and bad == 255 + 1 + 1 + 1  # zeros, a duplicate, family, CRC
    many = []
    for i in range(40):
        r = bytes([0x28, i, 0, 0, 0, 0, 0])
        many.append(r + bytes([ds.crc8(r)]))
    found, bad = ds.bus_roms(many)
    assert len(found) == ds.MAX_SCAN and bad == 40 - ds.MAX_SCAN
    assert ds.config_byte(9) == 0x1F and ds.config_byte(12) == 0x7F  # datasheet fig. 10


def case_unknown_config_keys_are_named():
    cfg = {
        "wifi": {"ssid": "s", "pasword": "x"},
        "server": {"host": "h", "port": 1},
        "cadance": 60,
        "cadence": 60,
        "probes": {"28ff4a1b2c3d045a": {"label": "a", "ofset": 1}},
    }
    got = config.unknown_keys(cfg)
    assert len(got) == 4, got
    assert got[0].startswith("cadance: not a config key"), got
    assert [g.split(":")[0] for g in got[1:]] == [
        "wifi.pasword",
        "server.port",
        "probes.28ff4a1b2c3d045a.ofset",
    ], got
    assert config.unknown_keys({"wifi": {"ssid": "s"}, "batch": 5, "probes": {}}) == []
