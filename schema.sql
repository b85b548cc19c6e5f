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
DO $lock$ BEGIN PERFORM pg_advisory_xact_lock(hashtext('pgtasks.schema')); END $lock$;

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
-- delegates, so the policy stays in one place. Dead letters record their origin.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 2) THEN
    RETURN;
END IF;

-- Dead letters remember where they came from, so they can be redriven.
ALTER TABLE pgtasks.job
    ADD COLUMN dead_letter_of bigint,
    ADD COLUMN dead_letter_from text;

-- As the three-argument form, plus per pair: not_before (NULL: the queue's
-- delay; else at least this long, still capped at retry_delay_max) and
-- final_attempts (true: fail now, whatever attempts remain; NULL is false).
-- The dead-letter copy does not carry the singleton key: it is a new job in
-- another queue.
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
        INSERT INTO pgtasks.job (queue, data, priority, last_error, errors,
                                 dead_letter_of, dead_letter_from)
        SELECT u.dead_letter, u.data, u.priority, u.last_error,
               u.errors || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'error', 'dead-lettered from ' || u.queue || ' job ' || u.id)),
               u.id, u.queue
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

-- Step 3: queue features. Singleton and throttle keys, progress, cancel
-- signals, pause/resume wakeups, job and queue functions for SQL users, cron
-- schedules.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 3) THEN
    RETURN;
END IF;

ALTER TABLE pgtasks.job
    -- The throttle slot (start of the singleton_seconds window) for keyed jobs.
    ADD COLUMN singleton_on timestamptz,
    -- {"percent": n, "message": text, "at": timestamp} from the running handler.
    ADD COLUMN progress jsonb,
    ADD CONSTRAINT job_singleton_on_needs_key CHECK (singleton_on IS NULL OR singleton_key IS NOT NULL);

-- At most one queued job per (queue, singleton_key)...
CREATE UNIQUE INDEX job_singleton_queued_idx ON pgtasks.job (queue, singleton_key)
    WHERE singleton_key IS NOT NULL AND state = 'created';
-- ...and with a throttle, at most one job per key per time slot, whatever its state.
CREATE UNIQUE INDEX job_singleton_slot_idx ON pgtasks.job (queue, singleton_key, singleton_on)
    WHERE singleton_on IS NOT NULL;

