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
#[derive(Debug, Clone)]
pub struct JobContext {
    cancelled: CancellationToken,
}

impl JobContext {
    pub(crate) fn new(cancelled: CancellationToken) -> Self {
        JobContext { cancelled }
    }

    /// Fires when the attempt must stop: its lease ran out, or shutdown's
    /// grace period is over. The handler's future is dropped right after, so
    /// this matters for work it handed to other tasks or processes.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
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
