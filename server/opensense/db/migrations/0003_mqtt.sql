-- MQTT state of a device: its retained lwt (connected) and info, and the QoS 0
-- measurement publishes that were dropped (docs/product.md#mqtt: QoS 0 is not accepted).
ALTER TABLE devices ADD COLUMN connected boolean;
ALTER TABLE devices ADD COLUMN connected_changed_at timestamptz;
ALTER TABLE devices ADD COLUMN info jsonb NOT NULL DEFAULT '{}';
ALTER TABLE devices ADD COLUMN qos0_dropped bigint NOT NULL DEFAULT 0;

-- Every token change wakes the MQTT side of every server process, so a rotated or
-- revoked device token loses its live broker session at once (embedded broker) or
-- its broker credentials (Mosquitto dynamic security).
CREATE FUNCTION opensense_token_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.kind = 'ds_live' AND NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
    PERFORM pg_notify('opensense_token_revoked', NEW.device_id || ' ' || NEW.key_id);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER tokens_changed AFTER UPDATE OF revoked_at ON tokens
  FOR EACH ROW EXECUTE FUNCTION opensense_token_changed();