-- Submits one job with options; the SQL way to do what the API does.
-- With a singleton_key, a second submit while one is queued (or, with
-- singleton_seconds, within the same slot) returns the existing job's id
-- and duplicate = true instead of inserting.
CREATE FUNCTION pgtasks.send(
    queue text,
    data jsonb DEFAULT '{}',
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT NULL,
    delay interval DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    singleton_key text DEFAULT NULL,
    singleton_seconds integer DEFAULT NULL,
    OUT id bigint, OUT duplicate boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    slot timestamptz;
BEGIN
    IF singleton_seconds IS NOT NULL THEN
        IF singleton_key IS NULL THEN
            RAISE EXCEPTION 'pgtasks.send: singleton_seconds needs a singleton_key'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF singleton_seconds < 1 THEN
            RAISE EXCEPTION 'pgtasks.send: singleton_seconds must be at least 1'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        slot := to_timestamp(floor(extract(epoch FROM now()) / singleton_seconds) * singleton_seconds);
    END IF;
    LOOP
        INSERT INTO pgtasks.job AS j (queue, data, priority, run_at, max_attempts, singleton_key, singleton_on)
        VALUES (send.queue, coalesce(send.data, '{}'), coalesce(send.priority, 0),
                coalesce(send.run_at, now() + send.delay, now()), send.max_attempts,
                send.singleton_key, slot)
        ON CONFLICT DO NOTHING
        RETURNING j.id INTO id;
        IF id IS NOT NULL THEN
            duplicate := false;
            RETURN;
        END IF;
        SELECT j.id INTO id FROM pgtasks.job j
         WHERE j.queue = send.queue AND j.singleton_key = send.singleton_key
           AND (j.state = 'created' OR j.singleton_on = slot)
         ORDER BY j.id LIMIT 1;
        IF id IS NOT NULL THEN
            duplicate := true;
            RETURN;
        END IF;
        -- The conflicting job moved on between the two statements: try again.
    END LOOP;
END
$fn$;

-- Submits many jobs to one queue in one statement (one notification).
CREATE FUNCTION pgtasks.send_batch(queue text, data jsonb[])
RETURNS SETOF bigint
LANGUAGE sql AS $fn$
    INSERT INTO pgtasks.job (queue, data)
    SELECT send_batch.queue, d FROM unnest(send_batch.data) WITH ORDINALITY AS u(d, n) ORDER BY n
    RETURNING id
$fn$;

-- Cancels a waiting or running job; returns the state it was in (NULL when
-- there is no such job). A running attempt is told to stop.
CREATE FUNCTION pgtasks.cancel_job(job_id bigint) RETURNS pgtasks.job_state
LANGUAGE plpgsql AS $fn$
DECLARE
    previous pgtasks.job_state;
BEGIN
    SELECT state INTO previous FROM pgtasks.job WHERE id = job_id FOR UPDATE;
    IF previous IN ('created', 'retry', 'active') THEN
        UPDATE pgtasks.job SET state = 'cancelled', completed_at = now(), lease_until = NULL
         WHERE id = job_id;
        PERFORM pg_notify('pgtasks:done', job_id::text);
    END IF;
    RETURN previous;
END
$fn$;

-- Makes a cancelled job wait again (due now at the latest); returns the
-- state it was in.
CREATE FUNCTION pgtasks.resume_job(job_id bigint) RETURNS pgtasks.job_state
LANGUAGE plpgsql AS $fn$
DECLARE
    previous pgtasks.job_state;
BEGIN
    SELECT state INTO previous FROM pgtasks.job WHERE id = job_id FOR UPDATE;
    IF previous = 'cancelled' THEN
        UPDATE pgtasks.job
           SET state = CASE WHEN attempt = 0 THEN 'created' ELSE 'retry' END::pgtasks.job_state,
               completed_at = NULL, run_at = least(run_at, now())
         WHERE id = job_id;
    END IF;
    RETURN previous;
END
$fn$;

-- Gives a failed job one more attempt, due now; returns the state it was in.
CREATE FUNCTION pgtasks.retry_job(job_id bigint) RETURNS pgtasks.job_state
LANGUAGE plpgsql AS $fn$
DECLARE
    previous pgtasks.job_state;
BEGIN
    SELECT state INTO previous FROM pgtasks.job WHERE id = job_id FOR UPDATE;
    IF previous = 'failed' THEN
        UPDATE pgtasks.job j
           SET state = 'retry', run_at = now(), completed_at = NULL,
               max_attempts = greatest(coalesce(j.max_attempts, q.retry_limit + 1), j.attempt + 1)
          FROM pgtasks.queue q
         WHERE j.id = job_id AND q.name = j.queue;
    END IF;
    RETURN previous;
END
$fn$;

-- A running job that is cancelled: tell its worker (any instance) to stop it.
-- The channel is outside the queue namespace (queue names have no ':').
CREATE FUNCTION pgtasks.job_cancelled() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgtasks:cancel', NEW.id::text);
    RETURN NULL;
END
$fn$;

CREATE TRIGGER job_cancelled
    AFTER UPDATE OF state ON pgtasks.job
    FOR EACH ROW
    WHEN (OLD.state = 'active' AND NEW.state = 'cancelled')
    EXECUTE FUNCTION pgtasks.job_cancelled();

-- Records a running handler's progress; false when the attempt is no longer current.
CREATE FUNCTION pgtasks.report_progress(job_id bigint, job_attempt integer, percent numeric, message text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH changed AS (
        UPDATE pgtasks.job
           SET progress = jsonb_build_object('percent', least(greatest(percent, 0), 100),
                                             'message', message, 'at', now())
         WHERE id = job_id AND attempt = job_attempt AND state = 'active'
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM changed)
$fn$;

-- Pausing keeps a queue accepting jobs but stops every instance claiming them.
CREATE FUNCTION pgtasks.pause_queue(queue_name text) RETURNS boolean
LANGUAGE sql AS $fn$
    WITH changed AS (UPDATE pgtasks.queue SET paused = true, updated_at = now()
                      WHERE name = queue_name RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM changed)
$fn$;

CREATE FUNCTION pgtasks.resume_queue(queue_name text) RETURNS boolean
LANGUAGE sql AS $fn$
    WITH changed AS (UPDATE pgtasks.queue SET paused = false, updated_at = now()
                      WHERE name = queue_name RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM changed)
$fn$;

-- Resuming wakes the queue's workers everywhere.
CREATE FUNCTION pgtasks.queue_resumed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgtasks.' || NEW.name, '');
    RETURN NULL;
END
$fn$;

CREATE TRIGGER queue_resumed
    AFTER UPDATE OF paused ON pgtasks.queue
    FOR EACH ROW
    WHEN (OLD.paused AND NOT NEW.paused)
    EXECUTE FUNCTION pgtasks.queue_resumed();

-- Moves up to max_jobs waiting dead letters of a dead-letter queue back to
-- the queues they came from, as fresh jobs (attempts reset, history kept),
-- and wakes those queues. Returns how many moved.
CREATE FUNCTION pgtasks.redrive(dead_letter_queue text, max_jobs integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    moved integer;
    origins text[];
    origin text;
BEGIN
    WITH picked AS (
        SELECT id FROM pgtasks.job
         WHERE queue = dead_letter_queue AND state IN ('created', 'retry')
           AND dead_letter_from IS NOT NULL
         ORDER BY id
         LIMIT max_jobs
           FOR UPDATE SKIP LOCKED
    ), moved_rows AS (
        UPDATE pgtasks.job j
           SET queue = j.dead_letter_from, state = 'created', attempt = 0, max_attempts = NULL,
               run_at = now(), dead_letter_from = NULL,
               errors = coalesce(j.errors, '[]'::jsonb) || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'error', 'redriven from ' || dead_letter_queue))
          FROM picked
         WHERE j.id = picked.id
        RETURNING j.queue
    )
    SELECT count(*), array_agg(DISTINCT queue) INTO moved, origins FROM moved_rows;
    FOREACH origin IN ARRAY coalesce(origins, '{}') LOOP
        PERFORM pg_notify('pgtasks.' || origin, '');
    END LOOP;
    RETURN moved;
END
$fn$;

-- Cron schedules. The maintenance leader enqueues each due run once: the job
-- carries singleton_key 'schedule:<name>' and singleton_on = the scheduled
-- time, so even two leaders racing cannot enqueue a run twice.
CREATE TABLE pgtasks.schedule (
    name        text        PRIMARY KEY,
    -- Five fields (minute hour day month weekday) or six with seconds first.
    cron        text        NOT NULL,
    -- IANA zone the expression is read in.
    timezone    text        NOT NULL DEFAULT 'UTC',
    queue       text        NOT NULL REFERENCES pgtasks.queue (name) ON DELETE CASCADE,
    data        jsonb       NOT NULL DEFAULT '{}',
    priority    integer     NOT NULL DEFAULT 0,
    max_attempts integer,
    enabled     boolean     NOT NULL DEFAULT true,
    -- Computed by the leader; NULL = compute from now.
    next_run_at timestamptz,
    last_run_at timestamptz,
    last_job_id bigint,
    -- Why the leader could not use this schedule (bad expression or zone).
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedule_name_valid CHECK (name ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    CONSTRAINT schedule_data_must_be_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT schedule_max_attempts_positive CHECK (max_attempts IS NULL OR max_attempts >= 1)
);
CREATE INDEX schedule_due_idx ON pgtasks.schedule (next_run_at) WHERE enabled;

-- A changed expression or zone is re-read by the leader.
CREATE FUNCTION pgtasks.schedule_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.cron IS DISTINCT FROM OLD.cron OR NEW.timezone IS DISTINCT FROM OLD.timezone
       OR (NEW.enabled AND NOT OLD.enabled) THEN
        NEW.next_run_at := NULL;
        NEW.last_error := NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$fn$;

CREATE TRIGGER schedule_changed
    BEFORE UPDATE ON pgtasks.schedule
    FOR EACH ROW
    WHEN (NEW.cron IS DISTINCT FROM OLD.cron OR NEW.timezone IS DISTINCT FROM OLD.timezone
          OR NEW.enabled IS DISTINCT FROM OLD.enabled)
    EXECUTE FUNCTION pgtasks.schedule_changed();

INSERT INTO pgtasks.schema_version (version) VALUES (3);
END
$step$;

-- Step 4: notify only while a worker waits, a leaner job table, and queue
-- policies.
--
-- Notify only while a worker waits. A transaction that has sent a
-- NOTIFY holds a cluster-wide lock through its commit's WAL flush, so if
-- every insert notified, concurrent enqueues would commit one at a time.
-- Instead a worker about to sleep records itself in queue_waiter, and the
-- triggers notify only when a live waiter exists.
--
-- The race (an insert reads "no waiter" just before a worker records itself,
-- then commits just after the worker's last look at the queue) is closed
-- with a per-queue advisory lock: triggers hold it shared from before they
-- read queue_waiter until their transaction ends; the worker, after
-- recording itself, takes it exclusively without waiting
-- (worker_waiting() returns whether it could). Once it could, every insert
-- that might have missed the record has committed, so the worker's next
-- claim sees it; any later insert sees the record and notifies.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 4) THEN
    RETURN;
END IF;

-- One row per (queue, worker); live while expires_at is ahead. A worker
-- that wakes sets it to now(); a crashed worker's row simply expires.
CREATE TABLE pgtasks.queue_waiter (
    queue      text        NOT NULL,
    worker     bigint      NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, worker)
) WITH (fillfactor = 50);

-- The advisory lock key of a queue's waiters.
CREATE FUNCTION pgtasks.waiter_lock_key(queue text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT (hashtext('pgtasks.queue_waiter')::bigint << 32) | (hashtext(queue)::bigint & 4294967295)
$fn$;

-- Sends the queue's wakeup if a worker waits: '' for due work, 'scheduled'
-- for work due later. Outside READ COMMITTED the transaction's snapshot may
-- predate a waiter's record, so it always notifies.
CREATE FUNCTION pgtasks.notify_waiters(queue text, due boolean, scheduled boolean)
RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT (due OR scheduled) THEN
        RETURN;
    END IF;
    IF current_setting('transaction_isolation') = 'read committed' THEN
        -- Lock first, then read (a fresh snapshot per statement).
        PERFORM pg_advisory_xact_lock_shared(pgtasks.waiter_lock_key(notify_waiters.queue));
        IF NOT EXISTS (SELECT 1 FROM pgtasks.queue_waiter w
                        WHERE w.queue = notify_waiters.queue AND w.expires_at > now()) THEN
            RETURN;
        END IF;
    END IF;
    IF due THEN
        PERFORM pg_notify('pgtasks.' || queue, '');
    END IF;
    IF scheduled THEN
        PERFORM pg_notify('pgtasks.' || queue, 'scheduled');
    END IF;
END
$fn$;

-- True when no insert that could have missed a waiting record is in flight
-- (none holds the queue's lock shared). Takes the lock exclusively without
-- waiting, until the end of the transaction.
CREATE FUNCTION pgtasks.waiters_settled(queue text) RETURNS boolean
LANGUAGE sql AS $fn$
    SELECT pg_try_advisory_xact_lock(pgtasks.waiter_lock_key(waiters_settled.queue));
$fn$;

-- A worker about to sleep: records itself until now() + lifetime, then
-- returns true when no insert that could have missed the record is still
-- in flight (the worker then looks at the queue once more and sleeps),
-- false when one is (the worker asks again shortly).
CREATE FUNCTION pgtasks.worker_waiting(queue text, worker bigint, lifetime interval)
RETURNS boolean
LANGUAGE sql AS $fn$
    INSERT INTO pgtasks.queue_waiter (queue, worker, expires_at)
    VALUES (worker_waiting.queue, worker_waiting.worker, now() + worker_waiting.lifetime)
    ON CONFLICT (queue, worker) DO UPDATE SET expires_at = EXCLUDED.expires_at;
    SELECT pgtasks.waiters_settled(worker_waiting.queue);
$fn$;

CREATE OR REPLACE FUNCTION pgtasks.job_available_again() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF pgtasks.notify_enabled() THEN
        PERFORM pgtasks.notify_waiters(NEW.queue, NEW.run_at <= now(), NEW.run_at > now());
    END IF;
    RETURN NULL;
END
$fn$;

-- Running jobs are found by lease for the rescuer, with a predicate on the
-- lease itself (NULL unless active) rather than on state: completions and
-- failures, which select `state = 'active'` rows by id, then use the primary
-- key instead of walking this index, whose front fills with entries of
-- finished jobs until vacuum (a drain of 100,000 jobs slowed down steadily).
CREATE INDEX job_leased_idx ON pgtasks.job (lease_until) WHERE lease_until IS NOT NULL;
DROP INDEX pgtasks.job_active_lease_idx;
-- Every insert paid for an entry here; the worker's timer now finds the next
-- run_at on the claim index (a skip scan over the queue's priorities).
DROP INDEX pgtasks.job_waiting_run_at_idx;
-- The table churns (every job is inserted, claimed, finished, deleted):
-- vacuum and analyze it sooner than the stock 20% / 10% of its rows.
ALTER TABLE pgtasks.job SET (autovacuum_vacuum_scale_factor = 0.02,
                            autovacuum_vacuum_insert_scale_factor = 0.05,
                            autovacuum_analyze_scale_factor = 0.02);

-- Tells waiting API requests (`?wait=`, any instance) that jobs finished:
-- comma-separated ids on pgtasks:done, 300 per payload (under the 8000-byte
-- limit). Called inside the statement that finishes them, so it costs no
-- extra round trip. Returns the notifications sent.
CREATE FUNCTION pgtasks.notify_done(ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := coalesce(cardinality(ids), 0);
    i integer := 1;
BEGIN
    -- Plain expressions only (a SQL function would be planned on every call).
    WHILE i <= n LOOP
        PERFORM pg_notify('pgtasks:done', array_to_string(ids[i:i + 299], ','));
        i := i + 300;
    END LOOP;
    RETURN (n + 299) / 300;
END
$fn$;

-- Queue policies, as pg-boss has them, enforced by unique indexes so
-- they hold across any number of instances:
--   standard   no limit
--   short      at most one job queued ('created') per key
--   singleton  at most one job active per key
--   stately    at most one job per key in each of created, retry, active
--   exclusive  at most one job queued or active per key
-- "Per key" is per singleton_key, all jobs without one sharing a key.

ALTER TABLE pgtasks.queue
    ADD COLUMN policy text NOT NULL DEFAULT 'standard',
    ADD CONSTRAINT queue_policy_known
        CHECK (policy IN ('standard', 'short', 'singleton', 'stately', 'exclusive'));
-- A job's copy of its queue's policy when it was inserted (NULL: standard);
-- the indexes below need it on the row.
ALTER TABLE pgtasks.job ADD COLUMN policy text;

-- In a queue with a policy the key groups jobs for the policy; the step 3
-- rule (one queued job per key) stays for standard queues.
DROP INDEX pgtasks.job_singleton_queued_idx;
CREATE UNIQUE INDEX job_singleton_queued_idx ON pgtasks.job (queue, singleton_key)
    WHERE singleton_key IS NOT NULL AND state = 'created' AND policy IS NULL;

-- Keyed rows carry their policy from the start, so the index above knows
-- them at insert time. Keyed jobs are few (and sent one by one), so a row
-- trigger limited to them costs the bulk path nothing.
CREATE FUNCTION pgtasks.job_keyed_policy() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    SELECT nullif(q.policy, 'standard') INTO NEW.policy FROM pgtasks.queue q WHERE q.name = NEW.queue;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER job_keyed_policy
    BEFORE INSERT ON pgtasks.job
    FOR EACH ROW
    WHEN (NEW.singleton_key IS NOT NULL)
    EXECUTE FUNCTION pgtasks.job_keyed_policy();

CREATE UNIQUE INDEX job_policy_short_idx ON pgtasks.job (queue, coalesce(singleton_key, ''))
    WHERE policy = 'short' AND state = 'created';
CREATE UNIQUE INDEX job_policy_singleton_idx ON pgtasks.job (queue, coalesce(singleton_key, ''))
    WHERE policy = 'singleton' AND state = 'active';
CREATE UNIQUE INDEX job_policy_stately_idx ON pgtasks.job (queue, state, coalesce(singleton_key, ''))
    WHERE policy = 'stately' AND state IN ('created', 'retry', 'active');
CREATE UNIQUE INDEX job_policy_exclusive_idx ON pgtasks.job (queue, coalesce(singleton_key, ''))
    WHERE policy = 'exclusive' AND state IN ('created', 'retry', 'active');

-- The insert trigger again. It runs for every INSERT statement, so each
-- query in it costs every producer: one grouped read of the new rows, then
-- per queue one lookup answering both "which policy has the queue (does it
-- exist)" and "does a worker wait" (after the shared lock, so that read sees
-- any settled record). It stamps the policy on rows of queues that have one
-- (standard queues, the common case, pay nothing more), and turns an index
-- conflict into an error that names the policy.
CREATE OR REPLACE FUNCTION pgtasks.job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    notify boolean := pgtasks.notify_enabled();
    trust_snapshot boolean := current_setting('transaction_isolation') = 'read committed';
    locked text;
    queue_policy text;
    waiting boolean;
BEGIN
    FOR r IN
        SELECT n.queue,
               bool_or(n.state IN ('created', 'retry') AND n.run_at <= now()) AS due,
               bool_or(n.state IN ('created', 'retry') AND n.run_at > now()) AS scheduled
          FROM new_jobs n
         GROUP BY n.queue
    LOOP
        IF notify AND trust_snapshot AND (r.due OR r.scheduled) THEN
            -- An assignment, not PERFORM: evaluated without a query.
            locked := pg_advisory_xact_lock_shared(pgtasks.waiter_lock_key(r.queue));
        END IF;
        SELECT (SELECT q.policy FROM pgtasks.queue q WHERE q.name = r.queue),
               EXISTS (SELECT 1 FROM pgtasks.queue_waiter w
                        WHERE w.queue = r.queue AND w.expires_at > now())
          INTO queue_policy, waiting;
        IF queue_policy IS NULL THEN
            RAISE EXCEPTION 'pgtasks: unknown queue "%"', r.queue
                USING ERRCODE = 'foreign_key_violation',
                      HINT = 'Declare the queue in the pgtasks config or INSERT it into pgtasks.queue first.';
        END IF;
        IF queue_policy <> 'standard' THEN
            BEGIN
                UPDATE pgtasks.job j SET policy = queue_policy
                 WHERE j.id IN (SELECT n.id FROM new_jobs n
                                 WHERE n.queue = r.queue AND n.policy IS NULL);
            EXCEPTION WHEN unique_violation THEN
                RAISE EXCEPTION 'pgtasks: queue "%" has policy %: %', r.queue, queue_policy,
                    CASE queue_policy
                        WHEN 'short' THEN 'a job with this key is already queued'
                        WHEN 'exclusive' THEN 'a job with this key is already queued or running'
                        ELSE 'a job with this key is already in that state' END
                    USING ERRCODE = 'unique_violation',
                          HINT = 'pgtasks.send() and the HTTP API return the existing job instead.';
            END;
        END IF;
        IF notify AND (waiting OR NOT trust_snapshot) THEN
            IF r.due THEN
                PERFORM pg_notify('pgtasks.' || r.queue, '');
            END IF;
            IF r.scheduled THEN
                PERFORM pg_notify('pgtasks.' || r.queue, 'scheduled');
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END
$fn$;

-- The job a policy conflict is about: the one holding the key's place.
CREATE FUNCTION pgtasks.policy_holder(queue text, singleton_key text) RETURNS bigint
LANGUAGE sql STABLE AS $fn$
    SELECT j.id FROM pgtasks.job j
     WHERE j.queue = policy_holder.queue AND j.policy IS NOT NULL
       AND coalesce(j.singleton_key, '') = coalesce(policy_holder.singleton_key, '')
       AND j.state IN ('created', 'retry', 'active')
     ORDER BY j.state = 'created' DESC, j.id
     LIMIT 1
$fn$;

-- send() as in step 3, and a policy conflict returns the job holding the
-- key's place with duplicate = true, as a singleton key does.
CREATE OR REPLACE FUNCTION pgtasks.send(
    queue text,
    data jsonb DEFAULT '{}',
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT NULL,
    delay interval DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    singleton_key text DEFAULT NULL,
    singleton_seconds integer DEFAULT NULL,
    OUT id bigint, OUT duplicate boolean)
LANGUAGE plpgsql AS $fn$
DECLARE
    slot timestamptz;
BEGIN
    IF singleton_seconds IS NOT NULL THEN
        IF singleton_key IS NULL THEN
            RAISE EXCEPTION 'pgtasks.send: singleton_seconds needs a singleton_key'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF singleton_seconds < 1 THEN
            RAISE EXCEPTION 'pgtasks.send: singleton_seconds must be at least 1'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        slot := to_timestamp(floor(extract(epoch FROM now()) / singleton_seconds) * singleton_seconds);
    END IF;
    LOOP
        BEGIN
            INSERT INTO pgtasks.job AS j (queue, data, priority, run_at, max_attempts, singleton_key, singleton_on)
            VALUES (send.queue, coalesce(send.data, '{}'), coalesce(send.priority, 0),
                    coalesce(send.run_at, now() + send.delay, now()), send.max_attempts,
                    send.singleton_key, slot)
            ON CONFLICT DO NOTHING
            RETURNING j.id INTO id;
        EXCEPTION WHEN unique_violation THEN
            -- Raised by the insert trigger: the queue's policy refused it.
            id := pgtasks.policy_holder(send.queue, send.singleton_key);
            IF id IS NOT NULL THEN
                duplicate := true;
                RETURN;
            END IF;
            CONTINUE;
        END;
        IF id IS NOT NULL THEN
            duplicate := false;
            RETURN;
        END IF;
        SELECT j.id INTO id FROM pgtasks.job j
         WHERE j.queue = send.queue AND j.singleton_key = send.singleton_key
           AND ((j.state = 'created' AND j.policy IS NULL) OR j.singleton_on = slot)
         ORDER BY j.id LIMIT 1;
        id := coalesce(id, pgtasks.policy_holder(send.queue, send.singleton_key));
        IF id IS NOT NULL THEN
            duplicate := true;
            RETURN;
        END IF;
        -- The conflicting job moved on between the two statements: try again.
    END LOOP;
END
$fn$;

-- fail_jobs as in step 2, and in a stately queue a failure whose key already
-- has a job waiting to retry fails for good (dead-lettered if the queue has a
-- dead-letter queue) instead of breaking the one-per-state rule.
CREATE OR REPLACE FUNCTION pgtasks.fail_jobs(ids bigint[], attempts integer[], messages text[],
                                  not_before interval[], final_attempts boolean[])
RETURNS TABLE (id bigint, state pgtasks.job_state, run_at timestamptz)
LANGUAGE sql AS $fn$
    WITH failure AS (
        SELECT f.id, f.attempt, f.message, f.not_before, f.final_attempt
          FROM unnest(ids, attempts, messages, not_before, final_attempts)
               AS f(id, attempt, message, not_before, final_attempt)
    ), decided AS (
        SELECT j.id, q.dead_letter,
               CASE WHEN s.blocked
                    THEN f.message || ' (not retried: policy stately, and another job with this key already waits to retry)'
                    ELSE f.message END AS message,
               j.attempt >= coalesce(j.max_attempts, q.retry_limit + 1)
                   OR coalesce(f.final_attempt, false) OR s.blocked AS exhausted,
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
          CROSS JOIN LATERAL (
              SELECT j.policy = 'stately' AND EXISTS (
                         SELECT 1 FROM pgtasks.job r
                          WHERE r.policy = 'stately' AND r.state = 'retry' AND r.queue = j.queue
                            AND coalesce(r.singleton_key, '') = coalesce(j.singleton_key, '')
                            AND r.id <> j.id) AS blocked) s
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
        INSERT INTO pgtasks.job (queue, data, priority, last_error, errors,
                                 dead_letter_of, dead_letter_from)
        SELECT u.dead_letter, u.data, u.priority, u.last_error,
               u.errors || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'error', 'dead-lettered from ' || u.queue || ' job ' || u.id)),
               u.id, u.queue
          FROM updated u
         WHERE u.exhausted AND u.dead_letter IS NOT NULL
    )
    SELECT u.id, u.state, u.run_at FROM updated u
$fn$;

INSERT INTO pgtasks.schema_version (version) VALUES (4);
END
$step$;

-- Step 5: the four unique indexes of the queue policies become one.
--
-- Every insert opened each of them and prepared its predicate, though a row
-- of a standard queue (policy NULL) enters none: one index instead of four
-- took 8-client single-row inserts from 7.7-9.3k to 8.1-10.6k a second.
-- Lookups by (queue, key) with a `policy = ...` and `state` test, as in
-- policy_holder, fail_jobs and the one-per-key claim, use it as before.
-- On an existing install the build reads the whole table once, holding off
-- writes to it meanwhile.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 5) THEN
    RETURN;
