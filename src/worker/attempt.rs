//! Attempts: run the handler under the job's lease, turn the result (or a
//! panic, or the lease running out, or shutdown, or a cancel) into an
//! [`Ack`]; then the next job claimed ahead, on the same slot.
//!
//! A handler error carries its retry decision ([`JobError`]) to the
//! completer. After the lease ran out an error is a failed attempt under the
//! queue's policy; after shutdown's grace period anything but success
//! releases the job.

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
use super::runway::{Ready, Runway};
use crate::handler::{HandlerResult, JobContext, JobError, SharedHandler};
use crate::job::Job;
use crate::metrics::QueueMetrics;
use crate::store;
use crate::wakeup::{QueueWakeup, RunningJobs};

/// Once its token fires, a handler has this long to return on its own before
/// its future is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// How long a handed-over job runs before its attempt confirms it. Shorter
/// ones finish first and never do; until then, losing the LISTEN session
/// it came through lets the rescuer give it back. Well inside the first
/// lease of a handover (15 s, schema step 9), runway wait included.
const CONFIRM_AFTER: Duration = Duration::from_millis(250);

/// A concurrency slot's task: runs its first job, then, while the runway
/// holds jobs claimed ahead, the next one, and frees the slot when none is
/// left.
pub struct Attempt {
    /// The queue's name and metric handles, shared by its attempts.
    pub queue: Arc<str>,
    pub metrics: Arc<QueueMetrics>,
    pub handler: SharedHandler,
    pub acks: AckSender,
    /// Fires when shutdown's grace period is over: stop and release.
    pub abort: CancellationToken,
    /// The concurrency slot; freed once the last outcome is handed to the
    /// completer.
    pub slot: OwnedSemaphorePermit,
    pub slot_freed: Arc<tokio::sync::Notify>,
    /// For progress reports.
    pub pool: deadpool_postgres::Pool,
    /// Where a cancel of this job finds its token.
    pub running: RunningJobs,
    pub runway: Arc<Runway>,
    /// Tells jobs handed through an earlier LISTEN session.
    pub wakeup: Arc<QueueWakeup>,
}

impl Attempt {
    pub async fn run(self, first: Ready) {
        let mut next = Some(first);
        while let Some(ready) = next {
            if self.wakeup.handed_earlier(&ready) {
                // The rescuer's (see `QueueWakeup::handed_earlier`).
                self.running.remove(ready.job.id, ready.job.attempt);
                next = self.runway.next();
                continue;
            }
            let lease_left = ready.lease_left_now();
            let Ready {
                job,
                cancelled,
                handed,
                ..
            } = ready;
            let (id, attempt) = (job.id, job.attempt);
            let outcome = if cancelled.is_cancelled() && !self.abort.is_cancelled() {
                // Cancelled while on the runway: the job is no longer
                // active, so this ack is ignored, as a running one's is.
                Some(Outcome::Failed(JobError::new(
                    "cancelled before it started",
                )))
            } else if let Some(lease_left) = lease_left {
                self.run_handler(job, lease_left, &cancelled, handed.is_some())
                    .await
            } else {
                // Waited too long on the runway: claimed again, it gets a
                // whole lease.
                Some(Outcome::Released)
            };
            self.running.remove(id, attempt);
            if let Some(outcome) = outcome {
                self.acknowledge(id, attempt, outcome).await;
            }
            next = self.runway.next();
        }
        drop(self.slot);
        self.slot_freed.notify_one();
    }

