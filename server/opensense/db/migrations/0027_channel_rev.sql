-- A revision on every channel, so HTTP ingest reads a device's channels only when
-- they changed (issue 14; docs/ingest-cost.md).
--
-- HTTP ingest authenticates each request with one statement; that statement used to
-- send the device's channels back as JSON every time (kind, label, id, number, unit,
-- calibration offset: ~2 µs a reading of PostgreSQL's and the server's CPU at 32
-- readings a request). A server process now keeps each device's channels and sends
-- the sum of their revisions with the statement, which answers the channels again
-- only when the sum is different.
--
-- Why a sum of sequence values is exact: a new channel takes the next value, and a
-- change to a channel (its calibration offset, its name) sets its revision to the
-- next value, which is larger than the one it replaces. So every committed change
-- makes a device's sum larger, whatever order concurrent transactions commit in, and
-- an equal sum means no channel of the device changed. Channels are never deleted.
-- Additive only: the previous release runs unchanged on it.
CREATE SEQUENCE channel_rev;
ALTER TABLE channels ADD COLUMN rev bigint NOT NULL DEFAULT nextval('channel_rev');
ALTER SEQUENCE channel_rev OWNED BY channels.rev;

CREATE FUNCTION channel_rev_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.rev := nextval('channel_rev');
  RETURN NEW;
END $$;

CREATE TRIGGER channel_rev_bump BEFORE UPDATE ON channels
  FOR EACH ROW EXECUTE FUNCTION channel_rev_bump();
