-- pgtasks database schema: the single source of truth for every table, index,
-- function and trigger. Apply it with
--
--     psql -v ON_ERROR_STOP=1 -f schema.sql
--
-- or `pgtasks migrate`. Running it again is harmless: every change is a numbered
-- step that runs once, recorded in pgtasks.schema_version. To change the schema,
-- append a new step (never edit a released one), so existing installs upgrade in
-- place.
--
-- Submitting a job needs nothing but
--
--     INSERT INTO pgtasks.job (queue, data) VALUES ('readme-queue', '{"arg1":"read me"}');
--
-- Bulk loads that do not want wakeups may skip the notification for their
-- session or transaction (jobs are then found by the workers' slow poll):
--
--     SET LOCAL pgtasks.skip_notify = on;

BEGIN;
SET LOCAL client_min_messages = warning;
-- One migrator at a time, whether psql or `pgtasks migrate`.
SELECT pg_advisory_xact_lock(hashtext('pgtasks.schema'));

CREATE SCHEMA IF NOT EXISTS pgtasks;
CREATE TABLE IF NOT EXISTS pgtasks.schema_version (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Step 1: queues, jobs, the claim index, notify triggers, failure policy.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 1) THEN
    RETURN;
END IF;

CREATE TYPE pgtasks.job_state AS ENUM
    ('created', 'retry', 'active', 'completed', 'failed', 'cancelled');

-- A queue and its policy. Durations are intervals; workers read the policy
-- from here, so every instance applies the same rules.
CREATE TABLE pgtasks.queue (
    name            text        PRIMARY KEY,
    retry_limit     integer     NOT NULL DEFAULT 2,
    retry_delay     interval    NOT NULL DEFAULT '1 second',
    retry_backoff   boolean     NOT NULL DEFAULT true,
    retry_delay_max interval    NOT NULL DEFAULT '1 hour',
    lease           interval    NOT NULL DEFAULT '15 minutes',
    retention       interval    NOT NULL DEFAULT '7 days',
    dead_letter     text,
    paused          boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- 'pgtasks.' + name is the NOTIFY channel, which must fit in 63 bytes.
    CONSTRAINT queue_name_valid CHECK (name ~ '^[A-Za-z0-9_.-]{1,48}$'),
    CONSTRAINT queue_retry_limit_not_negative CHECK (retry_limit >= 0),
    CONSTRAINT queue_retry_delay_not_negative CHECK (retry_delay >= interval '0'),
    CONSTRAINT queue_retry_delay_max_not_below_delay CHECK (retry_delay_max >= retry_delay),
    CONSTRAINT queue_lease_positive CHECK (lease > interval '0'),
    CONSTRAINT queue_retention_not_negative CHECK (retention >= interval '0'),
    CONSTRAINT queue_dead_letter_not_self CHECK (dead_letter <> name),
    CONSTRAINT queue_dead_letter_exists FOREIGN KEY (dead_letter)
        REFERENCES pgtasks.queue (name) DEFERRABLE INITIALLY DEFERRED
);

-- One row per job. The queue is checked by the insert trigger rather than a
-- foreign key: a key share lock on the queue row from every concurrent insert
-- would create MultiXact traffic on the hottest path.
CREATE TABLE pgtasks.job (
    id            bigint            GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue         text              NOT NULL,
    state         pgtasks.job_state NOT NULL DEFAULT 'created',
    priority      integer           NOT NULL DEFAULT 0,
    run_at        timestamptz       NOT NULL DEFAULT now(),
    attempt       integer           NOT NULL DEFAULT 0,
    -- NULL: the queue's retry_limit + 1, read when an attempt fails.
    max_attempts  integer,
    data          jsonb             NOT NULL DEFAULT '{}',
    singleton_key text,
    lease_until   timestamptz,
    created_at    timestamptz       NOT NULL DEFAULT now(),
    started_at    timestamptz,
    completed_at  timestamptz,
    output        jsonb,
    last_error    text,
    -- [{"attempt": n, "at": timestamp, "error": text}, ...], oldest first.
    errors        jsonb,
    CONSTRAINT job_data_must_be_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT job_attempt_not_negative CHECK (attempt >= 0),
    CONSTRAINT job_max_attempts_positive CHECK (max_attempts IS NULL OR max_attempts >= 1),
    CONSTRAINT job_active_has_lease CHECK (state <> 'active' OR lease_until IS NOT NULL),
    CONSTRAINT job_errors_is_array CHECK (errors IS NULL OR jsonb_typeof(errors) = 'array')
) WITH (fillfactor = 90);

-- Serves the claim exactly: one queue, highest priority first, then oldest
-- run_at, then id, over waiting jobs only.
CREATE INDEX job_claim_idx ON pgtasks.job (queue, priority DESC, run_at, id)
    WHERE state IN ('created', 'retry');
-- Finds a queue's next future run_at for the worker's timer.
CREATE INDEX job_waiting_run_at_idx ON pgtasks.job (queue, run_at)
    WHERE state IN ('created', 'retry');
-- Finds expired leases for the rescuer; holds only running jobs.
CREATE INDEX job_active_lease_idx ON pgtasks.job (lease_until)
    WHERE state = 'active';

-- True unless the session or transaction set pgtasks.skip_notify = on.
CREATE FUNCTION pgtasks.notify_enabled() RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(current_setting('pgtasks.skip_notify', true), '') NOT IN ('on', 'true', '1')
$fn$;

-- Once per INSERT statement: refuse unknown queues with a clear error, then
-- wake each queue that received rows. Due rows send an empty payload (Postgres
-- folds identical notifications within a transaction); rows due later send
-- 'scheduled' so the worker re-arms its timer instead of claiming.
CREATE FUNCTION pgtasks.job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    notify boolean := pgtasks.notify_enabled();
BEGIN
    FOR r IN
        SELECT n.queue,
               q.name IS NULL AS unknown,
               bool_or(n.state IN ('created', 'retry') AND n.run_at <= now()) AS due,
               bool_or(n.state IN ('created', 'retry') AND n.run_at > now()) AS scheduled
          FROM new_jobs n
          LEFT JOIN pgtasks.queue q ON q.name = n.queue
         GROUP BY n.queue, q.name
    LOOP
        IF r.unknown THEN
            RAISE EXCEPTION 'pgtasks: unknown queue "%"', r.queue
                USING ERRCODE = 'foreign_key_violation',
                      HINT = 'Declare the queue in the pgtasks config or INSERT it into pgtasks.queue first.';
        END IF;
        IF notify AND r.due THEN
            PERFORM pg_notify('pgtasks.' || r.queue, '');
        END IF;
        IF notify AND r.scheduled THEN
            PERFORM pg_notify('pgtasks.' || r.queue, 'scheduled');
        END IF;
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER job_inserted
    AFTER INSERT ON pgtasks.job
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION pgtasks.job_inserted();

-- A job that becomes available again by UPDATE (retry, resume, release,
-- rescue) wakes its queue. Row-level with a WHEN clause so claims and
-- completions, the hot updates, never call the function.
CREATE FUNCTION pgtasks.job_available_again() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF pgtasks.notify_enabled() THEN
        PERFORM pg_notify('pgtasks.' || NEW.queue,
                          CASE WHEN NEW.run_at <= now() THEN '' ELSE 'scheduled' END);
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER job_available_again
    AFTER UPDATE OF state ON pgtasks.job
    FOR EACH ROW
    WHEN (NEW.state IN ('created', 'retry') AND OLD.state NOT IN ('created', 'retry'))
    EXECUTE FUNCTION pgtasks.job_available_again();

-- Records one failed attempt per (id, attempt) pair that is still active:
-- retry with the queue's delay (doubling per attempt when retry_backoff,
-- capped at retry_delay_max) until max attempts, then 'failed', and a copy
-- with its error history into the queue's dead-letter queue when it has one.
-- A pair whose job has moved on (completed, rescued, re-claimed) is ignored.
CREATE FUNCTION pgtasks.fail_jobs(ids bigint[], attempts integer[], messages text[])
RETURNS TABLE (id bigint, state pgtasks.job_state, run_at timestamptz)
LANGUAGE sql AS $fn$
    WITH failure AS (
        SELECT f.id, f.attempt, f.message
          FROM unnest(ids, attempts, messages) AS f(id, attempt, message)
    ), decided AS (
        SELECT j.id, f.message, q.dead_letter,
               j.attempt >= coalesce(j.max_attempts, q.retry_limit + 1) AS exhausted,
               least(
                   CASE WHEN q.retry_backoff
                        THEN q.retry_delay * power(2, least(j.attempt - 1, 30))
                        ELSE q.retry_delay END,
                   q.retry_delay_max) AS delay
          FROM failure f
          JOIN pgtasks.job j ON j.id = f.id AND j.attempt = f.attempt AND j.state = 'active'
          JOIN pgtasks.queue q ON q.name = j.queue
           FOR UPDATE OF j
    ), updated AS (
        UPDATE pgtasks.job j
           SET state = CASE WHEN d.exhausted THEN 'failed' ELSE 'retry' END::pgtasks.job_state,
               run_at = CASE WHEN d.exhausted THEN j.run_at ELSE now() + d.delay END,
               completed_at = CASE WHEN d.exhausted THEN now() END,
               lease_until = NULL,
               last_error = d.message,
               errors = coalesce(j.errors, '[]'::jsonb)
                        || jsonb_build_array(jsonb_build_object(
                               'attempt', j.attempt, 'at', now(), 'error', d.message))
          FROM decided d
         WHERE j.id = d.id
        RETURNING j.id, j.state, j.run_at, j.queue, j.data, j.priority, j.singleton_key,
                  j.last_error, j.errors, d.exhausted, d.dead_letter
    ), dead_lettered AS (
        INSERT INTO pgtasks.job (queue, data, priority, singleton_key, last_error, errors)
        SELECT u.dead_letter, u.data, u.priority, u.singleton_key, u.last_error,
               u.errors || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'error', 'dead-lettered from ' || u.queue || ' job ' || u.id))
          FROM updated u
         WHERE u.exhausted AND u.dead_letter IS NOT NULL
    )
    SELECT u.id, u.state, u.run_at FROM updated u
