# RFC 3339 from Unix seconds without time.gmtime: the ESP32 port's epoch is 2000 and
# the unix port's is 1970, so the conversion is done here once, the same on both.


def _civil(days):
    # days since 1970-01-01 -> (y, m, d); Howard Hinnant's civil_from_days
    days += 719468
    era = (days if days >= 0 else days - 146096) // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def rfc3339(t):
    t = int(t)
    days, s = divmod(t, 86400)
    y, m, d = _civil(days)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (y, m, d, s // 3600, s // 60 % 60, s % 60)


# A time before this is not a real clock (an ESP32 RTC starts at 2000-01-01)
VALID_AFTER = 1704067200  # 2024-01-01T00:00:00Z


def known(t):
    return t >= VALID_AFTER