    async fn run_handler(
        &self,
        job: Job,
        lease_left: Duration,
        cancelled: &CancellationToken,
        handed: bool,
    ) -> Option<Outcome> {
        let pickup = (job.started_at - job.run_at.max(job.created_at))
            .to_std()
            .unwrap_or_default();
        self.metrics.pickup_latency.record(pickup.as_secs_f64());

        let (id, attempt) = (job.id, job.attempt);
        let ctx = JobContext::for_attempt(cancelled.clone(), self.pool.clone(), id, attempt);
        let started = Instant::now();
        let lease_end = started + lease_left;
        let abort = &self.abort;
        let mut run = pin!(AssertUnwindSafe(self.handler.handle(job, ctx)).catch_unwind());
        let mut confirm = pin!(self.confirm_handover(id, attempt));
        let mut confirming = handed;
        let mut given_back = false;
        // Biased, shutdown first: the handler sees `abort` through its
        // token in the same poll (a claimed job's is its child; a handed
        // one's is cancelled here), and must not turn the shutdown into a
        // failed attempt by returning before this select notices it.
        let outcome = loop {
            break tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    cancelled.cancel();
                    // Whatever the handler returns short of success was cut short
                    // by the shutdown, not by the job: give the attempt back.
                    match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                        Ok(Ok(Ok(output))) => Outcome::Completed(output),
                        _ => Outcome::Released,
                    }
                }
                _ = tokio::time::sleep_until(lease_end) => {
                    cancelled.cancel();
                    match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                        Ok(result) => match outcome_of(result) {
                            Outcome::Failed(error) => Outcome::Failed(JobError::new(format!(
                                "lease expired: the attempt ran longer than {lease_left:.0?} ({})",
                                error.message()
                            ))),
                            finished => finished,
                        },
                        Err(_) => Outcome::Failed(JobError::new(format!(
                            "lease expired: the attempt ran longer than {lease_left:.0?}"
                        ))),
                    }
                }
                kept = &mut confirm, if confirming => {
                    confirming = false;
                    if !kept {
                        // Given back meanwhile: it is no longer this attempt's,
                        // and its number may be another's now. Nothing to write.
                        warn!(queue = %self.queue, job_id = id, attempt,
                              "handed-over job was given back before it could be confirmed; cancelling");
                        given_back = true;
                        cancelled.cancel();
                    }
                    continue;
                }
                result = &mut run => outcome_of(result),
                _ = cancelled.cancelled() => {
                    // The job was cancelled: it is no longer active, so whatever
                    // is acked here is ignored. Give the handler its second.
                    let _ = tokio::time::timeout(CANCEL_GRACE, &mut run).await;
                    Outcome::Failed(JobError::new("cancelled while running"))
                }
            };
        };
        let took = started.elapsed();
        self.metrics.run_duration.record(took.as_secs_f64());
        self.runway.record_run(took);
        if given_back {
            return None;
        }
        if let Outcome::Failed(error) = &outcome {
            warn!(queue = %self.queue, job_id = id, attempt, error = %error,
                  retry = ?error.retry(), "job attempt failed");
        }
        Some(outcome)
    }

    /// For a handed-over job still running after [`CONFIRM_AFTER`]: tells
    /// the database it runs here (see `store::confirm_handover`), trying
    /// again each second while the database refuses. False when the job
    /// was given back meanwhile.
    async fn confirm_handover(&self, id: i64, attempt: i32) -> bool {
        tokio::time::sleep(CONFIRM_AFTER).await;
        loop {
            let confirmed = async {
                let client = self.pool.get().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    store::confirm_handover(&client, id, attempt).await?,
                )
            };
            match confirmed.await {
                Ok(kept) => return kept,
                Err(error) => {
                    warn!(queue = %self.queue, job_id = id, %error,
                          "confirming a handed-over job failed; trying again in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn acknowledge(&self, id: i64, attempt: i32, outcome: Outcome) {
        Ack {
            queue: self.queue.clone(),
            metrics: self.metrics.clone(),
            id,
            attempt,
            outcome,
        }
        .send(&self.acks)
        .await;
    }
}

type Caught = Result<HandlerResult, Box<dyn std::any::Any + Send>>;

fn outcome_of(result: Caught) -> Outcome {
    match result {
        Ok(Ok(output)) => Outcome::Completed(output),
        Ok(Err(error)) => Outcome::Failed(JobError::from_boxed(&error)),
        Err(panic) => Outcome::Failed(JobError::new(format!(
            "handler panicked: {}",
            panic_message(&*panic)
        ))),
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