END IF;

-- The place a job takes among its key's under the queue's policy, NULL for
-- none; two jobs of a key may not take the same place. Worded so that the
-- error of a refused plain INSERT says which rule refused it.
CREATE FUNCTION pgtasks.policy_place(policy text, state pgtasks.job_state) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE policy
        WHEN 'short' THEN CASE WHEN state = 'created' THEN 'short: the queued job' END
        WHEN 'singleton' THEN CASE WHEN state = 'active' THEN 'singleton: the running job' END
        WHEN 'stately' THEN 'stately: the ' || CASE state
            WHEN 'created' THEN 'queued' WHEN 'retry' THEN 'retrying' ELSE 'running' END || ' job'
        WHEN 'exclusive' THEN 'exclusive: the queued or running job'
    END
$fn$;

CREATE UNIQUE INDEX job_policy_idx
    ON pgtasks.job (queue, coalesce(singleton_key, ''), pgtasks.policy_place(policy, state))
    WHERE policy IS NOT NULL AND state IN ('created', 'retry', 'active');
DROP INDEX pgtasks.job_policy_short_idx, pgtasks.job_policy_singleton_idx,
           pgtasks.job_policy_stately_idx, pgtasks.job_policy_exclusive_idx;

INSERT INTO pgtasks.schema_version (version) VALUES (5);
END
$step$;

