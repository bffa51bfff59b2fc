-- Site gateways, hardened (issue 11, items 12 and 19).

-- The gateway's last uplink gap as the server saw it: the last contact before a
-- silence of more than two minutes (gap_from) and the first contact after it
-- (gap_to). A local alert stands only for an alarm raised inside that gap.
ALTER TABLE gateways ADD COLUMN gap_from timestamptz;
ALTER TABLE gateways ADD COLUMN gap_to timestamptz;

-- The gw_ token a local alert was posted with: once it is revoked (the gateway's
-- token rotated, or the gateway deleted), the alert no longer stands for people
-- having been told. NULL for alerts stored before this migration: those never count.
ALTER TABLE local_alerts ADD COLUMN token_id text;

-- Whatever changes a site's sync document (a device token made, rotated or revoked;
-- a device moved, renamed or deleted; a rule changed) wakes the long-polling sync of
-- that site's gateway in every server process, so a rotated token stops working at
-- the site broker at once instead of at the next periodic sync.
CREATE FUNCTION opensense_gateway_token_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE s text;
BEGIN
  IF NEW.device_id IS NOT NULL THEN
    SELECT site_id INTO s FROM devices WHERE id = NEW.device_id;
    IF s IS NOT NULL THEN
      PERFORM pg_notify('opensense_gateway_sync', s);
    END IF;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER tokens_gateway_sync AFTER INSERT OR UPDATE OF revoked_at, site_hash ON tokens
  FOR EACH ROW EXECUTE FUNCTION opensense_gateway_token_sync();

CREATE FUNCTION opensense_gateway_device_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('opensense_gateway_sync', NEW.site_id);
  IF OLD.site_id IS DISTINCT FROM NEW.site_id AND OLD.site_id IS NOT NULL THEN
    PERFORM pg_notify('opensense_gateway_sync', OLD.site_id);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER devices_gateway_sync
  AFTER UPDATE OF deleted_at, site_id, local_id, cadence_s ON devices
  FOR EACH ROW EXECUTE FUNCTION opensense_gateway_device_sync();

CREATE FUNCTION opensense_gateway_rule_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE s text;
BEGIN
  SELECT d.site_id INTO s FROM channels c JOIN devices d ON d.id = c.device_id
   WHERE c.id = NEW.channel_id;
  IF s IS NOT NULL THEN
    PERFORM pg_notify('opensense_gateway_sync', s);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER rules_gateway_sync AFTER INSERT OR UPDATE ON rules
  FOR EACH ROW EXECUTE FUNCTION opensense_gateway_rule_sync();
