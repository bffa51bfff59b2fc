-- The first and last checkpoint times of a channel's rule-engine state, as columns
-- (issue 14; docs/ingest-cost.md, stop 32).
--
-- Every pass reads, for each channel it judges, when its oldest and newest checkpoint
-- were taken (to add one every 10 minutes of readings, and drop those past 25 hours):
-- it read them out of the `checkpoints` array itself (`checkpoints -> 0 ->> 0`,
-- `checkpoints -> -1 ->> 0`, `jsonb_array_length(checkpoints)`). After a day a channel
-- holds ~150 checkpoints (~30 kB of JSON, stored compressed), and each of those three
-- expressions decompressed the whole array again: ~8.5 µs of PostgreSQL a channel and
-- pass on a 2-core machine, where the whole pass costs ~28 µs of PostgreSQL a channel
-- at a fleet's trickle. The two times are now written by the statement that changes
-- the checkpoints (alarms/evaluator.py SAVE_SQL), and a pass reads these columns.
--
-- Additive: the previous release runs unchanged on it (it neither reads nor writes
-- these). Rows it writes meanwhile may leave them behind the array; what that costs
-- is a checkpoint taken sooner or old ones dropped later than due, and the next
-- save that adds or drops a checkpoint writes them from the array again.
ALTER TABLE alarm_state ADD COLUMN cp_first timestamptz, ADD COLUMN cp_last timestamptz;

UPDATE alarm_state SET cp_first = (checkpoints -> 0 ->> 0)::timestamptz,
  cp_last = (checkpoints -> -1 ->> 0)::timestamptz
WHERE jsonb_array_length(checkpoints) > 0;
