//! One attempt of one job: run the handler under its lease, turn the result
//! (or a panic, or the lease running out, or shutdown) into an [`Ack`].

use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::completer::{Ack, AckSender, Outcome};
use crate::handler::{HandlerResult, JobContext, SharedHandler};

/// Once its token fires, a handler has this long to return on its own before
/// its future is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
use crate::job::Job;
use crate::wakeup::RunningJobs;

/// Everything an attempt needs, moved into its task.
pub struct Attempt {
    pub job: Job,
    pub lease_left: Duration,
    pub handler: SharedHandler,
    pub acks: AckSender,
    /// Fires when shutdown's grace period is over: stop and release.
    pub abort: CancellationToken,
    /// The concurrency slot; freed once the outcome is handed to the completer.
    pub slot: OwnedSemaphorePermit,
    pub slot_freed: Arc<tokio::sync::Notify>,
    /// For progress reports.
    pub pool: deadpool_postgres::Pool,
    /// Where a cancel of this job finds its token.
    pub running: RunningJobs,
}

impl Attempt {
    pub async fn run(self) {
        let Attempt {
            job,
            lease_left,
            handler,
            acks,
            abort,
            slot,
            slot_freed,
            pool,
            running,
        } = self;
        let queue: Arc<str> = Arc::from(job.queue.as_str());
        let (id, attempt) = (job.id, job.attempt);
        let pickup = (job.started_at - job.run_at.max(job.created_at))
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("pgtasks_pickup_latency_seconds", "queue" => queue.to_string())
            .record(pickup.as_secs_f64());

        let cancelled = abort.child_token();
        running.insert(id, cancelled.clone());
        let ctx = JobContext::for_attempt(cancelled.clone(), pool, id, attempt);
        let started = Instant::now();
        let lease_end = started + lease_left;
        let mut run = pin!(AssertUnwindSafe(handler.handle(job, ctx)).catch_unwind());
        let outcome = tokio::select! {
            biased;
            result = &mut run => outcome_of(result),
            _ = tokio::time::sleep_until(lease_end) => {
                cancelled.cancel();
                match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                    Ok(result) => outcome_of(result),
                    Err(_) => Outcome::Failed(format!(
                        "lease expired: the attempt ran longer than {lease_left:.0?}"
                    )),
                }
            }
            _ = abort.cancelled() => {
                // `cancelled` is a child of `abort`: the handler sees it now.
                match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                    Ok(result) => outcome_of(result),
                    Err(_) => Outcome::Released,
                }
            }
            _ = cancelled.cancelled() => {
                // The job was cancelled (it is no longer active, so whatever
                // is acked here is ignored); give the handler its second.
                let _ = tokio::time::timeout(CANCEL_GRACE, &mut run).await;
                Outcome::Failed("cancelled while running".to_string())
            }
        };
        running.remove(id);
        metrics::histogram!("pgtasks_run_duration_seconds", "queue" => queue.to_string())
            .record(started.elapsed().as_secs_f64());
        if let Outcome::Failed(error) = &outcome {
            warn!(queue = %queue, job_id = id, attempt, error = %error, "job attempt failed");
        }
        let ack = Ack {
            queue,
            id,
            attempt,
            outcome,
        };
        if acks.send(ack).await.is_err() {
            // Only possible if the completer died; the lease rescues the job.
            warn!(
                job_id = id,
                "completer gone; job will be rescued after its lease"
            );
        }
        drop(slot);
        slot_freed.notify_one();
    }
}

type Caught = Result<HandlerResult, Box<dyn std::any::Any + Send>>;

fn outcome_of(result: Caught) -> Outcome {
    match result {
        Ok(Ok(output)) => Outcome::Completed(output),
        Ok(Err(error)) => Outcome::Failed(error.to_string()),
        Err(panic) => Outcome::Failed(format!("handler panicked: {}", panic_message(&*panic))),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
