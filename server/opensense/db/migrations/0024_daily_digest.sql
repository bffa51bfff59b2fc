-- The daily email digest (docs/alarms.md, "Daily digest"): one row per confirmed
-- email recipient and day, claimed by one sender among several processes
-- (FOR UPDATE SKIP LOCKED while it sends); the primary key makes "once per recipient
-- and day" a database fact across restarts. `day` is the calendar day summarised
-- (each site's part covers that day in the site's time zone).
CREATE TABLE digest_mail (
    target_id   text NOT NULL REFERENCES notify_targets(id),
    day         date NOT NULL,
    account_id  text NOT NULL REFERENCES accounts(id),
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sent', 'failed', 'dropped')),
    attempts    integer NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL,
    sent_at     timestamptz,
    error       text,
    PRIMARY KEY (target_id, day)
);
CREATE INDEX digest_mail_pending ON digest_mail (next_at) WHERE status = 'pending';
