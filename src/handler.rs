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

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::job::Job;

/// Any error a handler returns; its `Display` text is stored on the job.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `Ok(Some(output))` stores `output` on the completed job; an error fails the
/// attempt (retried by the queue's policy).
pub type HandlerResult = Result<Option<Value>, BoxError>;

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
    /// work it handed to other tasks or processes.
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
