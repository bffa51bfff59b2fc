-- A token's fast check (opensense.tokens): HMAC-SHA256, keyed by a server secret kept
-- outside the database, over (key_id, secret, bcrypt hash). Written after a good bcrypt
-- check so that a device's first request after a server restart costs one HMAC, not one
-- bcrypt. Without the key it tells a database reader nothing; NULL: bcrypt decides.
ALTER TABLE tokens ADD COLUMN fast_check bytea;
