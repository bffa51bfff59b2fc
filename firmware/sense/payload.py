# The ingest payload from queue records (pure). MQTT: without the device key;
# HTTP: the same body plus the device key (the contract's names: sense.contract).
import json

from sense import contract as C
from sense.timefmt import rfc3339


def measurements(recs, chans):
    # recs: [seq, unix time, boot, flags, [(chan, value)...]] with a known time
    out = []
    for seq, t, _boot, _flags, vals in recs:
        ts = rfc3339(t)
        for c, v in vals:
            kind, label, unit = chans[c]
            m = {C.KEY_TYPE: kind, C.KEY_VALUE: round(v, 4), C.KEY_TS: ts, C.KEY_SEQ: seq}
            if label:
                m[C.KEY_LABEL] = label
            if unit:
                m[C.KEY_UNIT] = unit
            out.append(m)
    return out


def body(recs, chans, device=None):
    d = {C.KEY_MEASUREMENTS: measurements(recs, chans)}
    if device:
        d[C.KEY_DEVICE] = device
    return json.dumps(d)
