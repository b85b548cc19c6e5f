//! The only module with SQL: one constant per statement, one function per
//! constant. Statements are fixed text with parameters, prepared once per
//! pooled connection (`prepare_cached`). Functions take any
//! [`GenericClient`], so they run inside or outside a transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::{Error, Row};

use serde::Serialize;

use crate::config::QueueConfig;
use crate::job::{Job, JobRecord, JobState};

/// A job to insert; `None` fields take the column defaults.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub queue: String,
    pub data: Value,
    pub priority: Option<i32>,
    pub run_at: Option<DateTime<Utc>>,
    /// Due this long after the database's `now()` (when `run_at` is None).
    pub delay: Option<Duration>,
    pub max_attempts: Option<i32>,
    /// With a key: at most one queued job per (queue, key); a second submit
    /// returns the first one's id. Such jobs go through [`send_job`].
    pub singleton_key: Option<String>,
    /// With a key: also at most one job per key per slot of this many seconds.
    pub singleton_seconds: Option<i32>,
}

impl NewJob {
    /// A job for `queue` with default options; chain the setters below.
    pub fn new(queue: &str, data: Value) -> NewJob {
        NewJob {
            queue: queue.to_string(),
            data,
            ..NewJob::default()
        }
    }

    /// Sets nothing but queue and data.
    fn is_plain(&self) -> bool {
        self.priority.is_none()
            && self.run_at.is_none()
            && self.delay.is_none()
            && self.max_attempts.is_none()
            && self.singleton_key.is_none()
            && self.singleton_seconds.is_none()
    }

    /// Higher runs first.
    pub fn priority(mut self, priority: i32) -> NewJob {
        self.priority = Some(priority);
        self
    }

    /// Due at this time.
    pub fn run_at(mut self, at: DateTime<Utc>) -> NewJob {
        self.run_at = Some(at);
        self
    }

    /// Due this long after the database's clock says now.
    pub fn delay(mut self, delay: Duration) -> NewJob {
        self.delay = Some(delay);
        self
    }

    /// Attempts in all, instead of the queue's retry limit + 1.
    pub fn max_attempts(mut self, attempts: i32) -> NewJob {
        self.max_attempts = Some(attempts);
        self
    }

    /// Singleton key (and, in a queue with a policy, the policy's key).
    pub fn singleton_key(mut self, key: &str) -> NewJob {
        self.singleton_key = Some(key.to_string());
        self
    }

    /// With a singleton key: at most one job per key per slot of this many seconds.
    pub fn singleton_seconds(mut self, seconds: i32) -> NewJob {
        self.singleton_seconds = Some(seconds);
        self
    }
}

const UPSERT_QUEUE: &str = "
INSERT INTO pgtasks.queue AS q
       (name, retry_limit, retry_delay, retry_backoff, retry_delay_max, lease, retention,
        dead_letter, policy)
VALUES ($1, $2, $3 * interval '1 second', $4, $5 * interval '1 second',
        $6 * interval '1 second', $7 * interval '1 second', $8, $9)
ON CONFLICT (name) DO UPDATE
   SET retry_limit = EXCLUDED.retry_limit, retry_delay = EXCLUDED.retry_delay,
       retry_backoff = EXCLUDED.retry_backoff, retry_delay_max = EXCLUDED.retry_delay_max,
       lease = EXCLUDED.lease, retention = EXCLUDED.retention,
       dead_letter = EXCLUDED.dead_letter, policy = EXCLUDED.policy, updated_at = now()
 WHERE (q.retry_limit, q.retry_delay, q.retry_backoff, q.retry_delay_max, q.lease,
        q.retention, q.dead_letter, q.policy)
       IS DISTINCT FROM
       (EXCLUDED.retry_limit, EXCLUDED.retry_delay, EXCLUDED.retry_backoff,
        EXCLUDED.retry_delay_max, EXCLUDED.lease, EXCLUDED.retention, EXCLUDED.dead_letter,
        EXCLUDED.policy)";

/// Creates the queue or brings its policy in line with `policy`; leaves
/// `paused` alone. Call inside one transaction for several queues: the
/// dead-letter reference is checked at commit.
pub async fn upsert_queue(
    client: &impl GenericClient,
    name: &str,
    policy: &QueueConfig,
) -> Result<(), Error> {
    let statement = client.prepare_cached(UPSERT_QUEUE).await?;
    let retry_limit = i32::try_from(policy.retry_limit).unwrap_or(i32::MAX);
    client
        .execute(
            &statement,
            &[
                &name,
                &retry_limit,
                &policy.retry_delay.as_secs_f64(),
                &policy.retry_backoff,
                &policy.retry_delay_max.as_secs_f64(),
                &policy.lease.as_secs_f64(),
                &policy.retention.as_secs_f64(),
                &policy.dead_letter,
                &policy.policy.as_str(),
            ],
        )
        .await?;
    Ok(())
}

const INSERT_JOBS: &str = "
INSERT INTO pgtasks.job (queue, data, priority, run_at, max_attempts, singleton_key)
SELECT queue, data, coalesce(priority, 0),
       coalesce(run_at, now() + delay_secs * interval '1 second', now()), max_attempts, singleton_key
  FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::float8[], $6::int[], $7::text[])
       WITH ORDINALITY AS j(queue, data, priority, run_at, delay_secs, max_attempts, singleton_key, n)
 WHERE $8::bool OR (SELECT set_config('pgtasks.handover', 'off', true)) = 'off'
 ORDER BY n
