-- The rule engine's checkpoints in rows of their own, one a checkpoint (issue 14;
-- docs/ingest-cost.md, stop 32).
--
-- A channel's checkpoints (its rules' state every 10 minutes of readings, kept 25
-- hours: ~150 after a day, ~27 kB of JSON) were one jsonb array in its
-- `alarm_state` row. Adding one, and dropping the one past 25 h, rewrote the whole
-- array: decompressed, rebuilt and compressed again, ~600 µs of PostgreSQL, once
-- every 10 minutes of readings of every channel. With a day-old state that was most
-- of what a pass cost the database: ~100 µs a channel and pass against ~25 with
-- fresh ones (tools/bench/evaluator --aged, one reading a channel and pass). Now
-- adding one is an INSERT of one row, dropping one a DELETE of one row.
--
-- A row holds the checkpoint as the array held it ([iso time, rules, events]: `cp`,
-- read back as written) with its time (`at`, for the drops); `id` keeps the order
-- they were written in, which is the array's. The pass keeps alarm_state.cp_first
-- and cp_last (migration 0029) as the times of the first and last row.
--
-- The arrays' checkpoints are copied here, and the arrays are left as they are:
-- additive (docs/operations.md), the previous release runs on it with the
-- checkpoints it had (a rollback loses none; those this release adds meanwhile are
-- not in its arrays, so its rewinds may replay from an older one). This release
-- neither reads nor writes `alarm_state.checkpoints`; a later one can drop it.
-- Copying takes ~15 s a million checkpoints (a day of 6,700 channels) on 2 cores.
CREATE TABLE alarm_checkpoints (
    channel_num  integer NOT NULL REFERENCES alarm_state (channel_num) ON DELETE CASCADE,
    id           bigint GENERATED ALWAYS AS IDENTITY,
    at           timestamptz NOT NULL,
    cp           jsonb NOT NULL,
    PRIMARY KEY (channel_num, id)
);

INSERT INTO alarm_checkpoints (channel_num, at, cp)
SELECT s.channel_num, (e.c ->> 0)::timestamptz, e.c
FROM alarm_state s, jsonb_array_elements(s.checkpoints) WITH ORDINALITY AS e(c, i)
ORDER BY s.channel_num, e.i;