-- Step 6: an insert decides whether to notify without running a query.
--
-- Step 4's statement trigger ran two queries per INSERT (the new rows by
-- queue, then the queue and its waiters) and cost 8 concurrent single-row
-- producers ~40% of their rate. Now one BEFORE row trigger, whose WHEN
-- clause is evaluated in C for each row, calls its function only when
-- there is something to do:
--
-- * The queue is not a known standard queue (the WHEN clause lists those;
--   refresh_job_inserted() rewrites it when the set changes): the function
--   refuses an unknown queue and stamps the policy of a queue that has one
--   on the row (step 4's separate trigger for keyed rows goes).
-- * A worker sleeps on the queue. A sleeping process holds the queue's
--   advisory lock (waiter_lock_key) exclusively; an insert tries it in
--   shared mode. Taken, it is held to the end of the insert's transaction,
--   which is what lets a worker know that nothing it might miss is in
--   flight: its own exclusive request waits until every such insert has
--   committed, and then its last look sees them (inserts meanwhile see the
--   request waiting and notify). Refused, a worker sleeps or is about to:
--   notify.
--
-- The lock is held on a connection each process keeps for it, so that it
-- lasts as long as the sleep and ends with the process. Only one process
-- can hold it; other processes' sleepers rely on it ("covered") and say so
-- by holding a second lock (covered_lock_key) shared. A holder that wakes
-- releases the queue's lock and, when some process relies on it, notifies
-- the queue so that they wake and one of them takes over. (A holder that crashes tells nobody: the others notice
-- within a second, when they check again.)
--
-- pgtasks.queue_waiter, worker_waiting() and waiters_settled() are left in
-- place for processes of the previous release during an upgrade; inserts
-- no longer read them (such a process finds new jobs by its poll).
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 6) THEN
    RETURN;