RETURNING id";

/// [`INSERT_JOBS`] for jobs that set nothing but queue and data, the usual
/// bulk and HTTP case: two arrays to send and decode instead of seven, and
/// no per-row defaults to compute (1,000-row chunks: 10–20% faster).
const INSERT_PLAIN_JOBS: &str = "
INSERT INTO pgtasks.job (queue, data)
SELECT queue, data
  FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS j(queue, data, n)
 WHERE $3::bool OR (SELECT set_config('pgtasks.handover', 'off', true)) = 'off'
 ORDER BY n
RETURNING id";

/// Inserts jobs in one statement (one transaction: at most one NOTIFY per
/// queue, sent only while a worker sleeps on it) and returns their ids in
/// input order. A single job may be handed to a sleeping worker (schema
/// step 9); a batch is not: the worker claims it.
pub async fn insert_jobs(client: &impl GenericClient, jobs: &[NewJob]) -> Result<Vec<i64>, Error> {
    insert_jobs_handing_over(client, jobs, jobs.len() == 1).await
}

/// [`insert_jobs`], handing a job to a sleeping worker only if
/// `hand_over`; if not, `pgtasks.handover = off` holds for the rest of the
/// transaction (set once, by an InitPlan, before the first row). The HTTP
/// submitter hands over only when idle: a handover makes its insert slower
/// (measured: 12.6–13.6k req/s without handovers under load, 11.8–12.4k
/// with them).
pub async fn insert_jobs_handing_over(
    client: &impl GenericClient,
    jobs: &[NewJob],
    hand_over: bool,
) -> Result<Vec<i64>, Error> {
    let queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
    let data: Vec<&Value> = jobs.iter().map(|j| &j.data).collect();
    let rows = if jobs.iter().all(NewJob::is_plain) {
        let statement = client.prepare_cached(INSERT_PLAIN_JOBS).await?;
        client
            .query(&statement, &[&queues, &data, &hand_over])
            .await?
    } else {
        insert_with_options(client, jobs, &queues, &data, hand_over).await?
    };
    // INSERT ... SELECT ... ORDER BY assigns identity values in that order.
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}

async fn insert_with_options(
    client: &impl GenericClient,
    jobs: &[NewJob],
    queues: &[&str],
    data: &[&Value],
    hand_over: bool,
) -> Result<Vec<Row>, Error> {
    let statement = client.prepare_cached(INSERT_JOBS).await?;
    let priorities: Vec<Option<i32>> = jobs.iter().map(|j| j.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.run_at).collect();
    let delays: Vec<Option<f64>> = jobs
        .iter()
        .map(|j| j.delay.map(|d| d.as_secs_f64()))
        .collect();
    let max_attempts: Vec<Option<i32>> = jobs.iter().map(|j| j.max_attempts).collect();
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.singleton_key.as_deref()).collect();
    client
        .query(
            &statement,
            &[
                &queues,
                &data,
                &priorities,
                &run_ats,
                &delays,
                &max_attempts,
                &keys,
                &hand_over,
            ],
        )
        .await
}

/// `priorities`: the distinct priorities of `$1`'s waiting jobs, highest
/// first, by skip scan of the claim index (queue, priority DESC, run_at, id):
/// one probe per priority. Claims and the timer then read each priority's
/// range of the same index with `run_at` as a bound, so jobs due later (or
/// already due, for the timer) are never walked.
macro_rules! waiting_priorities {
    () => {
        "
WITH RECURSIVE priorities AS (
    (SELECT j.priority FROM pgtasks.job j
      WHERE j.queue = $1 AND j.state IN ('created', 'retry')
      ORDER BY j.priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT j.priority FROM pgtasks.job j
             WHERE j.queue = $1 AND j.state IN ('created', 'retry') AND j.priority < p.priority
             ORDER BY j.priority DESC LIMIT 1)
      FROM priorities p
     WHERE p.priority IS NOT NULL
)"
    };
}

/// The end of both claim statements, after their `next` CTE (the ids to
/// claim, locked): starts each job's attempt and lease, and returns the jobs.
macro_rules! lease_next {
    () => {
        ")
UPDATE pgtasks.job j
   SET state = 'active', attempt = j.attempt + 1, started_at = now(),
       lease_until = now() + q.lease, handed_to = NULL
  FROM pgtasks.queue q
 -- An array of ids, not a join with `next`: a join may be planned as a hash
 -- join over a sequential scan of the whole table, on every claim.
 WHERE j.id = ANY (ARRAY(SELECT id FROM next)) AND q.name = $1
RETURNING j.id, j.data, j.attempt, coalesce(j.max_attempts, q.retry_limit + 1), j.priority,
          j.created_at, j.run_at, j.started_at, j.lease_until,
          extract(epoch FROM j.lease_until - clock_timestamp())::float8"
    };
}

