-- A revision on every channel's rule-engine state, so the engine keeps each
-- channel's rules between passes (issue 14; docs/ingest-cost.md).
--
-- Every pass read, for each channel it judged, the channel's ids, its site's time
-- zone and its enabled rules as JSON (alarms/evaluator.py META_SQL): ~13 µs of
-- PostgreSQL a channel, the rule engine's second costliest statement at a fleet's
-- trickle (one reading a channel and pass). The evaluator now keeps what it read,
-- with the `meta_rev` of the channel's `alarm_state` row at that time, and reads it
-- again only when `meta_rev` is another.
--
-- Why it is exact: every change to what META_SQL reads (a rule of the channel
-- added, edited, disabled or deleted; its device moved to another site; its site's
-- time zone; the channel's own ids) sets `meta_rev` of the channel's row to the
-- sequence's next value, in the changing transaction. A pass reads `meta_rev` with
-- the row locked (FOR UPDATE), then the rules: a change that commits before that
-- lock shows as a new `meta_rev`; one that comes after it waits for the pass's
-- commit (its trigger needs the row) and is seen by the next pass. Values are never
-- reused, so a row made again (a channel's state deleted by hand) cannot match what
-- a process kept. Additive only: the previous release runs unchanged on it.
CREATE SEQUENCE alarm_meta_rev;
ALTER TABLE alarm_state ADD COLUMN meta_rev bigint NOT NULL DEFAULT nextval('alarm_meta_rev');
ALTER SEQUENCE alarm_meta_rev OWNED BY alarm_state.meta_rev;

CREATE FUNCTION alarm_meta_rev_rules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    UPDATE alarm_state SET meta_rev = nextval('alarm_meta_rev');
    RETURN NULL;
  END IF;
  UPDATE alarm_state SET meta_rev = nextval('alarm_meta_rev')
  WHERE channel_id IN (
    CASE WHEN TG_OP <> 'INSERT' THEN OLD.channel_id END,
    CASE WHEN TG_OP <> 'DELETE' THEN NEW.channel_id END);
  RETURN NULL;
END $$;

CREATE TRIGGER alarm_meta_rev AFTER INSERT OR UPDATE OR DELETE ON rules
  FOR EACH ROW EXECUTE FUNCTION alarm_meta_rev_rules();
CREATE TRIGGER alarm_meta_rev_truncate AFTER TRUNCATE ON rules
  FOR EACH STATEMENT EXECUTE FUNCTION alarm_meta_rev_rules();

CREATE FUNCTION alarm_meta_rev_channels() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE alarm_state SET meta_rev = nextval('alarm_meta_rev')
  WHERE channel_id IN (OLD.id, NEW.id);
  RETURN NULL;
END $$;

CREATE TRIGGER alarm_meta_rev AFTER UPDATE OF num, id, account_id, device_id ON channels
  FOR EACH ROW EXECUTE FUNCTION alarm_meta_rev_channels();

CREATE FUNCTION alarm_meta_rev_devices() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE alarm_state SET meta_rev = nextval('alarm_meta_rev')
  WHERE channel_id IN (SELECT c.id FROM channels c WHERE c.device_id IN (OLD.id, NEW.id));
  RETURN NULL;
END $$;

CREATE TRIGGER alarm_meta_rev AFTER UPDATE OF id, site_id ON devices
  FOR EACH ROW WHEN (OLD.site_id IS DISTINCT FROM NEW.site_id OR OLD.id <> NEW.id)
  EXECUTE FUNCTION alarm_meta_rev_devices();

CREATE FUNCTION alarm_meta_rev_sites() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE alarm_state SET meta_rev = nextval('alarm_meta_rev')
  WHERE channel_id IN (SELECT c.id FROM channels c JOIN devices d ON d.id = c.device_id
                       WHERE d.site_id IN (OLD.id, NEW.id));
  RETURN NULL;
END $$;

CREATE TRIGGER alarm_meta_rev AFTER UPDATE OF id, timezone ON sites
  FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone OR OLD.id <> NEW.id)
  EXECUTE FUNCTION alarm_meta_rev_sites();
