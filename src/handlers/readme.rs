//! The seed's `readme-queue` worker: logs each job it receives.

use tracing::info;

use crate::handler::{HandlerResult, JobContext};
use crate::job::Job;

/// Logs the job's id and data, as the seed's readme worker does.
pub async fn handle(job: Job, _ctx: JobContext) -> HandlerResult {
    info!(queue = %job.queue, job_id = job.id, attempt = job.attempt, data = %job.data, "processing readme job");
    Ok(None)
}
