-- The LoRaWAN tray and exact dedupe of re-delivered uplinks (issue 15).
--
-- unassigned_uplinks becomes the tray an operator works through: besides uplinks from
-- a DevEUI no device claims ('unassigned'), it keeps the uplinks a door refused
-- ('refused'), used only in part ('partial') or that were simulated from the
-- network's console ('simulated'), because nobody reads a network's webhook log.
-- A row leaves the tray when assigned to a device (its readings replayed once) or
-- discarded; it is kept with who did it and when (the audit trail has the same).
-- Columns are added with defaults: the previous release's INSERT (account_id,
-- dev_eui, received_at, payload) still lands as an 'unassigned' row.
ALTER TABLE unassigned_uplinks
    ADD COLUMN IF NOT EXISTS network     text,
    ADD COLUMN IF NOT EXISTS uplink_key  text,
    ADD COLUMN IF NOT EXISTS state       text NOT NULL DEFAULT 'unassigned',
    ADD COLUMN IF NOT EXISTS reason      text,
    ADD COLUMN IF NOT EXISTS device_id   text,
    ADD COLUMN IF NOT EXISTS resolved_at timestamptz,
    ADD COLUMN IF NOT EXISTS resolved_by text;
-- a re-delivered uplink lands in the tray once (the states the door files with the
-- network's identity; assigning or refusing a row later moves it out of the index)
CREATE UNIQUE INDEX IF NOT EXISTS unassigned_uplinks_key
    ON unassigned_uplinks (account_id, uplink_key, state)
    WHERE uplink_key IS NOT NULL AND state IN ('unassigned', 'simulated');
CREATE INDEX IF NOT EXISTS unassigned_uplinks_open
    ON unassigned_uplinks (account_id, id) WHERE resolved_at IS NULL;
CREATE INDEX IF NOT EXISTS unassigned_uplinks_device
    ON unassigned_uplinks (device_id, id) WHERE device_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS unassigned_uplinks_received ON unassigned_uplinks (received_at);

-- The network's own identity of every uplink whose readings were stored (DevEUI +
-- session + frame counter, or ChirpStack's deduplicationId): the same uplink
-- delivered again is answered "deduplicated" and stores nothing. Rows older than the
-- retention of this table (docs/api.md) are pruned by the housekeeping job.
CREATE TABLE IF NOT EXISTS lorawan_seen (
    account_id   text NOT NULL,
    uplink_key   text NOT NULL,
    device_id    text NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, uplink_key)
);
CREATE INDEX IF NOT EXISTS lorawan_seen_received ON lorawan_seen (received_at);
