-- Alarms and notifications: rule engine state, the outbox, the outbound log.

-- Rules gain time windows, a clear delay (NULL: same as grace) and re-notification.
ALTER TABLE rules ADD COLUMN windows jsonb NOT NULL DEFAULT '[]';
ALTER TABLE rules ADD COLUMN clear_min integer CHECK (clear_min >= 0);
ALTER TABLE rules ADD COLUMN renotify_min integer CHECK (renotify_min > 0);

ALTER TABLE events ADD COLUMN value double precision;       -- worst value of the excursion
ALTER TABLE events ADD COLUMN ack_cause text;
ALTER TABLE events ADD COLUMN ack_action text;
ALTER TABLE events ADD COLUMN ack_product text;              -- what happened to the product
ALTER TABLE events ADD COLUMN renotified_at timestamptz;
ALTER TABLE events ADD COLUMN device_id text REFERENCES devices(id);
CREATE UNIQUE INDEX events_rule_start ON events (rule_id, started_at) WHERE rule_id IS NOT NULL;

-- Engine state per channel: one JSON state per rule, checkpoints to rewind to when
-- late readings arrive, and when the sweep must next look (grace ending, a gap).
-- The row lock is the "one evaluator per channel" guarantee.
CREATE TABLE alarm_state (
    channel_num  integer PRIMARY KEY,
    channel_id   text NOT NULL UNIQUE REFERENCES channels(id),
    status       text NOT NULL DEFAULT 'ok',
    rules        jsonb NOT NULL DEFAULT '{}',   -- rule id -> RuleState JSON
    events       jsonb NOT NULL DEFAULT '{}',   -- rule id -> open event id
    checkpoints  jsonb NOT NULL DEFAULT '[]',   -- [[last_ts, rules], ...] oldest first
    last_ts      timestamptz,
    due_at       timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alarm_state_due ON alarm_state (due_at) WHERE due_at IS NOT NULL;

-- Channels with readings the engine has not judged yet, written in the same
-- statement as the readings (so a crash loses no wake-up), with the earliest new
-- timestamp. A statement trigger wakes the evaluators (NOTIFY is sent at commit).
CREATE TABLE alarm_dirty (
    channel_num  integer PRIMARY KEY,
    since        timestamptz NOT NULL,
    marked_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION alarm_dirty_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('opensense_alarm_dirty', '');
  RETURN NULL;
END $$;
CREATE TRIGGER alarm_dirty_notify AFTER INSERT OR UPDATE ON alarm_dirty
  FOR EACH STATEMENT EXECUTE FUNCTION alarm_dirty_notify();

-- A device's connectivity (device_offline / device_online).
CREATE TABLE device_alarm_state (
    device_id      text PRIMARY KEY REFERENCES devices(id),
    offline_since  timestamptz,
    event_id       text
);

-- Where notifications go. telegram: address = chat id; email: address; webhook: URL
-- with a signing secret. roles decide escalation: shift (on shift in opening hours),
-- out_of_hours (on call outside them), manager; everyone gets the last step.
CREATE TABLE notify_targets (
    id           text PRIMARY KEY CHECK (id LIKE 'tgt\_%'),
    account_id   text NOT NULL REFERENCES accounts(id),
    site_id      text REFERENCES sites(id),           -- NULL: all the account's sites
    path         text NOT NULL CHECK (path IN ('telegram', 'email', 'webhook')),
    address      text NOT NULL,
    name         text NOT NULL DEFAULT '',
    roles        jsonb NOT NULL DEFAULT '[]',
    secret       text,                                 -- webhook signing secret
    verified     boolean NOT NULL DEFAULT false,      -- email: double opt-in confirmed
    token        text UNIQUE,                          -- email: confirm / unsubscribe link
    created_at   timestamptz NOT NULL DEFAULT now(),
    deleted_at   timestamptz
);
CREATE INDEX notify_targets_account ON notify_targets (account_id) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX notify_targets_unique ON notify_targets (account_id, path, address)
  WHERE deleted_at IS NULL;

-- One-time codes that link a Telegram chat (or group) to an account.
CREATE TABLE telegram_link_codes (
    code        text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts(id),
    site_id     text REFERENCES sites(id),
    roles       jsonb NOT NULL DEFAULT '[]',
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);

-- Escalation per site: [{"delay_min": 0, "to": "on_shift"}, {"delay_min": 15, "to":
-- "manager"}, {"delay_min": 30, "to": "everyone"}]; an acknowledgement stops it.
CREATE TABLE escalation_policies (
    site_id     text PRIMARY KEY REFERENCES sites(id),
    steps       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Silence windows: notifications only (the alarm still shows and is reported).
CREATE TABLE silences (
    id          text PRIMARY KEY CHECK (id LIKE 'sil\_%'),
    account_id  text NOT NULL REFERENCES accounts(id),
    site_id     text REFERENCES sites(id),
    channel_id  text REFERENCES channels(id),
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    opened_sent boolean NOT NULL DEFAULT false,   -- silence_opened webhook queued
    closed_sent boolean NOT NULL DEFAULT false,   -- silence_closed webhook queued
    CHECK (starts_at < ends_at)
);
CREATE INDEX silences_account ON silences (account_id, ends_at);

-- The durable outbox. dedupe_key makes "one message per event, kind, step and
-- recipient" a database fact; senders claim rows with FOR UPDATE SKIP LOCKED.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    account_id   text NOT NULL,
    target_id    text NOT NULL REFERENCES notify_targets(id),
    event_id     text,
    kind         text NOT NULL,
    dedupe_key   text NOT NULL UNIQUE,
    payload      jsonb NOT NULL,
    due_at       timestamptz NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'sent', 'failed', 'dropped', 'cancelled', 'silenced', 'digested', 'local')),
                 -- local: people were alerted by the site gateway already (local_alerts)
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);
CREATE INDEX outbox_due ON outbox (due_at) WHERE status = 'pending';
CREATE INDEX outbox_event ON outbox (event_id) WHERE event_id IS NOT NULL;
ALTER TABLE outbox ADD COLUMN channel_id text;
-- the per-channel minimum interval looks up the last alarm a recipient got for a channel
CREATE INDEX outbox_recent ON outbox (target_id, channel_id, sent_at)
  WHERE status IN ('sent', 'digested') AND kind = 'alarm_opened';

-- Pacing per recipient (Telegram 1 message / 10 s per chat; email 10 / hour).
CREATE TABLE target_pacing (
    target_id     text PRIMARY KEY,
    window_start  timestamptz NOT NULL,
    sent          integer NOT NULL DEFAULT 0,
    last_sent_at  timestamptz
);

-- Every delivery attempt (contract table; the status branch reads it). 90 days.
CREATE TABLE outbound_log (
    id          bigserial PRIMARY KEY,
    account_id  text,
    path        text NOT NULL,
    target      text NOT NULL,
    event_id    text NULL,
    kind        text NOT NULL,
    status      text NOT NULL,
    code        int NULL,
    error       text NULL,
    attempt     int NOT NULL DEFAULT 1,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbound_log_path_at ON outbound_log (path, at);
CREATE INDEX outbound_log_account_at ON outbound_log (account_id, at);

-- A dispatch path failing for more than 5 minutes, reported once through the others.
CREATE TABLE path_incidents (
    path        text NOT NULL,
    opened_at   timestamptz NOT NULL,
    closed_at   timestamptz,
    PRIMARY KEY (path, opened_at)
);