END IF;

-- The lock the sleepers that rely on another process's hold share.
CREATE FUNCTION pgtasks.covered_lock_key(queue text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT (hashtext('pgtasks.covered')::bigint << 32) | (hashtext(queue)::bigint & 4294967295)
$fn$;

-- For a process's sleep connection, when its worker on `queue` is about to
-- sleep (`covered`: it relied on another process at its last call). Waits
-- up to `wait` for the queue's lock: inserts that took it shared (they
-- found nobody sleeping) must commit first, and meanwhile later inserts
-- see the request and notify. Returns 'holding' (every later insert
-- notifies, and every earlier one has committed), 'covered' (another
-- process holds it; this session now relies on that one) or 'unsettled'
-- (an insert is still in flight after `wait`: ask again shortly).
CREATE FUNCTION pgtasks.sleep_on(queue text, covered boolean, wait interval) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    waiter_key bigint := pgtasks.waiter_lock_key(sleep_on.queue);
    covered_key bigint := pgtasks.covered_lock_key(sleep_on.queue);
BEGIN
    -- Relying first: a holder that lets go after the look below then sees it.
    IF NOT covered THEN
        PERFORM pg_advisory_lock_shared(covered_key);
    END IF;
    PERFORM set_config('lock_timeout', (extract(epoch FROM wait) * 1000)::bigint || 'ms', true);
    BEGIN
        PERFORM pg_advisory_lock(waiter_key);
        PERFORM pg_advisory_unlock_shared(covered_key);
        RETURN 'holding';
    EXCEPTION WHEN lock_not_available THEN
        -- Another process holds it (a shared try fails too), or an insert
        -- that took it shared is still in flight (a shared try succeeds).
        IF NOT pg_try_advisory_lock_shared(waiter_key) THEN
            RETURN 'covered';
        END IF;
        PERFORM pg_advisory_unlock_shared(waiter_key);
        PERFORM pg_advisory_unlock_shared(covered_key);
        RETURN 'unsettled';
    END;
END
$fn$;

-- For the same connection, when that worker wakes: lets go of the queue's
-- lock (`holding`) or of relying on another's. A holder that others rely on
-- notifies the queue so that they wake and take over.
CREATE FUNCTION pgtasks.wake_from(queue text, holding boolean) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    covered_key bigint := pgtasks.covered_lock_key(wake_from.queue);
BEGIN
    IF NOT holding THEN
        PERFORM pg_advisory_unlock_shared(covered_key);
        RETURN;
    END IF;
    PERFORM pg_advisory_unlock(pgtasks.waiter_lock_key(wake_from.queue));
    IF NOT (pg_try_advisory_lock(covered_key) AND pg_advisory_unlock(covered_key)) THEN
        PERFORM pg_notify('pgtasks.' || wake_from.queue, '');
    END IF;
END
$fn$;

-- Wakes the queue if a worker sleeps on it (see above): '' for due work,
-- 'scheduled' for work due later. For updates that make a job available
-- again; an insert does the same in its trigger's WHEN clause.
CREATE OR REPLACE FUNCTION pgtasks.notify_waiters(queue text, due boolean, scheduled boolean)
RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT (due OR scheduled)
       OR pg_try_advisory_xact_lock_shared(pgtasks.waiter_lock_key(notify_waiters.queue)) THEN
        RETURN;
    END IF;
    IF due THEN
        PERFORM pg_notify('pgtasks.' || queue, '');
    END IF;
    IF scheduled THEN
        PERFORM pg_notify('pgtasks.' || queue, 'scheduled');
    END IF;
