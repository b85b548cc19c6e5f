//! Job endpoints: submit (seed-style and with options, single and batch),
//! get, cancel, retry.

use chrono::{DateTime, Utc};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use warp::Reply;

use super::error::ApiError;
use super::ApiState;
use crate::config::validate_queue_name;
use crate::job::JobRecord;
use crate::store::{self, NewJob, Transition};

/// Jobs accepted by one batch request at most.
pub const MAX_BATCH: usize = 1000;

/// The seed's answer to a submit, field for field.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Submitted {
    /// Always true.
    pub success: bool,
    /// The job id, as a string.
    #[serde(rename = "jobId")]
    #[schema(example = "42")]
    pub job_id: String,
    #[schema(example = "readme-queue")]
    pub queue: String,
    /// Present (true) when a job with the same singleton key was already
    /// queued (or throttled in this slot): `jobId` is that job's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubmittedBatch {
    pub success: bool,
    /// The ids in request order.
    #[serde(rename = "jobIds")]
    pub job_ids: Vec<String>,
    pub queue: String,
    /// Per job, whether it was a duplicate; present when any job had a singleton key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<Vec<bool>>,
}

/// A job with options, for `POST /api/queues/{queue}/jobs`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The job's payload: a JSON object. Default `{}`.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    /// Higher runs first. Default 0.
    pub priority: Option<i32>,
    /// When the job becomes due (RFC 3339). Excludes `delay`.
    pub run_at: Option<DateTime<Utc>>,
    /// Seconds from now until the job becomes due. Excludes `run_at`.
    pub delay: Option<f64>,
    /// Overrides the queue's retry_limit + 1.
    pub max_attempts: Option<i32>,
    /// At most one queued job per key: a second submit returns the first's
    /// id with `"duplicate": true`.
    pub singleton_key: Option<String>,
    /// With `singleton_key`: at most one job per key per slot of this many seconds.
    pub singleton_seconds: Option<i32>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1000 jobs, inserted in one transaction.
    pub jobs: Vec<SubmitRequest>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobResponse {
    pub success: bool,
    pub job: JobRecord,
}

/// `POST /api/jobs/{route}`: the seed's submit; the body is the job's data.
pub async fn submit_by_route(
    state: ApiState,
    route: String,
    body: Result<Value, ApiError>,
) -> Result<impl Reply, ApiError> {
    let Some(queue) = state.routes.get(&route).cloned() else {
        return Err(ApiError::not_found(format!(
            "no queue has the route `{route}`"
        )));
    };
    let data = object(body?, "request body")?;
    submit_one(
        &state,
        NewJob {
            queue,
            data,
            ..NewJob::default()
        },
    )
    .await
}

/// `POST /api/queues/{queue}/jobs`: submit with options.
pub async fn submit_to_queue(
    state: ApiState,
    queue: String,
    body: Result<Value, ApiError>,
) -> Result<impl Reply, ApiError> {
    check_queue(&queue)?;
    let request: SubmitRequest = parse(body?)?;
    let job = new_job(&queue, request, "")?;
    submit_one(&state, job).await
}

/// `POST /api/queues/{queue}/jobs/batch`: many jobs, one transaction.
pub async fn submit_batch(
    state: ApiState,
    queue: String,
    body: Result<Value, ApiError>,
) -> Result<impl Reply, ApiError> {
    check_queue(&queue)?;
    let request: BatchRequest = parse(body?)?;
    if request.jobs.is_empty() || request.jobs.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "jobs: must hold 1 to {MAX_BATCH} jobs"
        )));
    }
    let jobs = request
        .jobs
        .into_iter()
        .enumerate()
        .map(|(i, r)| new_job(&queue, r, &format!("jobs[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let (ids, duplicates) = if jobs.iter().any(|j| j.singleton_key.is_some()) {
        let mut ids = Vec::with_capacity(jobs.len());
        let mut duplicates = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let sent = store::send_job(&tx, job).await?;
            ids.push(sent.id);
            duplicates.push(sent.duplicate);
        }
        (ids, Some(duplicates))
    } else {
        (store::insert_jobs(&tx, &jobs).await?, None)
    };
    tx.commit().await?;
    metrics::counter!("pgtasks_jobs_submitted_total", "queue" => queue.clone())
        .increment(ids.len() as u64);
    Ok(warp::reply::json(&SubmittedBatch {
        success: true,
        job_ids: ids.iter().map(i64::to_string).collect(),
        queue,
        duplicates,
    }))
}

/// `GET /api/jobs/{id}`.
pub async fn get(state: ApiState, id: i64) -> Result<warp::reply::Json, ApiError> {
    let client = state.pool.get().await?;
    job_response(&client, id).await
}