const CLAIM_JOBS: &str = concat!(
    waiting_priorities!(),
    ", next AS (
    -- Per priority, due jobs oldest first: `run_at <= now()` bounds the
    -- index range, so jobs due later are never read. (One ordered scan of
    -- the queue read past every delayed job when fewer due jobs than the
    -- limit were waiting: 10 ms per claim with 100,000 delayed jobs.)
    -- Rows come out priority by priority; the limit stops the walk.
    SELECT c.id
      FROM priorities p
     CROSS JOIN LATERAL (
            SELECT j.id FROM pgtasks.job j
             WHERE j.queue = $1 AND j.state IN ('created', 'retry')
               AND j.priority = p.priority AND j.run_at <= now()
             ORDER BY j.run_at, j.id
             LIMIT $2
               FOR UPDATE SKIP LOCKED) c
     WHERE p.priority IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgtasks.queue WHERE name = $1 AND paused)
     LIMIT $2
",
    lease_next!()
);

/// The claim under the singleton and stately policies: one job, of a key
/// with none running. Kept apart from [`CLAIM_JOBS`]: the extra tests, even
/// when skipped at run time, made every standard claim many times slower.
const CLAIM_ONE_PER_KEY: &str = concat!(
    waiting_priorities!(),
    ", next AS (
    SELECT c.id
      FROM priorities p
     CROSS JOIN LATERAL (
            SELECT j.id FROM pgtasks.job j
             WHERE j.queue = $1 AND j.state IN ('created', 'retry')
               AND j.priority = p.priority AND j.run_at <= now()
               -- Skip keys with a running job (both tests served by job_policy_idx).
               AND NOT EXISTS (SELECT 1 FROM pgtasks.job a
                                WHERE a.policy = 'singleton' AND a.state = 'active' AND a.queue = $1
                                  AND coalesce(a.singleton_key, '') = coalesce(j.singleton_key, ''))
               AND NOT EXISTS (SELECT 1 FROM pgtasks.job a
                                WHERE a.policy = 'stately' AND a.state = 'active' AND a.queue = $1
                                  AND coalesce(a.singleton_key, '') = coalesce(j.singleton_key, ''))
             ORDER BY j.run_at, j.id
             LIMIT 1
               FOR UPDATE SKIP LOCKED) c
     WHERE p.priority IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pgtasks.queue WHERE name = $1 AND paused)
     -- One job per claim, so one batch cannot take a key twice ($2 >= 1).
     LIMIT least($2::bigint, 1)
",
    lease_next!()
);

/// A claimed job and how long its lease has left, measured by the database's
/// clock so the worker's timer is immune to clock skew.
pub struct Claimed {
    pub job: Job,
    pub lease_left: Duration,
}

/// Claims up to `limit` due jobs of `queue` in one statement, highest
/// priority first, skipping rows other workers hold. None when paused; at
/// most one, of a key with none running, when `one_per_key` (the singleton
/// and stately policies, as configured). Two instances racing for one key:
/// the loser's claim fails with `unique_violation` and claims nothing.
pub async fn claim_jobs(
    client: &impl GenericClient,
    queue: &str,
    limit: usize,
    one_per_key: bool,
) -> Result<Vec<Claimed>, Error> {
    let sql = if one_per_key {
        CLAIM_ONE_PER_KEY
    } else {
        CLAIM_JOBS
    };
    let statement = client.prepare_cached(sql).await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(&statement, &[&queue, &limit]).await?;
    let mut claimed: Vec<Claimed> = rows
        .iter()
        .map(|row| Claimed {
            job: Job {
                id: row.get(0),
                queue: queue.to_string(),
                data: row.get(1),
                attempt: row.get(2),
                max_attempts: row.get(3),
                priority: row.get(4),
                created_at: row.get(5),
                run_at: row.get(6),
                started_at: row.get(7),
                lease_until: row.get(8),
            },
            lease_left: secs_to_duration(row.get(9)),
        })
        .collect();
    // RETURNING follows no order: start them in the order they were chosen.
    claimed.sort_by_key(|c| (std::cmp::Reverse(c.job.priority), c.job.run_at, c.job.id));
    Ok(claimed)
}

/// Where a worker about to sleep stands, from `pgtasks.sleep_on` (schema
/// step 6). A connection of their own runs it and [`WAKE_FROM`] (the
/// listener's `Role::Sleep`), because the session locks they take must last
/// as long as the sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepOn {
    /// This session holds the queue's lock: every later insert notifies,
    /// and every earlier one that did not has committed.
    Holding,
    /// Another process holds it; this session relies on that one.
    Covered,
    /// Inserts that did not notify are still in flight: ask again shortly.
    Unsettled,
}

impl SleepOn {
    pub fn from_sql(answer: &str) -> SleepOn {
        match answer {
            "holding" => SleepOn::Holding,
            "covered" => SleepOn::Covered,
            _ => SleepOn::Unsettled,
        }
    }
}

/// `$2`: this session relied on another process at its last call; `$3`:
/// milliseconds to wait for inserts in flight; `$4`: the process's LISTEN
/// session, where inserts hand jobs over (schema step 9), if it is up.
pub const SLEEP_ON: &str =
    "SELECT pgtasks.sleep_on($1, $2, $3 * interval '1 millisecond', $4::int)";

/// Undoes `sleep_on`'s holding (`$2` true) or relying (false).
pub const WAKE_FROM: &str = "SELECT pgtasks.wake_from($1, $2)";

