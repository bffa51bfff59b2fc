# DS18B20 scratchpad decoding, pure (no I/O). Maxim DS18B20 datasheet rev. 6 (2019).
#
# Scratchpad (datasheet fig. 9): 0 temp LSB, 1 temp MSB, 2 TH, 3 TL, 4 config,
# 5 reserved (0xFF), 6 reserved (0x0C at power-on, changes with the temperature
# on real parts), 7 reserved (0x10), 8 CRC of bytes 0..7.

POWER_ON_RAW = 0x0550  # +85 degC, the power-on reset value of the temperature register
# Conversion time per resolution (datasheet table 2, max tCONV): 9..12 bit
CONV_MS = {9: 94, 10: 188, 11: 375, 12: 750}
MAX_TRIES = 3  # a bad CRC is read again, at most 3 times in all

OK = 0
ABSENT = 1  # no presence pulse / not on the bus
CRC = 2  # CRC mismatch on every try
POWER_ON = 3  # 85 degC with byte 6 = 0x0C: a conversion never ran (brown-out, no strong pull-up)
ZERO = 4  # all-zero scratchpad: a shorted data line reads as 0x00
FAULTS = ("ok", "absent", "crc", "power_on", "zero")


def crc8(data, n=None):
    # Dallas/Maxim CRC8, polynomial x^8 + x^5 + x^4 + 1 (reflected 0x8C), datasheet fig. 11
    crc = 0
    for i in range(len(data) if n is None else n):
        b = data[i]
        for _ in range(8):
            mix = (crc ^ b) & 1
            crc >>= 1
            if mix:
                crc ^= 0x8C
            b >>= 1
    return crc


def conv_ms(bits):
    # config register R1:R0 -> resolution; table 2 gives the worst case per resolution
    return CONV_MS[bits]


def resolution(sp):
    # config byte 4: 0 R1 R0 1 1 1 1 1
    return 9 + ((sp[4] >> 5) & 3)


def decode(sp):
    # (status, degrees C or None) of one 9-byte scratchpad
    if sp is None or len(sp) != 9:
        return ABSENT, None
    z = 0
    for b in sp:
        z |= b
    if z == 0:
        return ZERO, None  # the CRC of nine zeros is 0 too: it must be caught before the CRC
    if crc8(sp, 8) != sp[8]:
        return CRC, None
    raw = sp[0] | (sp[1] << 8)
    if raw & 0x8000:
        raw -= 0x10000  # two's complement, sign-extended (datasheet table 1)
    if raw == POWER_ON_RAW and sp[6] == 0x0C:
        return POWER_ON, None
    # undefined low bits at lower resolutions (datasheet: "bits 2,1,0 undefined at 9 bit")
    bits = resolution(sp)
    raw &= ~((1 << (12 - bits)) - 1)
    return OK, raw / 16


def encode(deg, bits=12, byte6=None):
    # A valid scratchpad for `deg` (the simulated probe and the tests use it)
    raw = int(round(deg * 16)) & 0xFFFF
    sp = bytearray(9)
    sp[0] = raw & 0xFF
    sp[1] = raw >> 8
    sp[2] = 0x4B
    sp[3] = 0x46
    sp[4] = 0x1F | ((bits - 9) << 5)
    sp[5] = 0xFF
    sp[6] = (0x10 - (raw & 0x0F)) if byte6 is None else byte6
    sp[7] = 0x10
    sp[8] = crc8(sp, 8)
    return sp


def read(read_scratch, rom, errors=None, tries=MAX_TRIES):
    # Read one probe with CRC retries. read_scratch(rom) -> 9 bytes or None (absent).
    # Returns (status, value); errors is a dict rom->count of failed reads.
    st = ABSENT
    for _ in range(tries):
        try:
            sp = read_scratch(rom)
        except OSError:
            sp = None
        st, v = decode(sp)
        if st == OK:
            return st, v
        if st != CRC:
            break  # absent, 85 degC and zero are not noise: another read says the same
    if errors is not None:
        errors[rom] = errors.get(rom, 0) + 1
    return st, None


def rom_hex(rom):
    return "".join("%02x" % b for b in rom)


def rom_ok(rom):
    # family 0x28 = DS18B20, ROM CRC in byte 7 (datasheet "64-bit lasered ROM code")
    return len(rom) == 8 and rom[0] == 0x28 and crc8(rom, 7) == rom[7]


FAMILY = 0x28  # DS18B20 family code (datasheet: 64-bit lasered ROM code)
MAX_SCAN = 16  # ROMs kept from one search: twice the probes a node takes


def bus_roms(found, limit=MAX_SCAN):
    # -> (DS18B20 ROMs, rejected count) from a 1-Wire search. A ROM is kept only with
    # a good CRC and the DS18B20 family code: a shorted or noisy data line makes the
    # search "find" up to 255 fake devices (all-zero ROMs pass the CRC, hence the family
    # check); at most `limit` are kept, so nothing holds the heap for good (issue 17).
    out = []
    bad = 0
    for rom in found:
        if rom_ok(rom) and rom not in out and len(out) < limit:
            out.append(bytes(rom))
        else:
            bad += 1
    return out, bad


def config_byte(bits):
    # configuration register (datasheet fig. 10): R1 R0 in bits 6..5, the rest 1s
    return 0x1F | ((bits - 9) << 5)