async fn job_response(
    client: &deadpool_postgres::Client,
    id: i64,
) -> Result<warp::reply::Json, ApiError> {
    let job = store::get_job(client, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    Ok(warp::reply::json(&JobResponse { success: true, job }))
}

/// Longest `?wait=` accepted.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// `GET /api/jobs/{id}?wait=30s`: answers when the job has finished or the
/// wait is over, whichever comes first. Woken by the `pgtasks:done`
/// notification, which finishing statements send only while some process
/// holds the done-waiter lock (schema step 7); the job is re-read at most
/// once a second besides, in case a notification was missed.
pub async fn get_waiting(
    state: ApiState,
    id: i64,
    wait: Option<String>,
) -> Result<warp::reply::Response, ApiError> {
    use warp::Reply as _;
    let Some(wait) = wait else {
        return Ok(get(state, id).await?.into_response());
    };
    let wait = crate::config::parse_duration(&wait)
        .map_err(|e| ApiError::bad_request(format!("wait: {e}")))?
        .min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let read = || async {
        let client = state.pool.get().await?;
        store::get_job(&client, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
    };
    let answer = |job| Ok(warp::reply::json(&JobResponse { success: true, job }).into_response());
    // Most answers need no waiting: unknown, finished, or no wait asked.
    let job = read().await?;
    if job.state.is_finished() || wait.is_zero() || state.shutdown.is_cancelled() {
        return answer(job);
    }
    // Registered, and the lock held, before the next read, so a finish in
    // between is kept. Taking the lock waits for finishes in flight; no
    // longer than the wait (without it, the re-reads below still answer).
    let watch = state.finished.watch(id);
    let _awaiting = match &state.sleeper {
        Some(sleeper) => tokio::time::timeout_at(deadline, sleeper.await_done())
            .await
            .ok()
            .map(|(guard, _held)| guard),
        None => None,
    };
    loop {
        let job = read().await?;
        let now = tokio::time::Instant::now();
        if job.state.is_finished() || now >= deadline || state.shutdown.is_cancelled() {
            return answer(job);
        }
        let nap = (deadline - now).min(std::time::Duration::from_secs(1));
        tokio::select! {
            _ = watch.notified() => {}
            _ = tokio::time::sleep(nap) => {}
            _ = state.shutdown.cancelled() => {}
        }
    }
}

/// The state changes of `POST /api/jobs/{id}/<action>`, each a SQL function.
#[derive(Debug, Clone, Copy)]
pub enum JobAction {
    /// A waiting or running job is cancelled.
    Cancel,
    /// A cancelled job waits again.
    Resume,
    /// A failed job gets one more attempt, due now.
    Retry,
}

impl JobAction {
    fn refusal(self) -> &'static str {
        match self {
            JobAction::Cancel => "only waiting or running jobs can be cancelled",
            JobAction::Resume => "only cancelled jobs can be resumed",
            JobAction::Retry => "only failed jobs can be retried",
        }
    }
}

/// `POST /api/jobs/{id}/cancel`, `/resume`, `/retry`: answers with the job
/// as it is after the change, read on the same connection.
pub async fn act(state: ApiState, id: i64, action: JobAction) -> Result<impl Reply, ApiError> {
    let client = state.pool.get().await?;
    let outcome = match action {
        JobAction::Cancel => store::cancel_job(&client, id).await?,
        JobAction::Resume => store::resume_job(&client, id).await?,
        JobAction::Retry => store::retry_job(&client, id).await?,
    };
    match outcome {
        Transition::Done => job_response(&client, id).await,
        Transition::NotFound => Err(ApiError::not_found(format!("job {id} not found"))),
        Transition::Refused(s) => Err(ApiError::conflict(format!(
            "job {id} is {}; {}",
            s.as_str(),
            action.refusal()
        ))),
    }
}

async fn submit_one(state: &ApiState, job: NewJob) -> Result<warp::reply::Json, ApiError> {
    let queue = job.queue.clone();
    let submitted = state.submitter.submit(job).await?;
    if !submitted.duplicate {
        metrics::counter!("pgtasks_jobs_submitted_total", "queue" => queue.clone()).increment(1);
    }
    Ok(warp::reply::json(&Submitted {
        success: true,
        job_id: submitted.id.to_string(),
        queue,
        duplicate: submitted.duplicate,
    }))
}

fn check_queue(queue: &str) -> Result<(), ApiError> {
    // An invalid name cannot exist, so it is as unknown as a missing one.
    validate_queue_name(queue).map_err(ApiError::not_found)
}

fn object(value: Value, what: &str) -> Result<Value, ApiError> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request(format!(
            "{what} must be a JSON object"
        )))
    }
}

/// Deserialises with the failing field's path in the message.
fn parse<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(e.inner().to_string())
        } else {
            ApiError::bad_request(format!("{path}: {}", e.inner()))
        }
    })
}

fn new_job(queue: &str, r: SubmitRequest, prefix: &str) -> Result<NewJob, ApiError> {
    let field = |name: &str| format!("{prefix}{name}");
    let data = match r.data {
        Some(v) => object(v, &field("data"))?,
        None => Value::Object(Default::default()),
    };
    let run_at = match (r.run_at, r.delay) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "{}: give run_at or delay, not both",
                field("delay")
            )))
        }
        (Some(at), None) => Some(at),
        (None, Some(delay)) if delay.is_finite() && (0.0..=3.2e9).contains(&delay) => None,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "{}: must be a number of seconds, 0 or more",
                field("delay")
            )))
        }
        (None, None) => None,
    };
    if r.singleton_seconds.is_some() && r.singleton_key.is_none() {
        return Err(ApiError::bad_request(format!(
            "{}: needs singleton_key",
            field("singleton_seconds")
        )));
    }
    if r.singleton_seconds.is_some_and(|n| n < 1) {
        return Err(ApiError::bad_request(format!(
            "{}: must be at least 1",
            field("singleton_seconds")
        )));
    }
    if r.max_attempts.is_some_and(|n| n < 1) {
        return Err(ApiError::bad_request(format!(
            "{}: must be at least 1",
            field("max_attempts")
        )));
    }
    Ok(NewJob {
        queue: queue.to_string(),
        data,
        priority: r.priority,
        run_at,
        delay: r
            .delay
            .filter(|_| run_at.is_none())
            .map(std::time::Duration::from_secs_f64),
        max_attempts: r.max_attempts,
        singleton_key: r.singleton_key,
        singleton_seconds: r.singleton_seconds,
    })
}
