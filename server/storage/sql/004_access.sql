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
-- Idempotency keys stay UNIQUE over the whole table (old workers still run ON CONFLICT
-- (idempotency_key)); an owned task stores its key namespaced as "<owner> <key>"
-- (server/jobs/queue.py).
ALTER TABLE jobs ADD COLUMN owner bigint;
-- GET /tasks: a caller's own tasks in id order. COALESCE(owner, 0), not owner: the queries
-- compare it with COALESCE($n, 0) (0 is never a key id), which an index serves where
-- IS NOT DISTINCT FROM is not indexable; the unowned tasks are one range of it too.
CREATE INDEX jobs_owner_id ON jobs ((COALESCE(owner, 0)), id);

-- A report belongs to its job's owner, and keeps that after the job is cleaned up. Set by a
-- trigger from the job, not by the statement that stores the report: a report stored by a
-- worker of the previous release (which does not know the column) still gets its owner.
ALTER TABLE reports ADD COLUMN owner bigint;

CREATE FUNCTION reports_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.owner := (SELECT owner FROM jobs WHERE id = NEW.job_id);
    RETURN NEW;
END
$$;

CREATE TRIGGER reports_owned BEFORE INSERT ON reports FOR EACH ROW EXECUTE FUNCTION reports_owner();
