//! The only module with SQL: one constant per statement, one function per
//! constant. Statements are fixed text with parameters, prepared once per
//! pooled connection (`prepare_cached`). Functions take any
//! [`GenericClient`], so they run inside or outside a transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Error;

use crate::config::QueueConfig;
use crate::job::{Job, JobState};

/// A job to insert; `None` fields take the column defaults.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub queue: String,
    pub data: Value,
    pub priority: Option<i32>,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: Option<i32>,
    pub singleton_key: Option<String>,
}

const UPSERT_QUEUE: &str = "
INSERT INTO pgtasks.queue AS q
       (name, retry_limit, retry_delay, retry_backoff, retry_delay_max, lease, retention, dead_letter)
VALUES ($1, $2, $3 * interval '1 second', $4, $5 * interval '1 second',
        $6 * interval '1 second', $7 * interval '1 second', $8)
ON CONFLICT (name) DO UPDATE
   SET retry_limit = EXCLUDED.retry_limit, retry_delay = EXCLUDED.retry_delay,
       retry_backoff = EXCLUDED.retry_backoff, retry_delay_max = EXCLUDED.retry_delay_max,
       lease = EXCLUDED.lease, retention = EXCLUDED.retention,
       dead_letter = EXCLUDED.dead_letter, updated_at = now()
 WHERE (q.retry_limit, q.retry_delay, q.retry_backoff, q.retry_delay_max, q.lease,
        q.retention, q.dead_letter)
       IS DISTINCT FROM
       (EXCLUDED.retry_limit, EXCLUDED.retry_delay, EXCLUDED.retry_backoff,
        EXCLUDED.retry_delay_max, EXCLUDED.lease, EXCLUDED.retention, EXCLUDED.dead_letter)";

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
            ],
        )
        .await?;
    Ok(())
}

const INSERT_JOBS: &str = "
INSERT INTO pgtasks.job (queue, data, priority, run_at, max_attempts, singleton_key)
SELECT queue, data, coalesce(priority, 0), coalesce(run_at, now()), max_attempts, singleton_key
  FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::int[], $6::text[])
       WITH ORDINALITY AS j(queue, data, priority, run_at, max_attempts, singleton_key, n)
 ORDER BY n
RETURNING id";

/// Inserts jobs in one statement (one trigger run, one NOTIFY per queue) and
/// returns their ids in input order.
pub async fn insert_jobs(client: &impl GenericClient, jobs: &[NewJob]) -> Result<Vec<i64>, Error> {
    let statement = client.prepare_cached(INSERT_JOBS).await?;
    let queues: Vec<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
    let data: Vec<&Value> = jobs.iter().map(|j| &j.data).collect();
    let priorities: Vec<Option<i32>> = jobs.iter().map(|j| j.priority).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = jobs.iter().map(|j| j.run_at).collect();
    let max_attempts: Vec<Option<i32>> = jobs.iter().map(|j| j.max_attempts).collect();
    let keys: Vec<Option<&str>> = jobs.iter().map(|j| j.singleton_key.as_deref()).collect();
    let rows = client
        .query(
            &statement,
            &[&queues, &data, &priorities, &run_ats, &max_attempts, &keys],
        )
        .await?;
    // INSERT ... SELECT ... ORDER BY assigns identity values in that order.
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}

const CLAIM_JOBS: &str = "
WITH next AS (
    SELECT id FROM pgtasks.job
     WHERE queue = $1 AND state IN ('created', 'retry') AND run_at <= now()
       AND NOT EXISTS (SELECT 1 FROM pgtasks.queue WHERE name = $1 AND paused)
     ORDER BY priority DESC, run_at, id
     LIMIT $2
       FOR UPDATE SKIP LOCKED
)
UPDATE pgtasks.job j
   SET state = 'active', attempt = j.attempt + 1, started_at = now(),
       lease_until = now() + q.lease
  FROM next, pgtasks.queue q
 WHERE j.id = next.id AND q.name = $1
RETURNING j.id, j.data, j.attempt, coalesce(j.max_attempts, q.retry_limit + 1), j.priority,
          j.created_at, j.run_at, j.started_at, j.lease_until,
          extract(epoch FROM j.lease_until - clock_timestamp())::float8";

/// A claimed job and how long its lease has left, measured by the database's
/// clock so the worker's timer is immune to clock skew.
pub struct Claimed {
    pub job: Job,
    pub lease_left: Duration,
}

/// Claims up to `limit` due jobs of `queue` in one statement, highest
/// priority first, skipping rows other workers hold. None when paused.
pub async fn claim_jobs(
    client: &impl GenericClient,
    queue: &str,
    limit: usize,
) -> Result<Vec<Claimed>, Error> {
    let statement = client.prepare_cached(CLAIM_JOBS).await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(&statement, &[&queue, &limit]).await?;
    Ok(rows
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
        .collect())
}

const NEXT_RUN_IN: &str = "
SELECT extract(epoch FROM min(run_at) - clock_timestamp())::float8
  FROM pgtasks.job
 WHERE queue = $1 AND state IN ('created', 'retry') AND run_at > now()";

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
UPDATE pgtasks.job j
   SET state = 'completed', completed_at = now(), lease_until = NULL, output = c.output
  FROM unnest($1::bigint[], $2::int[], $3::jsonb[]) AS c(id, attempt, output)
 WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'active'";

/// Marks attempts completed. An attempt whose job has moved on (rescued after
/// its lease, re-claimed) is left alone.
pub async fn complete_jobs(
    client: &impl GenericClient,
    ids: &[i64],
    attempts: &[i32],
    outputs: &[Option<Value>],
) -> Result<u64, Error> {
    let statement = client.prepare_cached(COMPLETE_JOBS).await?;
    client
        .execute(&statement, &[&ids, &attempts, &outputs])
        .await
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
       attempt = j.attempt - 1, started_at = NULL, lease_until = NULL
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
     WHERE state = 'active' AND lease_until < now()
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
