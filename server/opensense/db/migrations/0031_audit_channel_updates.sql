-- A rule's limits changed through PATCH /v1/channels/{id} are recorded as
-- `channel.update` rows of the channel (data.rule: {id, from, to}). The HACCP report
-- and the channel page read them beside the rule's own rows (alarms/history.py), by
-- channel, as migration 0023's index serves the rule's.
--
-- Additive only: the previous release runs unchanged on it.
CREATE INDEX audit_log_channel_updates ON audit_log (subject, seq)
  WHERE action = 'channel.update';