/// Holds the done-waiter lock for the session (schema step 7), so that
/// statements finishing jobs notify `pgtasks:done`; `$1`: milliseconds to
/// wait for such statements in flight. True when held. Run by the sleep
/// connection while some `?wait=` request of its process waits.
pub const AWAIT_DONE: &str = "SELECT pgtasks.await_done($1 * interval '1 millisecond')";

/// Lets go of it, when the last such request is answered.
pub const DONE_AWAITED: &str = "SELECT pgtasks.done_awaited()";

// On the claim index (queue, priority DESC, run_at, id): the queue's
// distinct priorities by skip scan, then the earliest future run_at of each,
// one index probe apiece. A second index on (queue, run_at) would do it in
// one probe but cost every insert an index entry.
const NEXT_RUN_IN: &str = concat!(
    waiting_priorities!(),
    "
SELECT extract(epoch FROM min(n.run_at) - clock_timestamp())::float8
  FROM priorities p
 CROSS JOIN LATERAL (
        SELECT j.run_at FROM pgtasks.job j
         WHERE j.queue = $1 AND j.state IN ('created', 'retry')
           AND j.priority = p.priority AND j.run_at > now()
         ORDER BY j.run_at LIMIT 1) n"
);

/// How long until the queue's earliest waiting job that is not due yet.
pub async fn next_run_in(
    client: &impl GenericClient,
    queue: &str,
) -> Result<Option<Duration>, Error> {
    let statement = client.prepare_cached(NEXT_RUN_IN).await?;
    let row = client.query_one(&statement, &[&queue]).await?;
    Ok(row.get::<_, Option<f64>>(0).map(secs_to_duration))
}

const COMPLETE_JOBS: &str = "
WITH done AS (
    UPDATE pgtasks.job j
       SET state = 'completed', completed_at = now(), lease_until = NULL, output = c.output
      FROM unnest($1::bigint[], $2::int[], $3::jsonb[]) AS c(id, attempt, output)
     WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'active'
    RETURNING j.id
)
SELECT count(*), pgtasks.notify_done(array_agg(id)) FROM done";

/// Marks attempts completed and tells `?wait=` requests, in one statement.
/// An attempt whose job has moved on (rescued after its lease, re-claimed)
/// is left alone.
pub async fn complete_jobs(
    client: &impl GenericClient,
    ids: &[i64],
    attempts: &[i32],
    outputs: &[Option<Value>],
) -> Result<u64, Error> {
    let statement = client.prepare_cached(COMPLETE_JOBS).await?;
    let row = client
        .query_one(&statement, &[&ids, &attempts, &outputs])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

const FAIL_JOBS: &str = "
SELECT id, state, run_at
  FROM pgtasks.fail_jobs($1, $2, $3,
         ARRAY(SELECT make_interval(secs => d)
                 FROM unnest($4::float8[]) WITH ORDINALITY AS u(d, n) ORDER BY n),
         $5)";

/// The new state of a job after a failed attempt.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    pub id: i64,
    pub state: JobState,
    pub run_at: DateTime<Utc>,
}

/// Longest `not_before` passed to SQL; a larger one (an absurd
/// `Retry-After`) would overflow an interval and fail the whole batch.
const MAX_NOT_BEFORE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// One failed attempt to record.
#[derive(Debug, Clone, Default)]
pub struct Failure {
    /// Stored in `last_error` and appended to `errors`.
    pub message: String,
    /// Retry no sooner than this (still capped by the queue's `retry_delay_max`).
    pub not_before: Option<Duration>,
    /// Fail the job now, whatever attempts remain.
    pub final_attempt: bool,
}

/// Records failed attempts with the queue's retry policy (`pgtasks.fail_jobs`).
pub async fn fail_jobs(
    client: &impl GenericClient,
    ids: &[i64],
    attempts: &[i32],
    failures: &[Failure],
) -> Result<Vec<FailedAttempt>, Error> {
    let statement = client.prepare_cached(FAIL_JOBS).await?;
    let messages: Vec<&str> = failures.iter().map(|f| f.message.as_str()).collect();
    let not_before: Vec<Option<f64>> = failures
        .iter()
        .map(|f| f.not_before.map(|d| d.min(MAX_NOT_BEFORE).as_secs_f64()))
        .collect();
    let final_attempts: Vec<bool> = failures.iter().map(|f| f.final_attempt).collect();
    let rows = client
        .query(
            &statement,
            &[&ids, &attempts, &messages, &not_before, &final_attempts],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| FailedAttempt {
            id: row.get(0),
            state: row.get(1),
            run_at: row.get(2),
        })
        .collect())
}

const RELEASE_JOBS: &str = "
UPDATE pgtasks.job j
   SET state = CASE WHEN j.attempt <= 1 THEN 'created' ELSE 'retry' END::pgtasks.job_state,
       attempt = j.attempt - 1, started_at = NULL, lease_until = NULL, handed_to = NULL
  FROM unnest($1::bigint[], $2::int[]) AS r(id, attempt)
 WHERE j.id = r.id AND j.attempt = r.attempt AND j.state = 'active'";

