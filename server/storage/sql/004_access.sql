-- API keys (server/access/): a key is shown once when it is made; only its lookup prefix and
-- the SHA-256 digest of its secret are kept. `family` is the id of the first key of a line of
-- rotations (NULL: the key itself): what a key owns (its tasks) belongs to the family, so a
-- rotated key keeps it.
CREATE TABLE api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    family       bigint,
    prefix       text        NOT NULL UNIQUE,
    digest       bytea       NOT NULL CHECK (length(digest) = 32),
    name         text        NOT NULL,
    scopes       text[]      NOT NULL,
    rate         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    replaced_by  bigint
);

-- Every creation, rotation, revocation and admin action: who (a key id, or the command line),
-- when, what.
CREATE TABLE audit_log (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text        NOT NULL,
    action text        NOT NULL,
    target text,
    detail jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);

-- Secrets every process of a deployment shares, made once by whichever process comes first
-- (the stream tokens' signing key).
CREATE TABLE access_secrets (
    name       text        PRIMARY KEY,
    secret     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The key family that made a task (NULL: made on an open route, without a key). Added
-- nullable, so the workers of a rolling restart that do not know it keep inserting.
ALTER TABLE jobs ADD COLUMN owner bigint;
