-- The dashboard's live updates (issue 13; docs/dashboard.md, "Live updates").
--
-- What the overview shows changes when the rule engine judges a channel (its
-- alarm_state row: status, newest judged reading), when an event opens, is
-- acknowledged or cleared, and when a device goes offline or comes back. Each such
-- row change NOTIFYs `opensense_live` at commit with "<account id> <channel or
-- device id>": one LISTEN connection per server process (web/live.py) fans it out to
-- the open event streams of that account only. Identical payloads within one
-- transaction are sent once (PostgreSQL folds them).
--
-- Additive only: the previous release keeps running on this schema (it does not
-- listen; the notifications are dropped).

CREATE FUNCTION live_notify_channel() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE acc text;
BEGIN
  SELECT c.account_id INTO acc FROM channels c WHERE c.id = NEW.channel_id;
  IF acc IS NOT NULL THEN
    PERFORM pg_notify('opensense_live', acc || ' ' || NEW.channel_id);
  END IF;
  RETURN NULL;
END $$;

-- alarm_state: only what the dashboard shows (status, the newest judged reading), not
-- checkpoints or due times
CREATE TRIGGER live_notify AFTER INSERT ON alarm_state
  FOR EACH ROW EXECUTE FUNCTION live_notify_channel();
CREATE TRIGGER live_notify_update AFTER UPDATE ON alarm_state
  FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status OR NEW.last_ts IS DISTINCT FROM OLD.last_ts)
  EXECUTE FUNCTION live_notify_channel();
CREATE TRIGGER live_notify AFTER INSERT OR UPDATE OF state, acknowledged_at, cleared_at ON events
  FOR EACH ROW EXECUTE FUNCTION live_notify_channel();

CREATE FUNCTION live_notify_device() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE acc text;
BEGIN
  SELECT d.account_id INTO acc FROM devices d WHERE d.id = NEW.device_id;
  IF acc IS NOT NULL THEN
    PERFORM pg_notify('opensense_live', acc || ' ' || NEW.device_id);
  END IF;
  RETURN NULL;
END $$;

CREATE TRIGGER live_notify AFTER INSERT OR UPDATE ON device_alarm_state
  FOR EACH ROW EXECUTE FUNCTION live_notify_device();

-- The channel page draws each range rule's thresholds with their history, read from
-- the rule's audit rows (rule.create, rule.update with params from/to).
CREATE INDEX audit_log_rule_changes ON audit_log (subject, seq)
  WHERE action IN ('rule.create', 'rule.update');
