-- Separate owner and app roles (docs/operations.md, "Database roles").
--
-- Migrations run as the owner role, which owns every table; the server connects as
-- the app role, which gets only the privileges it needs (granted by `opensense db
-- migrate` after the migrations, db/roles.py grant_app): on audit_log SELECT and
-- INSERT only, so it can neither change rows, nor switch the trigger off, nor drop
-- the table. What the app did as the table's owner before (create next month's
-- partitions, drop partitions past retention) it now asks of these two functions,
-- which run with the owner's rights and do exactly that and nothing else.
--
-- Additive only: the previous release keeps running on this schema.

CREATE FUNCTION opensense_create_partition(parent text, lo date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
  part text;
  hi date;
BEGIN
  IF parent NOT IN ('measurements', 'measurements_packed', 'rollup_5m', 'rollup_1h') THEN
    RAISE EXCEPTION 'opensense_create_partition: % is not a partitioned table of ours', parent
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF lo <> date_trunc('month', lo)::date THEN
    RAISE EXCEPTION 'opensense_create_partition: % is not the first day of a month', lo;
  END IF;
  hi := (lo + interval '1 month')::date;
  part := format('%s_y%sm%s', parent, to_char(lo, 'YYYY'), to_char(lo, 'MM'));
  IF to_regclass(part) IS NOT NULL THEN
    RETURN false;
  END IF;
  IF parent = 'measurements_packed' THEN  -- partitioned by a date
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                   part, parent, lo::text, hi::text);
  ELSE  -- partitioned by a timestamptz: UTC month bounds
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                   part, parent, lo::text || 'T00:00:00Z', hi::text || 'T00:00:00Z');
  END IF;
  RETURN true;
END $$;

CREATE FUNCTION opensense_drop_partition(part text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  -- only a monthly partition of one of the partitioned tables, by its exact name
  IF NOT EXISTS (
    SELECT 1 FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_class p ON p.oid = i.inhparent
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND c.relname = part
       AND p.relname IN ('measurements', 'measurements_packed', 'rollup_5m', 'rollup_1h')
       AND c.relname ~ ('^' || p.relname || '_y[0-9]{4}m[0-9]{2}$')
  ) THEN
    RAISE EXCEPTION 'opensense_drop_partition: % is not a monthly partition', part
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  EXECUTE format('DROP TABLE %I', part);
  RETURN true;
END $$;

-- Compaction gives back the index pages of a raw month it emptied. The app role may
-- REINDEX only with PostgreSQL 17's MAINTAIN privilege; before that it asks this
-- function (a plain REINDEX: the partition is empty, so the lock is held for no time).
CREATE FUNCTION opensense_reindex_partition(part text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
      JOIN pg_class p ON p.oid = i.inhparent
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND c.relname = part AND p.relname = 'measurements'
       AND c.relname ~ '^measurements_y[0-9]{4}m[0-9]{2}$'
  ) THEN
    RAISE EXCEPTION 'opensense_reindex_partition: % is not a raw monthly partition', part
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  EXECUTE format('REINDEX TABLE %I', part);
  RETURN true;
END $$;

REVOKE ALL ON FUNCTION opensense_create_partition(text, date) FROM PUBLIC;
REVOKE ALL ON FUNCTION opensense_drop_partition(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION opensense_reindex_partition(text) FROM PUBLIC;

-- Each dump is signed (docs/backups.md): the SHA-256 of the encrypted file and the
-- signed note over it, so the restore test restores only what this server wrote.
ALTER TABLE backup_runs ADD COLUMN sha256 text NULL;
ALTER TABLE backup_runs ADD COLUMN signature text NULL;