/// Gives attempts back unburned (shutdown): the jobs are available at once
/// and the update trigger wakes their queues on every instance.
pub async fn release_jobs(
    client: &impl GenericClient,
    ids: &[i64],
    attempts: &[i32],
) -> Result<u64, Error> {
    let statement = client.prepare_cached(RELEASE_JOBS).await?;
    client.execute(&statement, &[&ids, &attempts]).await
}

/// For the LISTEN connection: makes its session the address inserts hand
/// jobs to (schema step 9), and that of the queues (`$1`) without a live
/// one; returns it.
pub const TAKE_HANDOVERS: &str = "SELECT pgtasks.take_handovers($1)";

/// For the sleep connection: records its process's LISTEN session (`$2`)
/// as where to hand the queue's (`$1`) jobs, when the session changed while
/// a worker holds the queue's lock (schema step 9).
pub const SLEEPER_AT: &str = "SELECT pgtasks.sleeper_at($1, $2)";

/// For the LISTEN connection: gives back (unburned) the jobs `$1` handed to
/// its session that no worker took (the process is stopping).
pub const GIVE_BACK_HANDOVERS: &str = "
UPDATE pgtasks.job
   SET state = 'created', attempt = attempt - 1, started_at = NULL, lease_until = NULL,
       handed_to = NULL
 WHERE id = ANY($1) AND state = 'active' AND handed_to = pg_backend_pid()";

/// For the sleep connection at shutdown: inserts stop handing jobs to this
/// process's LISTEN session (`$1`).
pub const FORGET_SLEEPER: &str = "SELECT pgtasks.forget_sleeper($1)";

const CONFIRM_HANDOVER: &str = "
UPDATE pgtasks.job j SET handed_to = NULL, lease_until = j.started_at + q.lease
  FROM pgtasks.queue q
 WHERE j.id = $1 AND j.attempt = $2 AND j.state = 'active' AND j.handed_to IS NOT NULL
   AND q.name = j.queue";

/// A handed-over attempt that outlives a moment says it runs, so that the
/// end of the LISTEN session it came through, or of its first lease, does
/// not give it back; the queue's lease applies from then. False when it
/// was already given back (or cancelled).
pub async fn confirm_handover(
    client: &impl GenericClient,
    id: i64,
    attempt: i32,
) -> Result<bool, Error> {
    let statement = client.prepare_cached(CONFIRM_HANDOVER).await?;
    Ok(client.execute(&statement, &[&id, &attempt]).await? == 1)
}

const RELEASE_HANDOVERS: &str = "SELECT count(*) FROM pgtasks.release_handovers($1)";

/// Gives back, unburned, up to `limit` jobs handed over and not confirmed
/// whose LISTEN session ended or whose first lease ran out (schema step
/// 9). Returns how many.
pub async fn release_handovers(client: &impl GenericClient, limit: i32) -> Result<i64, Error> {
    let statement = client.prepare_cached(RELEASE_HANDOVERS).await?;
    Ok(client.query_one(&statement, &[&limit]).await?.get(0))
}

const TRY_MAINTENANCE_LOCK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtext('pgtasks.maintenance'))";

/// Makes this transaction the maintenance leader, unless another instance is.
pub async fn try_maintenance_lock(client: &impl GenericClient) -> Result<bool, Error> {
    let statement = client.prepare_cached(TRY_MAINTENANCE_LOCK).await?;
    Ok(client.query_one(&statement, &[]).await?.get(0))
}

const RESCUE_EXPIRED: &str = "
WITH expired AS MATERIALIZED (
    SELECT id, attempt FROM pgtasks.job
     -- Handed over and not confirmed: given back instead (release_handovers).
     WHERE state = 'active' AND lease_until < now() AND handed_to IS NULL
     ORDER BY lease_until
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
SELECT f.id, f.state, f.run_at
  FROM pgtasks.fail_jobs(
         (SELECT array_agg(id) FROM expired),
         (SELECT array_agg(attempt) FROM expired),
         (SELECT array_agg($2::text) FROM expired)) AS f";

/// Fails up to `limit` attempts whose lease expired without an ack (the
/// worker crashed or lost the database), through the normal retry policy.
pub async fn rescue_expired(
    client: &impl GenericClient,
    limit: i64,
    message: &str,
) -> Result<Vec<FailedAttempt>, Error> {
    let statement = client.prepare_cached(RESCUE_EXPIRED).await?;
    let rows = client.query(&statement, &[&limit, &message]).await?;
    Ok(rows
        .iter()
        .map(|row| FailedAttempt {
            id: row.get(0),
            state: row.get(1),
            run_at: row.get(2),
        })
        .collect())
}

fn secs_to_duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

/// The columns `job_record` reads, in order (a macro so statements stay literals).
macro_rules! job_columns {
    () => {
        "j.id, j.queue, j.state, j.priority, j.data, j.attempt,
         coalesce(j.max_attempts, q.retry_limit + 1), j.singleton_key, j.run_at, j.created_at,
         j.started_at, j.completed_at, j.lease_until, j.output, j.last_error, j.errors,
         j.progress, j.dead_letter_of"
    };
}

fn job_record(row: &tokio_postgres::Row) -> JobRecord {
    JobRecord {
        id: row.get(0),
        queue: row.get(1),
        state: row.get(2),
        priority: row.get(3),
        data: row.get(4),
        attempt: row.get(5),
        max_attempts: row.get::<_, Option<i32>>(6).unwrap_or(1),
        singleton_key: row.get(7),
        run_at: row.get(8),
        created_at: row.get(9),
        started_at: row.get(10),
        completed_at: row.get(11),
        lease_until: row.get(12),
        output: row.get(13),
        last_error: row.get(14),
        errors: row.get(15),
        progress: row.get(16),
        dead_letter_of: row.get(17),
    }
}

const GET_JOB: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM pgtasks.job j LEFT JOIN pgtasks.queue q ON q.name = j.queue WHERE j.id = $1"
);

