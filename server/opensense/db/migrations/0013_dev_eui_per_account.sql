-- A LoRaWAN DevEUI is unique within one account, not across all of them (issue 11,
-- item 18). The global index let any tenant learn whether another account had
-- registered a DevEUI (a 409 was an existence oracle) and squat a customer's devices
-- before they were registered. Uplinks come through a whk_ token of one account and
-- are matched within it (ingest/pipeline.py device_by_eui), so two accounts holding
-- the same DevEUI never see each other's readings.
-- Relaxing a constraint is additive: the previous release's INSERTs still pass.
CREATE UNIQUE INDEX IF NOT EXISTS devices_account_dev_eui
    ON devices (account_id, dev_eui) WHERE deleted_at IS NULL AND dev_eui IS NOT NULL;
DROP INDEX IF EXISTS devices_dev_eui;
