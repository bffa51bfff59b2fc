-- Status page, self-watching and incidents (docs/status.md).
-- Every server process contributes; any process answers the same snapshot.

-- One row per live server process: its heartbeat and what its components reported
-- into the health registry (opensense.status.health).
CREATE TABLE status_processes (
    process     text PRIMARY KEY,
    role        text NOT NULL DEFAULT 'all',   -- OPENSENSE_ROLE: all, or status only
    started_at  timestamptz NOT NULL,
    seen_at     timestamptz NOT NULL,
    health      jsonb NOT NULL DEFAULT '{}'
);

-- Ingest answers per minute and process: requests, 5xx, latency histogram counts per
-- bucket of opensense.status.observe.LATENCY_BUCKETS (last entry: above the last bound).
CREATE TABLE status_minutes (
    minute           timestamptz NOT NULL,
    process          text NOT NULL,
    ingest_requests  integer NOT NULL DEFAULT 0,
    ingest_5xx       integer NOT NULL DEFAULT 0,
    ingest_latency   integer[] NOT NULL,
    PRIMARY KEY (minute, process)
);

-- One sample per tick (claimed by one process): the figures the conditions read and
-- the state of every component. Kept a day; the days below keep the bars.
CREATE TABLE status_samples (
    at       timestamptz PRIMARY KEY,
    figures  jsonb NOT NULL,
    states   jsonb NOT NULL
);

-- The 90-day uptime bars: per component and UTC day, how many samples saw each state.
CREATE TABLE status_days (
    component    text NOT NULL,
    day          date NOT NULL,
    operational  integer NOT NULL DEFAULT 0,
    degraded     integer NOT NULL DEFAULT 0,
    outage       integer NOT NULL DEFAULT 0,
    unknown      integer NOT NULL DEFAULT 0,
    PRIMARY KEY (component, day)
);

-- monitoring_since: a backup is "too old" also when none was ever made since then.
CREATE TABLE status_meta (
    key  text PRIMARY KEY,
    at   timestamptz NOT NULL
);

-- Incidents, classes of docs/product.md#incident-classes (P0/P1/P2).
CREATE TABLE incidents (
    id                 text PRIMARY KEY CHECK (id LIKE 'inc\_%'),
    class              text NOT NULL CHECK (class IN ('P0', 'P1', 'P2')),
    title              text NOT NULL,
    condition          text,              -- the self-watching condition that opened it
    component          text,
    status             text NOT NULL DEFAULT 'investigating'
                       CHECK (status IN ('investigating', 'identified', 'monitoring', 'resolved')),
    opened_at          timestamptz NOT NULL,
    opened_by          text NOT NULL,
    acknowledged_at    timestamptz,
    acknowledged_by    text,
    resolved_at        timestamptz,
    resolved_by        text,
    postmortem         text,
    postmortem_at      timestamptz,
    affected_accounts  text[],            -- NULL: every account
    reminded_for       timestamptz,       -- the slot of the last reminder (cadence.reminder_slot)
    CHECK (resolved_at IS NULL OR status = 'resolved')
);
-- a condition opens at most one incident at a time, whichever process sees it first
CREATE UNIQUE INDEX incidents_open_condition ON incidents (condition)
    WHERE resolved_at IS NULL AND condition IS NOT NULL;
CREATE INDEX incidents_opened ON incidents (opened_at);

CREATE TABLE incident_updates (
    id           bigserial PRIMARY KEY,
    incident_id  text NOT NULL REFERENCES incidents(id),
    at           timestamptz NOT NULL,
    author       text NOT NULL,
    status       text NOT NULL,
    body         text NOT NULL
);
CREATE INDEX incident_updates_incident ON incident_updates (incident_id, at);

-- Outbox of incident mail (notices to affected customers, reminders to the operator), sent through the
-- incident SMTP path, which is configured apart from the app's notification mail.
CREATE TABLE incident_mail (
    id           bigserial PRIMARY KEY,
    incident_id  text NOT NULL REFERENCES incidents(id),
    kind         text NOT NULL CHECK (kind IN ('notice', 'operator')),
    account_id   text,
    to_addr      text NOT NULL,
    subject      text NOT NULL,
    body         text NOT NULL,
    created_at   timestamptz NOT NULL,
    next_try_at  timestamptz NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    sent_at      timestamptz,
    last_error   text
);
CREATE INDEX incident_mail_unsent ON incident_mail (next_try_at) WHERE sent_at IS NULL;