END
$fn$;

DROP TRIGGER job_inserted ON pgtasks.job;
DROP TRIGGER job_keyed_policy ON pgtasks.job;
DROP FUNCTION pgtasks.job_keyed_policy();
DROP FUNCTION pgtasks.job_inserted();

-- Called for a new row when the WHEN clause below says so: refuses an
-- unknown queue, stamps the queue's policy on the row (a conflict is then
-- the unique index's error, whose detail names the rule), and notifies a
-- sleeping worker. The trigger's arguments are the standard queues, which
-- need no lookup.
CREATE FUNCTION pgtasks.job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    queue_policy text;
BEGIN
    -- (TG_ARGV is NULL when there are no arguments.)
    IF NOT coalesce(NEW.queue = ANY (TG_ARGV), false) THEN
        SELECT q.policy INTO queue_policy FROM pgtasks.queue q WHERE q.name = NEW.queue;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'pgtasks: unknown queue "%"', NEW.queue
                USING ERRCODE = 'foreign_key_violation',
                      HINT = 'Declare the queue in the pgtasks config or INSERT it into pgtasks.queue first.';
        END IF;
        NEW.policy := nullif(queue_policy, 'standard');
    END IF;
    IF NEW.state IN ('created', 'retry') AND pgtasks.notify_enabled() THEN
        PERFORM pgtasks.notify_waiters(NEW.queue, NEW.run_at <= now(), NEW.run_at > now());
    END IF;
    RETURN NEW;
END
$fn$;

-- The standard queues job_inserted's WHEN clause lists (pg_trigger has
-- them too, as the trigger's arguments, but only as bytes).
CREATE TABLE pgtasks.insert_trigger_state (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    standard_queues text[]  NOT NULL
);

-- The standard queues, sorted, as job_inserted's WHEN clause lists them.
CREATE FUNCTION pgtasks.standard_queues() RETURNS text[]
LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(array_agg(q.name ORDER BY q.name), '{}') FROM pgtasks.queue q
     WHERE q.policy = 'standard'
$fn$;

-- (Re)creates job_inserted with the current standard queues in its WHEN
-- clause and arguments, when they changed. Written out, not a function
-- call: the clause is prepared anew by every INSERT statement, and only
-- built-in functions keep that cheap (a current_setting() call for the
-- skip_notify switch cost 8 single-row producers 12%, so the function
-- reads the switch instead). Rewriting the trigger waits for the job
-- table's writers in flight and holds off new ones until the calling
-- transaction ends.
CREATE FUNCTION pgtasks.refresh_job_inserted() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgtasks AS $fn$
DECLARE
    standard text[];
BEGIN
    IF pgtasks.standard_queues() IS NOT DISTINCT FROM
       (SELECT s.standard_queues FROM pgtasks.insert_trigger_state s) THEN
        RETURN;
    END IF;
    LOCK TABLE pgtasks.job IN SHARE ROW EXCLUSIVE MODE;
    -- Read after the lock: after any transaction that changed queues before it.
    standard := pgtasks.standard_queues();
    EXECUTE format($sql$
        CREATE OR REPLACE TRIGGER job_inserted
            BEFORE INSERT ON pgtasks.job
            FOR EACH ROW
            WHEN (NEW.queue <> ALL (%L::text[])
                  OR NOT pg_try_advisory_xact_lock_shared(
                         (hashtext('pgtasks.queue_waiter')::bigint << 32)
                         | (hashtext(NEW.queue)::bigint & 4294967295)))
            EXECUTE FUNCTION pgtasks.job_inserted(%s)$sql$,
        standard,
        (SELECT coalesce(string_agg(quote_literal(q), ', '), '') FROM unnest(standard) q));
    INSERT INTO pgtasks.insert_trigger_state (standard_queues) VALUES (standard)
        ON CONFLICT (one) DO UPDATE SET standard_queues = EXCLUDED.standard_queues;
END
$fn$;

CREATE FUNCTION pgtasks.queues_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pgtasks.refresh_job_inserted();
    RETURN NULL;
END
$fn$;

CREATE TRIGGER queues_changed
    AFTER INSERT OR DELETE OR UPDATE OF name, policy OR TRUNCATE ON pgtasks.queue
    FOR EACH STATEMENT EXECUTE FUNCTION pgtasks.queues_changed();

PERFORM pgtasks.refresh_job_inserted();

INSERT INTO pgtasks.schema_version (version) VALUES (6);
END
$step$;

-- Step 7: finished jobs are announced only while some process awaits one.
--
-- notify_done() sent every batch of finished ids on 'pgtasks:done', which
-- only `GET /api/jobs/{id}?wait=` requests read; with nobody waiting, a
-- drain of no-op jobs spent a tenth of its time on it (8-12% more jobs/s
-- without). Now a process holds the done-waiter lock shared (on its sleep
-- connection) while any of its requests waits, and a statement that
-- finishes jobs notifies only when it cannot take that lock exclusively.
-- Taken, the lock lasts to the end of that transaction, so a process about
-- to wait first waits for it: its next read of the job, after the lock,
-- sees every finish that did not notify. (Two finishing statements at once:
-- the second cannot take it either, and notifies. Harmless.)
--
-- A process of the previous release does not take the lock: during an
-- upgrade its waiting requests may learn of a finish by their once-a-second
-- re-read instead.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 7) THEN
    RETURN;
END IF;

CREATE FUNCTION pgtasks.done_waiter_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT hashtext('pgtasks.done_waiter')::bigint << 32
$fn$;

CREATE OR REPLACE FUNCTION pgtasks.notify_done(ids bigint[]) RETURNS integer
LANGUAGE plpgsql AS $fn$
DECLARE
    n integer := coalesce(cardinality(ids), 0);
    i integer := 1;
BEGIN
    IF n = 0 OR pg_try_advisory_xact_lock(pgtasks.done_waiter_lock_key()) THEN
        RETURN 0;
    END IF;
    -- Plain expressions only (a SQL function would be planned on every call).
    WHILE i <= n LOOP
        PERFORM pg_notify('pgtasks:done', array_to_string(ids[i:i + 299], ','));
        i := i + 300;
    END LOOP;
    RETURN (n + 299) / 300;
END
$fn$;

-- For a process's sleep connection, when the first of its requests starts
-- waiting for a job to finish: holds the done-waiter lock (shared, for the
-- session) once statements finishing jobs without notifying have ended.
-- False when that took longer than `wait` (the lock is not held).
CREATE FUNCTION pgtasks.await_done(wait interval) RETURNS boolean
LANGUAGE plpgsql AS $fn$
BEGIN
    -- At least 1 ms: a lock_timeout of 0 would wait for ever.
    PERFORM set_config('lock_timeout',
                       greatest(1, ceil(extract(epoch FROM wait) * 1000))::bigint || 'ms', true);
    PERFORM pg_advisory_lock_shared(pgtasks.done_waiter_lock_key());
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END
$fn$;

-- When the last of them is answered.
CREATE FUNCTION pgtasks.done_awaited() RETURNS void
LANGUAGE sql AS $fn$
    SELECT pg_advisory_unlock_shared(pgtasks.done_waiter_lock_key())
