# The docs/product.md#ingest payload from queue records (pure). MQTT: without "device";
# HTTP: the same body plus "device".
import json
from sense.timefmt import rfc3339


def measurements(recs, chans):
    # recs: [seq, unix time, boot, flags, [(chan, value)...]] with a known time
    out = []
    for seq, t, _boot, _flags, vals in recs:
        ts = rfc3339(t)
        for c, v in vals:
            kind, label, unit = chans[c]
            m = {"type": kind, "value": round(v, 4), "ts": ts, "seq": seq}
            if label:
                m["label"] = label
            if unit:
                m["unit"] = unit
            out.append(m)
    return out


def body(recs, chans, device=None):
    d = {"measurements": measurements(recs, chans)}
    if device:
        d["device"] = device
    return json.dumps(d)