$fn$;

INSERT INTO pgtasks.schema_version (version) VALUES (1);
END
$step$;

-- Step 2: per-attempt retry decisions. A handler may ask for a retry no
-- sooner than a delay (an HTTP Retry-After) or for no retry at all (a
-- permanent error). The three-argument fail_jobs keeps its meaning and now
-- delegates, so the policy stays in one place.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 2) THEN
    RETURN;
END IF;

-- As the three-argument form, plus per pair: not_before (NULL: the queue's
-- delay; else at least this long, still capped at retry_delay_max) and
-- final_attempts (true: fail now, whatever attempts remain; NULL is false).
CREATE FUNCTION pgtasks.fail_jobs(ids bigint[], attempts integer[], messages text[],
                                  not_before interval[], final_attempts boolean[])
RETURNS TABLE (id bigint, state pgtasks.job_state, run_at timestamptz)
LANGUAGE sql AS $fn$
    WITH failure AS (
        SELECT f.id, f.attempt, f.message, f.not_before, f.final_attempt
          FROM unnest(ids, attempts, messages, not_before, final_attempts)
               AS f(id, attempt, message, not_before, final_attempt)
    ), decided AS (
        SELECT j.id, f.message, q.dead_letter,
               j.attempt >= coalesce(j.max_attempts, q.retry_limit + 1)
                   OR coalesce(f.final_attempt, false) AS exhausted,
               least(
                   greatest(
                       CASE WHEN q.retry_backoff
                            THEN q.retry_delay * power(2, least(j.attempt - 1, 30))
                            ELSE q.retry_delay END,
                       coalesce(f.not_before, interval '0')),
                   q.retry_delay_max) AS delay
          FROM failure f
          JOIN pgtasks.job j ON j.id = f.id AND j.attempt = f.attempt AND j.state = 'active'
          JOIN pgtasks.queue q ON q.name = j.queue
           FOR UPDATE OF j
    ), updated AS (
        UPDATE pgtasks.job j
           SET state = CASE WHEN d.exhausted THEN 'failed' ELSE 'retry' END::pgtasks.job_state,
               run_at = CASE WHEN d.exhausted THEN j.run_at ELSE now() + d.delay END,
               completed_at = CASE WHEN d.exhausted THEN now() END,
               lease_until = NULL,
               last_error = d.message,
               errors = coalesce(j.errors, '[]'::jsonb)
                        || jsonb_build_array(jsonb_build_object(
                               'attempt', j.attempt, 'at', now(), 'error', d.message))
          FROM decided d
         WHERE j.id = d.id
        RETURNING j.id, j.state, j.run_at, j.queue, j.data, j.priority, j.singleton_key,
                  j.last_error, j.errors, d.exhausted, d.dead_letter
    ), dead_lettered AS (
        INSERT INTO pgtasks.job (queue, data, priority, singleton_key, last_error, errors)
        SELECT u.dead_letter, u.data, u.priority, u.singleton_key, u.last_error,
               u.errors || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'error', 'dead-lettered from ' || u.queue || ' job ' || u.id))
          FROM updated u
         WHERE u.exhausted AND u.dead_letter IS NOT NULL
    )
    SELECT u.id, u.state, u.run_at FROM updated u
$fn$;

-- The rescuer and older workers call this form: the queue's policy alone.
CREATE OR REPLACE FUNCTION pgtasks.fail_jobs(ids bigint[], attempts integer[], messages text[])
RETURNS TABLE (id bigint, state pgtasks.job_state, run_at timestamptz)
LANGUAGE sql AS $fn$
    SELECT * FROM pgtasks.fail_jobs(ids, attempts, messages, NULL::interval[], NULL::boolean[])
$fn$;

INSERT INTO pgtasks.schema_version (version) VALUES (2);
END
$step$;

COMMIT;
