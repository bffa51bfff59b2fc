-- The dashboard's live notification of alarm_state saves (migration 0026) finds each
-- channel's account by its number, not by its text id (issue 14; docs/ingest-cost.md,
-- stop 37).
--
-- The statement trigger joins the changed rows to `channels` for the account. By
-- `channels.id` (text, the primary key) that was an index probe of ~7 µs a channel:
-- ~0.4 ms of a batch settling 66 channels' calm readings (storage/batcher.py CALM_CTE:
-- a fleet batch), more than the rest of the trigger together. By `channels.num` (the
-- int4 `alarm_state.channel_num` is, UNIQUE since 0001) it is about half that. The same
-- rows, the same payloads ("<account id> <channel id>", the id still the state row's),
-- at commit as before.
--
-- Additive: the previous release neither defines nor calls anything else of it, and
-- reads the same notifications.
CREATE OR REPLACE FUNCTION live_notify_channel_saves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('opensense_live', c.account_id || ' ' || n.channel_id)
  FROM live_new n JOIN live_old o ON o.channel_num = n.channel_num
    JOIN channels c ON c.num = n.channel_num
  WHERE n.status IS DISTINCT FROM o.status OR n.last_ts IS DISTINCT FROM o.last_ts;
  RETURN NULL;
END $$;
