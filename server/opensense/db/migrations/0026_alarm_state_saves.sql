-- The rule engine's state rows are updated in place (issue 14; docs/ingest-cost.md).
--
-- Every pass rewrites the `alarm_state` row of each channel it judged. With the
-- table's pages full (fillfactor 100), the new row version goes to another page and
-- every index of the table gets an entry for it: three WAL records a save and
-- ~18 µs a channel in PostgreSQL (tools/bench/evaluator --readings 1). Half of each
-- page left free lets the new version stay on its page as a heap-only tuple (HOT:
-- no index entry, the old version pruned in place), since a save changes no indexed
-- column (channel_num, channel_id; due_at only when a grace or gap starts or ends).
-- Rows written from now on are placed this way; the existing ones move as they are
-- updated. Additive only: the previous release runs unchanged on it.
ALTER TABLE alarm_state SET (fillfactor = 50);

-- The dashboard's live notification of a save (migration 0023) once a statement,
-- not once a row: a pass saves all its channels in one UPDATE, and the row trigger
-- ran a PL/pgSQL call and a look-up of the channel's account for each (~5 µs a
-- channel). The same payloads ("<account id> <channel id>", for the rows whose
-- status or newest judged reading changed), sent at commit as before. The row
-- trigger on INSERT stays (a new channel's first row).
CREATE FUNCTION live_notify_channel_saves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('opensense_live', c.account_id || ' ' || n.channel_id)
  FROM live_new n JOIN live_old o ON o.channel_num = n.channel_num
    JOIN channels c ON c.id = n.channel_id
  WHERE n.status IS DISTINCT FROM o.status OR n.last_ts IS DISTINCT FROM o.last_ts;
  RETURN NULL;
END $$;

DROP TRIGGER live_notify_update ON alarm_state;
CREATE TRIGGER live_notify_update AFTER UPDATE ON alarm_state
  REFERENCING OLD TABLE AS live_old NEW TABLE AS live_new
  FOR EACH STATEMENT EXECUTE FUNCTION live_notify_channel_saves();
