-- The dashboard's people (issue 13): users of an account with a role, the magic-link
-- codes they sign in with, and their sessions (docs/dashboard.md).
--
-- A user belongs to one account; one email may be a user of several accounts. Roles
-- grow in rights: viewer (sees), operator (acknowledges and clears with a note),
-- manager (edits sites, devices, rules, recipients), owner (users, tokens, export,
-- deletion). Each account's login email becomes its first owner, here for the
-- accounts that exist and in devices/store.py create_account for new ones.
--
-- Codes and session ids are stored hashed (SHA-256): a copy of the database signs
-- nobody in. One pending sign-in per email (the primary key): a new request replaces
-- the row, which voids the previous code and link.
--
-- Additive only: the previous release keeps running on this schema.

CREATE TABLE users (
    id          text PRIMARY KEY CHECK (id LIKE 'usr\_%'),
    account_id  text NOT NULL REFERENCES accounts(id),
    email       text NOT NULL CHECK (email = lower(email)),
    role        text NOT NULL CHECK (role IN ('viewer', 'operator', 'manager', 'owner')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, email)
);
CREATE INDEX users_email ON users (email);

INSERT INTO users (id, account_id, email, role, created_at)
SELECT 'usr_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 16),
       a.id, lower(a.email), 'owner', a.created_at
  FROM accounts a;

CREATE TABLE login_codes (
    email       text PRIMARY KEY CHECK (email = lower(email)),
    code_hash   bytea NOT NULL,
    link_hash   bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    attempts    integer NOT NULL DEFAULT 0  -- wrong codes; past the limit the code is void
);
CREATE INDEX login_codes_expires ON login_codes (expires_at);

CREATE TABLE sessions (
    id_hash       bytea PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL  -- 30 days without a request end the session
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_last_seen ON sessions (last_seen_at);
