-- The remaining nouns of docs/product.md#nouns: alarm events and report jobs. Their behaviour
-- (the rule engine, rendering) arrives with the alarms and reports work; the rows
-- are defined here so every noun has its table and prefixed id.

-- An alarm's life: grace -> alarm -> acknowledged -> cleared. Kept forever.
CREATE TABLE events (
    id               text PRIMARY KEY CHECK (id LIKE 'evt\_%'),
    account_id       text NOT NULL REFERENCES accounts(id),
    channel_id       text NOT NULL REFERENCES channels(id),
    rule_id          text REFERENCES rules(id),
    kind             text NOT NULL,            -- rule kind, or device_offline
    severity         text NOT NULL DEFAULT 'alarm',
    state            text NOT NULL CHECK (state IN ('grace', 'alarm', 'acknowledged', 'cleared')),
    started_at       timestamptz NOT NULL,     -- first reading out of range (true time)
    alarm_at         timestamptz,              -- grace elapsed
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    ack_note         text,
    cleared_at       timestamptz,
    cleared_by       text,
    clear_note       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_channel ON events (channel_id, started_at);
CREATE INDEX events_open ON events (account_id) WHERE state <> 'cleared';

-- A rendered-report job: queued -> ready (or failed). PDFs are regenerated on demand.
CREATE TABLE reports (
    id           text PRIMARY KEY CHECK (id LIKE 'rpt\_%'),
    account_id   text NOT NULL REFERENCES accounts(id),
    site_id      text NOT NULL REFERENCES sites(id),
    template     text NOT NULL,
    period_from  date NOT NULL,
    period_to    date NOT NULL,               -- inclusive, in the site's time zone
    language     text NOT NULL DEFAULT 'en',
    status       text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'ready', 'failed')),
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    ready_at     timestamptz,
    CHECK (period_from <= period_to)
);
CREATE INDEX reports_account ON reports (account_id, created_at);
