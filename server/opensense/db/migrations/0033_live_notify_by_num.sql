-- The dashboard's live notification of alarm_state saves (migration 0026) finds each
-- channel's account by its number, not by its text id (issue 14; docs/ingest-cost.md,
-- stop 37).
--
-- The statement trigger joins the changed rows to `channels` for the account; by
-- `channels.id` (text, the primary key) a probe a row. Measured with auto_explain on
-- the batch writer's statement settling 66 channels' calm readings (storage/batcher.py
-- CALM_CTE: a fleet batch), the real schema, median of 60 statements, four rounds
-- each: the trigger's query took 250 µs by `id` against 206 µs by `num` with 14,400
-- channels, 440 against 355 µs with 72,000 (the statement: ~1.7 and ~2.2 ms). By
-- `channels.num` (the int4 `alarm_state.channel_num` is, UNIQUE since 0001), and a
-- probe a row (a scalar subquery), not a join: as a join the planner, seeing
-- `channels` small (7,200 rows), hashed all of it to find 66 (1.2 ms). The same rows,
-- the same payloads ("<account id> <channel id>", the id still the state row's), at
-- commit as before.
--
-- Additive: the previous release neither defines nor calls anything else of it, and
-- reads the same notifications.
CREATE OR REPLACE FUNCTION live_notify_channel_saves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('opensense_live', x.acc || ' ' || x.channel_id)
  FROM (
    SELECT (SELECT c.account_id FROM channels c WHERE c.num = n.channel_num) AS acc,
      n.channel_id
    FROM live_new n JOIN live_old o ON o.channel_num = n.channel_num
    WHERE n.status IS DISTINCT FROM o.status OR n.last_ts IS DISTINCT FROM o.last_ts
    OFFSET 0  -- (kept a subquery: pulled up, the probe ran twice, in the filter too)
  ) x
  WHERE x.acc IS NOT NULL;
  RETURN NULL;
END $$;
