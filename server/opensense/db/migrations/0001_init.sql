-- OpenSense schema, version 1. Ids carry a type prefix (acc_, site_, dev_, chn_ ...).
-- Measurements use a small internal channel number (int4) to keep each stored
-- reading compact; everything outside storage speaks the prefixed ids.

CREATE TABLE accounts (
    id          text PRIMARY KEY CHECK (id LIKE 'acc\_%'),
    name        text NOT NULL,
    email       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sites (
    id                text PRIMARY KEY CHECK (id LIKE 'site\_%'),
    account_id        text NOT NULL REFERENCES accounts(id),
    name              text NOT NULL,
    address           text NOT NULL DEFAULT '',
    timezone          text NOT NULL DEFAULT 'UTC',
    vertical          text NOT NULL,
    opening_hours     jsonb NOT NULL DEFAULT '{}',
    report_options    jsonb NOT NULL DEFAULT '{}',
    report_recipients jsonb NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sites_account ON sites (account_id);

CREATE TABLE devices (
    id            text PRIMARY KEY CHECK (id LIKE 'dev\_%'),
    account_id    text NOT NULL REFERENCES accounts(id),
    site_id       text NOT NULL REFERENCES sites(id),
    local_id      text NOT NULL,
    name          text NOT NULL,
    model         text NOT NULL DEFAULT 'diy_esp32',
    fw_version    text,
    dev_eui       text,
    cadence_s     integer NOT NULL DEFAULT 60 CHECK (cadence_s > 0),
    last_seen_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz
);
-- local_id is unique among an account's live devices; a deleted device frees it.
CREATE UNIQUE INDEX devices_local_id ON devices (account_id, local_id) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX devices_dev_eui ON devices (dev_eui) WHERE deleted_at IS NULL AND dev_eui IS NOT NULL;

-- Where a device stood, and from when. A move adds a row; history is never rewritten.
CREATE TABLE device_placements (
    device_id       text NOT NULL REFERENCES devices(id),
    site_id         text NOT NULL REFERENCES sites(id),
    effective_from  timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, effective_from)
);

-- Sensor and channel are merged (docs/product.md#nouns): a channel row carries its
-- sensor id too, so both snr_ and chn_ ids resolve.
CREATE TABLE channels (
    id          text PRIMARY KEY CHECK (id LIKE 'chn\_%'),
    sensor_id   text NOT NULL UNIQUE CHECK (sensor_id LIKE 'snr\_%'),
    num         integer GENERATED ALWAYS AS IDENTITY UNIQUE,
    account_id  text NOT NULL REFERENCES accounts(id),
    device_id   text NOT NULL REFERENCES devices(id),
    kind        text NOT NULL,
    label       text NOT NULL DEFAULT '',
    unit        text NOT NULL,
    name        text NOT NULL,
    "offset"    double precision NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, kind, label)
);
CREATE INDEX channels_account ON channels (account_id);

-- Calibration record: every offset a channel has had, and from when.
CREATE TABLE channel_offsets (
    channel_id      text NOT NULL REFERENCES channels(id),
    "offset"        double precision NOT NULL,
    effective_from  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, effective_from)
);

