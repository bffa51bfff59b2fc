-- Audit trail (append-only, hash-chained per account, leaves of an RFC 6962 Merkle
-- tree per account) and the record of backup runs. docs/audit.md, docs/backups.md.
--
-- Additive only (docs/operations.md, "Migrations"): the previous release keeps
-- running on this schema because nothing it uses is dropped or renamed.

CREATE TABLE audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     text NOT NULL,
    seq            bigint NOT NULL CHECK (seq >= 0),  -- 0, 1, 2 … per account: the leaf index
    at             timestamptz NOT NULL,
    actor          text NOT NULL,                     -- tok_… (API token), cli:<user>, system
    action         text NOT NULL,                     -- e.g. device.create, token.rotate
    subject        text,                              -- the id acted on
    data           jsonb NOT NULL DEFAULT '{}',
    correction_of  bigint REFERENCES audit_log(id),   -- a correction is a new row
    prev_hash      bytea NOT NULL CHECK (length(prev_hash) = 32),
    hash           bytea NOT NULL CHECK (length(hash) = 32),
    UNIQUE (account_id, seq)
);

-- Rows are never updated or deleted, by anyone, through any statement.
CREATE FUNCTION opensense_audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_log is append-only: % refused (corrections are new rows with correction_of)', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION opensense_audit_refuse();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION opensense_audit_refuse();

-- Privileges. Where the migrating role may (a superuser, as on the embedded server
-- and in the test suite), the table is handed to a NOLOGIN owner role, and the app
-- (the migrating role, and members of the group role opensense_app) get SELECT and
-- INSERT only: no UPDATE, DELETE, TRUNCATE, and as non-owners they cannot disable
-- the trigger either. A superuser can do anything; the signed checkpoints published
-- outside the database are what catch that. Roles are cluster-wide, so every step
-- tolerates a role made by another database's migration.
CREATE FUNCTION opensense_audit_protect() RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  me text := current_user;
BEGIN
  BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'opensense_app') THEN
      CREATE ROLE opensense_app NOLOGIN;
    END IF;
  EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
  END;
  BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'opensense_audit_owner') THEN
      CREATE ROLE opensense_audit_owner NOLOGIN;
    END IF;
  EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
  END;
  EXECUTE 'ALTER TABLE audit_log OWNER TO opensense_audit_owner';
  EXECUTE 'REVOKE ALL ON audit_log FROM PUBLIC';
  EXECUTE format('GRANT SELECT, INSERT ON audit_log TO %I, opensense_app', me);
  RETURN 'audit_log owned by opensense_audit_owner; ' || me || ' and opensense_app may SELECT, INSERT';
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'audit_log stays owned by %: the migrating role may not create roles or hand the table over (docs/audit.md)', me;
  RETURN 'audit_log owned by ' || me || ' (not protected by privileges; the trigger still refuses changes)';
END $$;
SELECT opensense_audit_protect();

-- Backups and restore tests (contract: the status page reads this).
CREATE TABLE backup_runs (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('hourly', 'daily', 'weekly', 'restore_test')),
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NULL,
    ok           boolean NULL,
    bytes        bigint NULL,
    location     text NULL,
    detail       text NULL
);
CREATE INDEX backup_runs_kind ON backup_runs (kind, started_at);
