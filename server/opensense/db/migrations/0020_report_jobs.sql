-- Report jobs (issue 18): POST /v1/reports is asynchronous. A row is claimed by one
-- renderer among several processes (FOR UPDATE SKIP LOCKED), holds a lease that the
-- renderer extends while it works, and is retried a bounded number of times when a
-- renderer dies with the lease (docs/reports.md, "The API"). PDFs are not stored:
-- the row keeps the SHA-256 and size, and GET /v1/reports/{id}/file renders again.
--
-- Scheduled monthly reports (origin 'schedule') are one row per site and month;
-- their delivery to the report recipients is tracked per recipient in report_mail.
--
-- Additive only: the previous release keeps running on this schema (its 'queued'
-- rows are claimed by this one).

ALTER TABLE reports DROP CONSTRAINT IF EXISTS reports_status_check;
ALTER TABLE reports ADD CONSTRAINT reports_status_check
    CHECK (status IN ('queued', 'rendering', 'ready', 'failed'));
ALTER TABLE reports
    ADD COLUMN origin        text NOT NULL DEFAULT 'api' CHECK (origin IN ('api', 'cli', 'schedule')),
    ADD COLUMN created_by    text,                         -- the API token id, or cli:/schedule
    ADD COLUMN progress      real NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
    ADD COLUMN stage         text,                         -- what the renderer is doing
    ADD COLUMN attempts      integer NOT NULL DEFAULT 0,
    ADD COLUMN claimed_by    text,                         -- host:pid of the renderer
    ADD COLUMN claimed_until timestamptz,                  -- the lease; past it, retried
    ADD COLUMN started_at    timestamptz,                  -- the last claim
    ADD COLUMN render_ms     integer,                      -- claim to ready, the last attempt
    ADD COLUMN sha256        text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    ADD COLUMN size_bytes    integer,
    ADD COLUMN failed_at     timestamptz,
    ADD COLUMN notified_at   timestamptz;                  -- report_ready sent to the outbox

CREATE INDEX reports_pending ON reports (created_at) WHERE status IN ('queued', 'rendering');
CREATE UNIQUE INDEX reports_scheduled ON reports (site_id, template, period_from, period_to)
    WHERE origin = 'schedule';

-- A scheduled report's email (PDF attached) to each of the site's report recipients
-- (sites.report_recipients, set with PATCH /v1/sites/{id}), as they were when the
-- report became ready.
CREATE TABLE report_mail (
    report_id   text NOT NULL REFERENCES reports(id),
    address     text NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL,
    sent_at     timestamptz,
    error       text,
    PRIMARY KEY (report_id, address)
);
CREATE INDEX report_mail_pending ON report_mail (next_at) WHERE status = 'pending';
