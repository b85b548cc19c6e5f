//! Handlers: the code that runs a job. A Rust user registers one per queue,
//! as a closure or a type implementing [`Handler`].
//!
//! ```no_run
//! # use pgtasks::{Job, JobContext, HandlerResult};
//! async fn send_email(job: Job, _ctx: JobContext) -> HandlerResult {
//!     let to = job.data["to"].as_str().ok_or("missing `to`")?;
//!     println!("sending to {to}");
//!     Ok(None)
//! }
//! ```
//!
//! Any error fails the attempt and the queue's policy decides when to retry.
//! A handler that knows better returns a [`JobError`]: fail for good
//! ([`JobError::permanent`]) or retry no sooner than a delay
//! ([`JobError::retry_after`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::job::Job;

/// Any error a handler returns; its `Display` text is stored on the job.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `Ok(Some(output))` stores `output` on the completed job; an error fails the
/// attempt (retried by the queue's policy, unless it is a [`JobError`] that
/// says otherwise).
pub type HandlerResult = Result<Option<Value>, BoxError>;

/// When a failed attempt runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The queue's policy: after its (backed-off) delay, while attempts remain.
    Policy,
    /// Like `Policy`, but no sooner than this long from now (an HTTP
    /// `Retry-After`, say). The delay is still capped by the queue's
    /// `retry_delay_max`.
    NotBefore(Duration),
    /// Never: the job fails now, whatever attempts remain, and goes to the
    /// queue's dead-letter queue if it has one.
    Never,
}

/// An error that tells the worker how to retry. Return it (boxed, e.g. with
/// `?` or `.into()`) from a handler; any other error means [`Retry::Policy`].
///
/// ```
/// # use pgtasks::{HandlerResult, JobError};
/// fn check(status: u16) -> HandlerResult {
///     if status == 404 {
///         return Err(JobError::permanent("the account is gone").into());
///     }
///     Ok(None)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    message: String,
    retry: Retry,
}

impl JobError {
    /// A failure retried by the queue's policy.
    pub fn new(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            retry: Retry::Policy,
        }
    }

    /// A failure retried no sooner than `delay` from now.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        JobError {
            message: message.into(),
            retry: Retry::NotBefore(delay),
        }
    }

    /// A failure that is never retried.
    pub fn permanent(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            retry: Retry::Never,
        }
    }

    /// The text stored in the job's `last_error` and `errors`.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The retry decision of any handler error: a [`JobError`]'s own, else
    /// [`Retry::Policy`].
    pub fn from_boxed(error: &BoxError) -> JobError {
        match error.downcast_ref::<JobError>() {
            Some(job_error) => job_error.clone(),
            None => JobError::new(error.to_string()),
        }
    }
}

/// What a running attempt may observe besides its job.
#[derive(Clone)]
pub struct JobContext {
    cancelled: CancellationToken,
    progress: Option<ProgressTarget>,
}

#[derive(Clone)]
struct ProgressTarget {
    pool: deadpool_postgres::Pool,
    id: i64,
    attempt: i32,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("cancelled", &self.cancelled.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl JobContext {
    /// A context without a database (progress reports are dropped); for
    /// calling handlers directly, e.g. in unit tests.
    pub fn new(cancelled: CancellationToken) -> Self {
        JobContext {
            cancelled,
            progress: None,
        }
    }

    pub(crate) fn for_attempt(
        cancelled: CancellationToken,
        pool: deadpool_postgres::Pool,
        id: i64,
        attempt: i32,
    ) -> Self {
        JobContext {
            cancelled,
            progress: Some(ProgressTarget { pool, id, attempt }),
        }
    }

    /// Fires when the attempt must stop: the job was cancelled, its lease
    /// ran out, or shutdown's grace period is over. The handler then has a
    /// second to return before its future is dropped; this matters most for
    /// work it handed to other tasks or processes. An error returned after
    /// shutdown fired releases the job (the attempt is not counted); after
    /// the lease ran out it is a failed attempt.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }

    /// Records progress (0–100 and a short message) on the job, visible in
    /// `GET /api/jobs/{id}` as `progress`. Returns false when the attempt is
    /// no longer current (cancelled, rescued).
    pub async fn progress(&self, percent: f64, message: &str) -> Result<bool, BoxError> {
        let Some(target) = &self.progress else {
            return Ok(false);
        };
        let client = target.pool.get().await?;
        let message = (!message.is_empty()).then_some(message);
        Ok(
            crate::store::report_progress(&client, target.id, target.attempt, percent, message)
                .await?,
        )
    }
}

/// Runs one attempt of one job.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, HandlerResult>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Job, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, HandlerResult> {
        Box::pin(self(job, ctx))
    }
}

/// A shared handler.
pub type SharedHandler = Arc<dyn Handler>;