CREATE TABLE rules (
    id          text PRIMARY KEY CHECK (id LIKE 'rul\_%'),
    channel_id  text NOT NULL REFERENCES channels(id),
    kind        text NOT NULL,
    params      jsonb NOT NULL DEFAULT '{}',
    grace_min   integer NOT NULL DEFAULT 0 CHECK (grace_min >= 0),
    severity    text NOT NULL DEFAULT 'alarm',
    enabled     boolean NOT NULL DEFAULT true,
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rules_channel ON rules (channel_id);

-- All secrets: ds_live_ (device ingest), ua_live_ (management API), whk_ (inbound
-- webhooks). The token text is <prefix><key_id>_<secret>; key_id finds the row, the
-- bcrypt hash checks the secret. Rotation revokes the row; the next request sees it.
CREATE TABLE tokens (
    id            text PRIMARY KEY CHECK (id LIKE 'tok\_%'),
    kind          text NOT NULL CHECK (kind IN ('ds_live', 'ua_live', 'whk')),
    key_id        text NOT NULL UNIQUE,
    hash          text NOT NULL,
    account_id    text NOT NULL REFERENCES accounts(id),
    device_id     text REFERENCES devices(id),
    name          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CHECK ((kind = 'ds_live') = (device_id IS NOT NULL))
);
CREATE INDEX tokens_device ON tokens (device_id) WHERE revoked_at IS NULL;

CREATE TABLE idempotency_keys (
    device_id    text NOT NULL,
    key          text NOT NULL,
    body_sha256  bytea NOT NULL,
    response     jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (device_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Fixed one-window counters shared by every server process. Unlogged: losing the
-- counts in a database crash only forgives a minute of rate limiting.
CREATE UNLOGGED TABLE rate_counters (
    key           text NOT NULL,
    window_start  timestamptz NOT NULL,
    count         integer NOT NULL,
    PRIMARY KEY (key, window_start)
);

CREATE TABLE request_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts           timestamptz NOT NULL,
    request_id   text NOT NULL,
    method       text NOT NULL,
    path         text NOT NULL,          -- query string with secrets redacted
    status       integer NOT NULL,
    code         text,                   -- error code, when it failed
    reason       text,                   -- error message, when it failed
    account_id   text,
    device_id    text,
    duration_ms  real NOT NULL
);
CREATE INDEX request_log_ts ON request_log (ts);
CREATE INDEX request_log_device ON request_log (device_id, ts) WHERE device_id IS NOT NULL;

-- LoRaWAN uplinks from a dev_eui no device claims yet.
CREATE TABLE unassigned_uplinks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts(id),
    dev_eui      text NOT NULL,
    received_at  timestamptz NOT NULL,
    payload      jsonb NOT NULL
);

-- Scheduled jobs: a run is claimed by moving next_run_at forward in one UPDATE,
-- so with any number of server processes each run happens once.
CREATE TABLE jobs (
    name          text PRIMARY KEY,
    next_run_at   timestamptz NOT NULL,
    last_run_at   timestamptz,
    last_status   text,
    last_detail   text
);

-- Readings. Monthly range partitions; one row per (channel, ts), so a resent
-- reading is never stored twice. Whole UTC days older than compact_after_days move
-- into measurements_packed.
CREATE TABLE measurements (
    channel_num  integer NOT NULL,
    ts           timestamptz NOT NULL,
    value        double precision NOT NULL,
    PRIMARY KEY (channel_num, ts)
) PARTITION BY RANGE (ts);

-- One row per channel and UTC day: timestamps and values as compressed arrays
-- (opensense.storage.packing). The day's readings live either here or in
-- measurements, never in both.
CREATE TABLE measurements_packed (
    channel_num  integer NOT NULL,
    day          date NOT NULL,
    n            integer NOT NULL,
    blob         bytea NOT NULL,
    PRIMARY KEY (channel_num, day)
) PARTITION BY RANGE (day);

-- Rollups kept current in the same transaction as the readings they summarise.
CREATE TABLE rollup_5m (
    channel_num  integer NOT NULL,
    bucket       timestamptz NOT NULL,
    vmin         double precision NOT NULL,
    vmax         double precision NOT NULL,
    vsum         double precision NOT NULL,
    n            integer NOT NULL,
    PRIMARY KEY (channel_num, bucket)
) PARTITION BY RANGE (bucket);

CREATE TABLE rollup_1h (
    channel_num  integer NOT NULL,
    bucket       timestamptz NOT NULL,
    vmin         double precision NOT NULL,
    vmax         double precision NOT NULL,
    vsum         double precision NOT NULL,
    n            integer NOT NULL,
    PRIMARY KEY (channel_num, bucket)
) PARTITION BY RANGE (bucket);

-- 1-day rollups (UTC days) are kept forever and are small: not partitioned.
CREATE TABLE rollup_1d (
    channel_num  integer NOT NULL,
    bucket       timestamptz NOT NULL,
    vmin         double precision NOT NULL,
    vmax         double precision NOT NULL,
    vsum         double precision NOT NULL,
    n            integer NOT NULL,
    PRIMARY KEY (channel_num, bucket)
);