$fn$;

INSERT INTO pgtasks.schema_version (version) VALUES (7);
END
$step$;


-- Step 8: job_inserted's WHEN clause names its lock key's constant half as a
-- literal.
--
-- The clause is prepared anew by every INSERT statement, constant folding
-- included: `hashtext('pgtasks.queue_waiter')::bigint << 32` was computed
-- again for every single-row INSERT. Written as the number it folds to, the
-- lock key is the same (sleepers of any release see the same inserts), and
-- 8 single-row producers ran 2% faster (pgbench, four alternating rounds on
-- copies of the table: 0.925 -> 0.945 of a copy without the trigger).
-- hashtext() has not changed since PostgreSQL 8.4; should it ever, the key
-- is recomputed whenever the standard queues change.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 8) THEN
    RETURN;
END IF;

CREATE OR REPLACE FUNCTION pgtasks.refresh_job_inserted() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgtasks AS $fn$
DECLARE
    standard text[];
BEGIN
    IF pgtasks.standard_queues() IS NOT DISTINCT FROM
       (SELECT s.standard_queues FROM pgtasks.insert_trigger_state s) THEN
        RETURN;
    END IF;
    LOCK TABLE pgtasks.job IN SHARE ROW EXCLUSIVE MODE;
    -- Read after the lock: after any transaction that changed queues before it.
    standard := pgtasks.standard_queues();
    -- The key is pgtasks.waiter_lock_key(NEW.queue), written out (a function
    -- call would be planned per statement) with its constant half folded.
    EXECUTE format($sql$
        CREATE OR REPLACE TRIGGER job_inserted
            BEFORE INSERT ON pgtasks.job
            FOR EACH ROW
            WHEN (NEW.queue <> ALL (%L::text[])
                  OR NOT pg_try_advisory_xact_lock_shared(
                         (%s)::bigint | (hashtext(NEW.queue)::bigint & 4294967295)))
            EXECUTE FUNCTION pgtasks.job_inserted(%s)$sql$,
        standard,
        hashtext('pgtasks.queue_waiter')::bigint << 32,
        (SELECT coalesce(string_agg(quote_literal(q), ', '), '') FROM unnest(standard) q));
    INSERT INTO pgtasks.insert_trigger_state (standard_queues) VALUES (standard)
        ON CONFLICT (one) DO UPDATE SET standard_queues = EXCLUDED.standard_queues;
END
$fn$;

-- Rewrites the trigger now, with the same queues.
DELETE FROM pgtasks.insert_trigger_state;
PERFORM pgtasks.refresh_job_inserted();

INSERT INTO pgtasks.schema_version (version) VALUES (8);
END
$step$;