/// One job by id.
pub async fn get_job(client: &impl GenericClient, id: i64) -> Result<Option<JobRecord>, Error> {
    let statement = client.prepare_cached(GET_JOB).await?;
    Ok(client
        .query_opt(&statement, &[&id])
        .await?
        .as_ref()
        .map(job_record))
}

const SEND_JOB: &str = "
SELECT id, duplicate
  FROM pgtasks.send($1, $2, $3, $4, $5 * interval '1 second', $6, $7, $8)";

/// A submitted job's id, and whether it is an existing job's (a singleton
/// key, throttle slot or queue policy held the place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub id: i64,
    pub duplicate: bool,
}

/// Inserts one job through `pgtasks.send`, which answers a singleton key,
/// throttle slot or queue policy that holds the place with that job.
pub async fn send_job(client: &impl GenericClient, job: &NewJob) -> Result<Sent, Error> {
    let statement = client.prepare_cached(SEND_JOB).await?;
    let delay = job.delay.map(|d| d.as_secs_f64());
    let row = client
        .query_one(
            &statement,
            &[
                &job.queue,
                &job.data,
                &job.priority.unwrap_or(0),
                &job.run_at,
                &delay,
                &job.max_attempts,
                &job.singleton_key,
                &job.singleton_seconds,
            ],
        )
        .await?;
    Ok(Sent {
        id: row.get(0),
        duplicate: row.get(1),
    })
}

/// What a state-changing call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Done,
    NotFound,
    /// The job was in this state, from which the call does not apply.
    Refused(JobState),
}

const CANCEL_JOB: &str = "SELECT pgtasks.cancel_job($1)";
const RESUME_JOB: &str = "SELECT pgtasks.resume_job($1)";
const RETRY_JOB: &str = "SELECT pgtasks.retry_job($1)";

/// Cancels a waiting or running job (`pgtasks.cancel_job`); a running
/// attempt is signalled through the `pgtasks:cancel` channel.
pub async fn cancel_job(client: &impl GenericClient, id: i64) -> Result<Transition, Error> {
    let from = previous_state(client, CANCEL_JOB, id).await?;
    Ok(transition(
        from,
        &[JobState::Created, JobState::Retry, JobState::Active],
    ))
}

/// Makes a cancelled job wait again (`pgtasks.resume_job`).
pub async fn resume_job(client: &impl GenericClient, id: i64) -> Result<Transition, Error> {
    let from = previous_state(client, RESUME_JOB, id).await?;
    Ok(transition(from, &[JobState::Cancelled]))
}

/// Gives a failed job one more attempt, due now (`pgtasks.retry_job`).
pub async fn retry_job(client: &impl GenericClient, id: i64) -> Result<Transition, Error> {
    let from = previous_state(client, RETRY_JOB, id).await?;
    Ok(transition(from, &[JobState::Failed]))
}

async fn previous_state(
    client: &impl GenericClient,
    sql: &str,
    id: i64,
) -> Result<Option<JobState>, Error> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_one(&statement, &[&id]).await?.get(0))
}

fn transition(from: Option<JobState>, allowed: &[JobState]) -> Transition {
    match from {
        None => Transition::NotFound,
        Some(state) if allowed.contains(&state) => Transition::Done,
        Some(state) => Transition::Refused(state),
    }
}

const PAUSE_QUEUE: &str = "SELECT pgtasks.pause_queue($1)";
const RESUME_QUEUE: &str = "SELECT pgtasks.resume_queue($1)";

/// Pauses (true) or resumes (false) a queue on every instance; false when
/// there is no such queue.
pub async fn set_queue_paused(
    client: &impl GenericClient,
    queue: &str,
    paused: bool,
) -> Result<bool, Error> {
    let sql = if paused { PAUSE_QUEUE } else { RESUME_QUEUE };
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_one(&statement, &[&queue]).await?.get(0))
}

const REPORT_PROGRESS: &str = "SELECT pgtasks.report_progress($1, $2, $3::float8::numeric, $4)";

/// Stores a running attempt's progress; false when the attempt is over.
pub async fn report_progress(
    client: &impl GenericClient,
    id: i64,
    attempt: i32,
    percent: f64,
    message: Option<&str>,
) -> Result<bool, Error> {
    let statement = client.prepare_cached(REPORT_PROGRESS).await?;
    Ok(client
        .query_one(&statement, &[&id, &attempt, &percent, &message])
        .await?
        .get(0))
}

const DELETE_COMPLETED: &str = "
WITH done AS (
    DELETE FROM pgtasks.job j
     USING unnest($1::bigint[], $2::int[]) AS c(id, attempt)
     WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'active'
    RETURNING j.id
)
SELECT count(*), pgtasks.notify_done(array_agg(id)) FROM done";

