-- Site gateways (issue 5): a gateway forwards a whole site's readings with its own
-- gw_ token, scoped to one site.

-- A fourth token kind. gw_ tokens belong to a gateway, not to a device.
ALTER TABLE tokens DROP CONSTRAINT tokens_kind_check;
ALTER TABLE tokens ADD CONSTRAINT tokens_kind_check
  CHECK (kind IN ('ds_live', 'ua_live', 'whk', 'gw'));
-- A second hash of a device token, made when the plaintext is known (creation,
-- rotation): PBKDF2-SHA512 in Mosquitto's password-file form ($7$iterations$salt$hash).
-- The site gateway writes it into its Mosquitto's password_file and checks HTTP
-- posts with it (stdlib hashlib). NULL for tokens made before this migration: rotate
-- the token to use the device in site mode.
ALTER TABLE tokens ADD COLUMN site_hash text;
ALTER TABLE tokens ADD COLUMN gateway_id text;

CREATE TABLE gateways (
    id            text PRIMARY KEY CHECK (id LIKE 'gw\_%'),
    account_id    text NOT NULL REFERENCES accounts(id),
    site_id       text NOT NULL REFERENCES sites(id),
    name          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz,
    -- queue_depth, oldest_unsent_s, uplink, last_sync, dead_letters, as last posted
    health        jsonb NOT NULL DEFAULT '{}',
    deleted_at    timestamptz
);
CREATE INDEX gateways_account ON gateways (account_id);
CREATE INDEX tokens_gateway ON tokens (gateway_id) WHERE gateway_id IS NOT NULL;

-- Which gateway carried which readings: one row per forwarded batch and device,
-- with the batch's time span for that device (cheap: ~1 row per 1,000 readings).
-- A reading (channel of device D, ts) came through gateway G when a row of G for D
-- covers ts.
CREATE TABLE gateway_batches (
    gateway_id   text NOT NULL REFERENCES gateways(id),
    batch_id     text NOT NULL,
    device_id    text NOT NULL REFERENCES devices(id),
    n            integer NOT NULL,
    accepted     integer NOT NULL,
    ts_from      timestamptz NOT NULL,
    ts_to        timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, batch_id, device_id)
);
CREATE INDEX gateway_batches_device ON gateway_batches (device_id, ts_from);

-- Alarms the gateway raised on its own while the server was unreachable. Posted
-- before the gateway drains its backlog, so the server's rule engine can skip the
-- notification of an event a local alert already covered (same channel,
-- overlapping time).
CREATE TABLE local_alerts (
    id           bigserial PRIMARY KEY,
    gateway_id   text NOT NULL REFERENCES gateways(id),
    channel_id   text REFERENCES channels(id),
    rule_id      text,
    opened_at    timestamptz NOT NULL,   -- true time of the local alarm
    notified_at  timestamptz NOT NULL,
    path         text NOT NULL,          -- 'smtp' | 'hook' | 'gpio'
    cleared_at   timestamptz,
    ref          text NOT NULL,          -- the gateway's own id of the alert (resends)
    device_id    text,
    kind         text,
    label        text,
    received_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (gateway_id, ref)
);
CREATE INDEX local_alerts_channel ON local_alerts (channel_id, opened_at);