-- Step 9: an insert hands its job straight to the sleeping worker.
--
-- A job inserted while a worker slept used to wait for that worker's claim:
-- a round trip to a backend idle since the last job, ~0.5 ms of the ~0.55
-- ms pickup. Now the insert that finds a worker asleep (job_inserted's WHEN
-- clause, step 6) claims its row itself, in its BEFORE trigger (the row is
-- written once, already active), and at commit (job_handed, a deferred
-- trigger) sends the job in its notification, addressed to one process's
-- LISTEN session; that process starts it when the notification arrives.
--
-- * The address: a process's LISTEN session holds
--   listener_lock_key(pg_backend_pid()) for its life. It becomes the
--   queue's address (queue_sleeper) when it starts, for queues without a
--   live one, and whenever one of its process's workers arms to sleep
--   (sleep_on). An insert hands over only while that session is alive (the
--   lock is held), so a process that is gone is never chosen. Any live
--   address will do: its process runs the queue, and starts the job or
--   keeps it until a slot frees up.
-- * One job per inserting transaction: a multi-row INSERT hands over its
--   first row and notifies for the rest, which the woken worker claims.
--   That row starts ahead of any higher priority later in the same
--   transaction; `SET LOCAL pgtasks.handover = off` (or for the session)
--   makes an insert notify only, as before. Keyed rows, jobs of policy
--   queues, jobs due later, paused queues, data beyond NOTIFY's limit and
--   transactions that commit a second or more after they began take the
--   usual path.
-- * The row records the address in handed_to, and a first lease of at most
--   15 s, until the attempt, if it runs for more than a moment, confirms it
--   (clears handed_to; the queue's lease applies). The rescuer gives back,
--   unburned, an unconfirmed handover whose LISTEN session ended (the
--   process crashed or lost that connection before it started the job, or
--   while it was just starting) or whose first lease ran out
--   (release_handovers). A process gives back at once what is handed to it
--   while it stops, and keeps its LISTEN session until its attempts have
--   ended and their outcomes are written. Claims, and a return to the
--   queue (job_available_again), clear handed_to.
DO $step$
BEGIN
IF EXISTS (SELECT 1 FROM pgtasks.schema_version WHERE version = 9) THEN
    RETURN;
END IF;

ALTER TABLE pgtasks.job ADD COLUMN handed_to integer;

-- The LISTEN session of the process whose worker armed last, by queue.
CREATE TABLE pgtasks.queue_sleeper (
    queue    text PRIMARY KEY,
    listener integer NOT NULL
);

CREATE FUNCTION pgtasks.listener_lock_key(listener integer) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT (hashtext('pgtasks.listener')::bigint << 32) | (listener::bigint & 4294967295)
$fn$;

-- Records `listener` as where to hand the queue's jobs. Reads first: an
-- upsert locks the row even when it changes nothing, and every arm would
-- then write and wait for its commit's WAL flush.
CREATE FUNCTION pgtasks.sleeper_at(queue text, listener integer) RETURNS void
LANGUAGE sql AS $fn$
    INSERT INTO pgtasks.queue_sleeper AS s (queue, listener)
    SELECT $1, $2
     WHERE NOT EXISTS (SELECT 1 FROM pgtasks.queue_sleeper WHERE queue = $1 AND listener = $2)
    ON CONFLICT ON CONSTRAINT queue_sleeper_pkey DO UPDATE SET listener = EXCLUDED.listener
$fn$;

-- For a process's sleep connection at shutdown: inserts stop handing jobs
-- to its LISTEN session `listener` (they notify instead).
CREATE FUNCTION pgtasks.forget_sleeper(listener integer) RETURNS void
LANGUAGE sql AS $fn$
    DELETE FROM pgtasks.queue_sleeper WHERE listener = $1
$fn$;

-- For a process's LISTEN session, once: makes it an address inserts may
-- hand jobs to, for as long as the session lasts, and the address of its
-- `queues` that have none that is alive. Returns the address.
CREATE FUNCTION pgtasks.take_handovers(queues text[]) RETURNS integer
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_lock(pgtasks.listener_lock_key(pg_backend_pid()));
    INSERT INTO pgtasks.queue_sleeper AS s (queue, listener)
    SELECT q, pg_backend_pid() FROM unnest(queues) q
    ON CONFLICT ON CONSTRAINT queue_sleeper_pkey DO UPDATE SET listener = EXCLUDED.listener
        WHERE pg_try_advisory_xact_lock_shared(pgtasks.listener_lock_key(s.listener));
    RETURN pg_backend_pid();
END
$fn$;

-- sleep_on (step 6), recording first where to hand this queue's jobs.
CREATE FUNCTION pgtasks.sleep_on(queue text, covered boolean, wait interval, listener integer)
RETURNS text
LANGUAGE plpgsql AS $fn$
BEGIN
    IF listener IS NOT NULL THEN
        PERFORM pgtasks.sleeper_at(queue, listener);
    END IF;
    RETURN pgtasks.sleep_on(queue, covered, wait);
END
$fn$;

CREATE OR REPLACE FUNCTION pgtasks.job_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    standard boolean := coalesce(NEW.queue = ANY (TG_ARGV), false);
    queue_policy text;
    to_listener integer;
    queue_lease interval;
    job_max_attempts integer;
    started timestamptz := now();
    payload text;
BEGIN
    -- (TG_ARGV is NULL when there are no arguments.)
    IF NOT standard THEN
        SELECT q.policy INTO queue_policy FROM pgtasks.queue q WHERE q.name = NEW.queue;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'pgtasks: unknown queue "%"', NEW.queue
                USING ERRCODE = 'foreign_key_violation',
                      HINT = 'Declare the queue in the pgtasks config or INSERT it into pgtasks.queue first.';
        END IF;
        NEW.policy := nullif(queue_policy, 'standard');
    END IF;
    IF NEW.state NOT IN ('created', 'retry') OR NOT pgtasks.notify_enabled() THEN
        RETURN NEW;
    END IF;
    IF NEW.run_at > now() OR pg_try_advisory_xact_lock_shared(pgtasks.waiter_lock_key(NEW.queue)) THEN
        PERFORM pgtasks.notify_waiters(NEW.queue, false, NEW.run_at > now());
        RETURN NEW;
    END IF;
    -- A worker sleeps on the queue.
    -- Not for keyed rows (ON CONFLICT may drop them after this trigger ran),
    -- nor in a transaction that has run long already (the first lease
    -- counts from its start), nor twice in one transaction.
    IF standard AND NEW.state = 'created' AND NEW.policy IS NULL AND NEW.singleton_key IS NULL
       AND clock_timestamp() - started < interval '1 second'
       AND coalesce(current_setting('pgtasks.handover', true), '') <> 'off'
       AND coalesce(current_setting('pgtasks.handed', true), '') = '' THEN
        SELECT s.listener, q.lease, coalesce(NEW.max_attempts, q.retry_limit + 1)
          INTO to_listener, queue_lease, job_max_attempts
          FROM pgtasks.queue_sleeper s JOIN pgtasks.queue q ON q.name = s.queue
         WHERE s.queue = NEW.queue AND NOT q.paused;
        IF FOUND AND NOT pg_try_advisory_xact_lock_shared(pgtasks.listener_lock_key(to_listener)) THEN
            payload := json_build_object(
                'to', to_listener, 'id', NEW.id, 'data', NEW.data, 'attempt', NEW.attempt + 1,
                'max_attempts', job_max_attempts, 'priority', NEW.priority,
                'created_at', NEW.created_at, 'run_at', NEW.run_at, 'started_at', started,
                'lease_until', started + queue_lease,
                'lease_left', extract(epoch FROM started + queue_lease - clock_timestamp()))::text;
        END IF;
    END IF;
    -- NOTIFY takes payloads shorter than 8000 bytes.
    IF payload IS NULL OR octet_length(payload) >= 7900 THEN
        PERFORM pg_notify('pgtasks.' || NEW.queue, '');
        RETURN NEW;
    END IF;
    NEW.state := 'active';
    NEW.attempt := NEW.attempt + 1;
    NEW.started_at := started;
    -- Until the attempt confirms it (then the queue's lease applies).
    NEW.lease_until := started + least(queue_lease, interval '15 seconds');
    NEW.handed_to := to_listener;
    -- For job_handed, which sends it when the transaction commits.
    PERFORM set_config('pgtasks.handed', payload, true);
    RETURN NEW;
END
$fn$;

-- At commit: sends the handed row to its LISTEN session. A transaction that
-- committed too late for the row's first lease leaves an ordinary job
-- (returned to the queue, which wakes a worker); so does one that changed
-- the row meanwhile (nothing is sent for a row it removed).
CREATE FUNCTION pgtasks.job_handed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF clock_timestamp() - now() < interval '1 second'
       AND EXISTS (SELECT 1 FROM pgtasks.job j
                    WHERE j.id = NEW.id AND j.state = 'active' AND j.handed_to = NEW.handed_to
                      AND j.attempt = NEW.attempt) THEN
        PERFORM pg_notify('pgtasks.' || NEW.queue, current_setting('pgtasks.handed'));
        RETURN NULL;
    END IF;
    UPDATE pgtasks.job
       SET state = 'created', attempt = attempt - 1, started_at = NULL, lease_until = NULL,
           handed_to = NULL
     WHERE id = NEW.id AND state = 'active' AND handed_to IS NOT NULL;
    RETURN NULL;
END
$fn$;

CREATE CONSTRAINT TRIGGER job_handed
    AFTER INSERT ON pgtasks.job
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.handed_to IS NOT NULL)
    EXECUTE FUNCTION pgtasks.job_handed();

-- For the maintenance leader: gives back, unburned, jobs handed over but
-- not confirmed whose LISTEN session has ended, or that were not confirmed
-- within their first lease (that session took no notice: it may be
-- half-open, or its pid now another process's); such a session stops being
-- a queue's address.
CREATE FUNCTION pgtasks.release_handovers(max_jobs integer) RETURNS SETOF bigint
LANGUAGE sql AS $fn$
    WITH handed AS MATERIALIZED (
        SELECT id, handed_to FROM pgtasks.job
         WHERE state = 'active' AND lease_until IS NOT NULL AND handed_to IS NOT NULL
           AND (lease_until < now()
                OR pg_try_advisory_xact_lock_shared(pgtasks.listener_lock_key(handed_to)))
         LIMIT max_jobs
           FOR UPDATE SKIP LOCKED
    ), forgotten AS (
        DELETE FROM pgtasks.queue_sleeper s USING handed h WHERE s.listener = h.handed_to
    )
    UPDATE pgtasks.job j
       SET state = 'created', attempt = j.attempt - 1, started_at = NULL,
           lease_until = NULL, handed_to = NULL
      FROM handed h
     WHERE j.id = h.id
    RETURNING j.id
$fn$;

-- A job handed over and then failed or given back is an ordinary one again,
-- whichever statement did it (the statements of this release clear handed_to
-- themselves; fail_jobs, and a release of step 8, do not). In the trigger
-- that already runs when a job returns to the queue: a BEFORE UPDATE trigger
-- would fetch and lock every updated row again, every claim and completion
-- (20,000-job drains 7-9% slower).
CREATE OR REPLACE FUNCTION pgtasks.job_available_again() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.handed_to IS NOT NULL THEN
        UPDATE pgtasks.job SET handed_to = NULL WHERE id = NEW.id;
    END IF;
    IF pgtasks.notify_enabled() THEN
        PERFORM pgtasks.notify_waiters(NEW.queue, NEW.run_at <= now(), NEW.run_at > now());
    END IF;
    RETURN NULL;
END
$fn$;

INSERT INTO pgtasks.schema_version (version) VALUES (9);
END
$step$;

COMMIT;