/// Completes attempts of queues that keep nothing (retention 0) by deleting
/// them, and tells `?wait=` requests.
pub async fn delete_completed(
    client: &impl GenericClient,
    ids: &[i64],
    attempts: &[i32],
) -> Result<u64, Error> {
    let statement = client.prepare_cached(DELETE_COMPLETED).await?;
    let row = client.query_one(&statement, &[&ids, &attempts]).await?;
    Ok(row.get::<_, i64>(0) as u64)
}

const DELETE_EXPIRED: &str = "
DELETE FROM pgtasks.job
 WHERE id IN (
    SELECT j.id FROM pgtasks.job j JOIN pgtasks.queue q ON q.name = j.queue
     WHERE j.state IN ('completed', 'failed', 'cancelled')
       AND j.completed_at < now() - q.retention
     ORDER BY j.id
     LIMIT $1
       FOR UPDATE OF j SKIP LOCKED)";

/// Deletes up to `limit` finished jobs older than their queue's retention,
/// oldest ids first (they sit at the front of the primary key).
pub async fn delete_expired(client: &impl GenericClient, limit: i64) -> Result<u64, Error> {
    let statement = client.prepare_cached(DELETE_EXPIRED).await?;
    client.execute(&statement, &[&limit]).await
}

const QUEUE_SUMMARIES: &str = "
SELECT q.name, q.paused,
       count(j.id) FILTER (WHERE j.state = 'created'),
       count(j.id) FILTER (WHERE j.state = 'retry'),
       count(j.id) FILTER (WHERE j.state = 'active'),
       count(j.id) FILTER (WHERE j.state = 'completed'),
       count(j.id) FILTER (WHERE j.state = 'failed'),
       count(j.id) FILTER (WHERE j.state = 'cancelled'),
       extract(epoch FROM now() - min(j.run_at) FILTER (
           WHERE j.state IN ('created', 'retry') AND j.run_at <= now()))::float8
  FROM pgtasks.queue q
  LEFT JOIN pgtasks.job j ON j.queue = q.name
 GROUP BY q.name, q.paused
 ORDER BY q.name";

/// A queue with its job counts per state.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QueueSummary {
    pub name: String,
    pub paused: bool,
    pub created: i64,
    pub retry: i64,
    pub active: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Seconds the oldest due, unclaimed job has been waiting; null when none.
    pub oldest_waiting_seconds: Option<f64>,
}

/// Every queue with counts per state and the age of its oldest due job.
pub async fn queue_summaries(client: &impl GenericClient) -> Result<Vec<QueueSummary>, Error> {
    let statement = client.prepare_cached(QUEUE_SUMMARIES).await?;
    let rows = client.query(&statement, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| QueueSummary {
            name: r.get(0),
            paused: r.get(1),
            created: r.get(2),
            retry: r.get(3),
            active: r.get(4),
            completed: r.get(5),
            failed: r.get(6),
            cancelled: r.get(7),
            oldest_waiting_seconds: r.get(8),
        })
        .collect())
}

const QUEUE_DEPTHS: &str = "
SELECT q.name, count(j.id) FILTER (WHERE j.state <> 'active'), count(j.id) FILTER (WHERE j.state = 'active')
  FROM pgtasks.queue q
  LEFT JOIN pgtasks.job j ON j.queue = q.name AND j.state IN ('created', 'retry', 'active')
 GROUP BY q.name";

