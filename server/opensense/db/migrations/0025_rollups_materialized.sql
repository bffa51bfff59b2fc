-- Rollups off the write path (issue 14), the way TimescaleDB's continuous aggregates
-- keep theirs (docs/storage.md, "Rollups"):
--
-- * readings go in raw; the rollup tables hold materialised buckets only, written by
--   the `rollups` job (opensense.storage.rollups) from the raw rows;
-- * `materialized`: every bucket that ends at or before it is materialised (5 min,
--   1 h and 1 day alike); later buckets are computed from the raw rows at read time;
-- * `threshold` (>= materialized): a reading stored with a time before it is "late":
--   its writer logs the range in rollup_invalid in the same transaction, and reads
--   compute the buckets it touches from the raw rows until the job has recomputed
--   them. The job moves the threshold first and waits for the writers that might
--   not have seen the move before it materialises up to it;
-- * a late reading into a day already packed (opensense.storage.compaction) is folded
--   into the rollups by its writer, as before: the job never recomputes packed days.
--
-- Both start at the migration's time: the rollups kept by the writers until now are
-- complete up to it.
CREATE TABLE rollup_state (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    threshold     timestamptz NOT NULL,
    materialized  timestamptz NOT NULL,
    CHECK (materialized <= threshold)
);
INSERT INTO rollup_state (threshold, materialized)
SELECT b, b FROM (SELECT date_bin('5 minutes', now(), timestamptz '2000-01-01T00:00:00Z') AS b) x;

-- Late ranges to recompute: one row per channel per writing transaction, appended
-- (never updated: a writer and the job never wait on each other), deleted by the job
-- once recomputed.
CREATE TABLE rollup_invalid (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_num  integer NOT NULL,
    lo           timestamptz NOT NULL,
    hi           timestamptz NOT NULL
);
CREATE INDEX rollup_invalid_channel ON rollup_invalid (channel_num, lo);

-- What a writing statement calls once (storage/write.py LATE_CTE): take the writers'
-- lock shared (held to the end of the transaction), then read the threshold. VOLATILE:
-- its SELECT takes a snapshot of its own, after the lock is held, so the threshold it
-- answers is at least the one the job moved before it waited for the writers. Rows
-- before it are logged late by the same statement; rows after it are seen by the job,
-- which waits for this transaction before it reads the raw rows.
CREATE FUNCTION rollup_writer_threshold() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
DECLARE t timestamptz;
BEGIN
  PERFORM pg_advisory_xact_lock_shared(7262003, 2);
  SELECT threshold INTO t FROM rollup_state;
  RETURN t;
END $$;

-- The job materialises [M, T) of every channel by time: a BRIN index on ts finds the
-- recent rows (inserted in time order, so each block range covers a short span) at a
-- fraction of a B-tree's cost per insert.
CREATE INDEX measurements_ts_brin ON measurements USING brin (ts) WITH (autosummarize = on);
