-- Sealed reports (issue 18 item 4, docs/reports.md "Verification"): what a sealed
-- PDF printed, so the same report renders to the same bytes again, and the public
-- verification page can confirm a report's SHA-256 with its site name, period and
-- rendering time and nothing else.
--
-- `code` is the short link's part (/verify/<code>); `sha256` is the hex digest of the
-- PDF as rendered, also written to the audit trail (action `report.rendered`, whose
-- row id is `audit_id`). `site_name` is the name printed, so renaming the site later
-- changes neither the bytes of a re-render nor what the page confirms. `checkpoint`
-- is the signed note (C2SP) of the account's audit trail taken at rendering.
-- Rows are never updated: a report re-rendered under the same seal hashes the same.
--
-- Additive only: the previous release keeps running on this schema.

CREATE TABLE report_seals (
    code         text PRIMARY KEY CHECK (code ~ '^[a-z2-7]{8,32}$'),
    link         text NOT NULL,              -- as printed, with OPENSENSE_PUBLIC_URL then
    account_id   text NOT NULL REFERENCES accounts(id),
    site_id      text NOT NULL REFERENCES sites(id),
    site_name    text NOT NULL,
    template     text NOT NULL,
    period_from  date NOT NULL,
    period_to    date NOT NULL,               -- inclusive, in the site's time zone
    language     text NOT NULL,
    rendered_at  timestamptz NOT NULL,
    checkpoint   text NOT NULL,
    sha256       text NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    audit_id     bigint NOT NULL,
    CHECK (period_from <= period_to)
);
CREATE INDEX report_seals_site ON report_seals (site_id, period_from);
