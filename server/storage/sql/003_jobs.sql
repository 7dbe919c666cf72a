-- Background jobs (server/jobs.py): a queue consumed with FOR UPDATE SKIP LOCKED by every
-- worker process, woken by NOTIFY hotpath_jobs. `attempts` is counted when a job is claimed;
-- with `worker` it is the fencing token: a worker only writes a job's progress or outcome
-- while the row still carries the attempt number and worker id of its claim.
CREATE TABLE jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    state            text        NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
    idempotency_key  text        UNIQUE,
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    worker           text,
    cancel_requested boolean     NOT NULL DEFAULT false,
    progress_done    bigint      NOT NULL DEFAULT 0,
    progress_total   bigint,
    progress_message text,
    result           jsonb,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- What a claim scans: due queued jobs, oldest first.
CREATE INDEX jobs_due ON jobs (run_after, id) WHERE state = 'queued';
-- What the lease reaper scans.
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'processing';
-- What retention cleanup scans.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('completed', 'failed', 'cancelled');
-- GET /tasks?state=...&after=... (keyset pages per state).
CREATE INDEX jobs_state_id ON jobs (state, id);

-- Finished reports (generate_report jobs). One per job, so a retried job overwrites its own
-- report instead of adding a second; no foreign key, so a report outlives its job's cleanup.
CREATE TABLE reports (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id       bigint      NOT NULL UNIQUE,
    report_type  text        NOT NULL,
    params       jsonb       NOT NULL DEFAULT '{}',
    summary      jsonb       NOT NULL DEFAULT '{}',
    rows         jsonb       NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Wake idle workers when jobs arrive. Statement level: a batch insert sends one notification
-- (and identical notifications in one transaction are folded into one by PostgreSQL).
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hotpath_jobs', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify();