/// Waiting and running jobs per queue, from the partial indexes only (cheap
/// enough for every metrics scrape).
pub async fn queue_depths(client: &impl GenericClient) -> Result<Vec<(String, i64, i64)>, Error> {
    let statement = client.prepare_cached(QUEUE_DEPTHS).await?;
    let rows = client.query(&statement, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// A round trip, to tell whether the database answers.
pub async fn ping(client: &impl GenericClient) -> Result<(), Error> {
    let statement = client.prepare_cached("SELECT 1").await?;
    client.query_one(&statement, &[]).await.map(|_| ())
}

/// A row of `pgtasks.schedule`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ScheduleRecord {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub queue: String,
    #[schema(value_type = Object)]
    pub data: Value,
    pub priority: i32,
    pub max_attempts: Option<i32>,
    pub enabled: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<i64>,
    pub last_error: Option<String>,
}

macro_rules! schedule_columns {
    () => {
        "name, cron, timezone, queue, data, priority, max_attempts, enabled, next_run_at,
         last_run_at, last_job_id, last_error"
    };
}

fn schedule_record(row: &tokio_postgres::Row) -> ScheduleRecord {
    ScheduleRecord {
        name: row.get(0),
        cron: row.get(1),
        timezone: row.get(2),
        queue: row.get(3),
        data: row.get(4),
        priority: row.get(5),
        max_attempts: row.get(6),
        enabled: row.get(7),
        next_run_at: row.get(8),
        last_run_at: row.get(9),
        last_job_id: row.get(10),
        last_error: row.get(11),
    }
}

const UPSERT_SCHEDULE: &str = concat!(
    "INSERT INTO pgtasks.schedule AS s (name, cron, timezone, queue, data, priority, max_attempts, enabled)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (name) DO UPDATE
        SET cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, queue = EXCLUDED.queue,
            data = EXCLUDED.data, priority = EXCLUDED.priority,
            max_attempts = EXCLUDED.max_attempts, enabled = EXCLUDED.enabled
     RETURNING ",
    schedule_columns!()
);

/// Creates or replaces a schedule (its next run is computed by the leader).
pub async fn upsert_schedule(
    client: &impl GenericClient,
    s: &ScheduleRecord,
) -> Result<ScheduleRecord, Error> {
    let statement = client.prepare_cached(UPSERT_SCHEDULE).await?;
    let row = client
        .query_one(
            &statement,
            &[
                &s.name,
                &s.cron,
                &s.timezone,
                &s.queue,
                &s.data,
                &s.priority,
                &s.max_attempts,
                &s.enabled,
            ],
        )
        .await?;
    Ok(schedule_record(&row))
}

const LIST_SCHEDULES: &str = concat!(
    "SELECT ",
    schedule_columns!(),
    " FROM pgtasks.schedule ORDER BY name"
);

pub async fn list_schedules(client: &impl GenericClient) -> Result<Vec<ScheduleRecord>, Error> {
    let statement = client.prepare_cached(LIST_SCHEDULES).await?;
    Ok(client
        .query(&statement, &[])
        .await?
        .iter()
        .map(schedule_record)
        .collect())
}

const DELETE_SCHEDULE: &str = "DELETE FROM pgtasks.schedule WHERE name = $1";

/// True when there was such a schedule.
pub async fn delete_schedule(client: &impl GenericClient, name: &str) -> Result<bool, Error> {
    let statement = client.prepare_cached(DELETE_SCHEDULE).await?;
    Ok(client.execute(&statement, &[&name]).await? > 0)
}

const DUE_SCHEDULES: &str = concat!(
    "SELECT ",
    schedule_columns!(),
    ", now() FROM pgtasks.schedule
      WHERE enabled AND last_error IS NULL AND (next_run_at IS NULL OR next_run_at <= now())
      ORDER BY next_run_at NULLS FIRST
      LIMIT $1
        FOR UPDATE SKIP LOCKED"
);

/// Schedules that are due or have no next run yet, locked, with the
/// database's `now()`.
pub async fn due_schedules(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<(ScheduleRecord, DateTime<Utc>)>, Error> {
    let statement = client.prepare_cached(DUE_SCHEDULES).await?;
    let rows = client.query(&statement, &[&limit]).await?;
    Ok(rows
        .iter()
        .map(|r| (schedule_record(r), r.get(12)))
        .collect())
}

const ENQUEUE_SCHEDULED: &str = "
INSERT INTO pgtasks.job (queue, data, priority, max_attempts, singleton_key, singleton_on)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING
RETURNING id";

/// Enqueues one run of a schedule, at most once per (schedule, run time)
/// whoever tries: `None` when that run was already enqueued.
pub async fn enqueue_scheduled(
    client: &impl GenericClient,
    schedule: &ScheduleRecord,
    run_at: DateTime<Utc>,
) -> Result<Option<i64>, Error> {
    let statement = client.prepare_cached(ENQUEUE_SCHEDULED).await?;
    let key = format!("schedule:{}@{}", schedule.name, run_at.to_rfc3339());
    let row = client
        .query_opt(
            &statement,
            &[
                &schedule.queue,
                &schedule.data,
                &schedule.priority,
                &schedule.max_attempts,
                &key,
                &run_at,
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

const SET_SCHEDULE_RUN: &str = "
UPDATE pgtasks.schedule
   SET next_run_at = $2, last_run_at = coalesce($3, last_run_at),
       last_job_id = coalesce($4, last_job_id), last_error = $5
 WHERE name = $1";

/// Records a schedule's next run, and its last one when it just ran.
pub async fn set_schedule_run(
    client: &impl GenericClient,
    name: &str,
    next_run_at: Option<DateTime<Utc>>,
    ran_at: Option<DateTime<Utc>>,
    job_id: Option<i64>,
    error: Option<&str>,
) -> Result<(), Error> {
    let statement = client.prepare_cached(SET_SCHEDULE_RUN).await?;
    client
        .execute(&statement, &[&name, &next_run_at, &ran_at, &job_id, &error])
        .await?;
    Ok(())
}

const REDRIVE: &str = "SELECT pgtasks.redrive($1, $2)";

/// Moves up to `max` waiting dead letters back to their queues; returns how many.
pub async fn redrive(
    client: &impl GenericClient,
    dead_letter_queue: &str,
    max: i32,
) -> Result<i32, Error> {
    let statement = client.prepare_cached(REDRIVE).await?;
    Ok(client
        .query_one(&statement, &[&dead_letter_queue, &max])
        .await?
        .get(0))
}

const NOTIFY_FINISHED: &str = "SELECT pgtasks.notify_done($1)";

/// Tells waiting API requests (any instance) that these jobs finished.
pub async fn notify_finished(client: &impl GenericClient, ids: &[i64]) -> Result<(), Error> {
    let statement = client.prepare_cached(NOTIFY_FINISHED).await?;
    client.execute(&statement, &[&ids]).await?;
    Ok(())
}
