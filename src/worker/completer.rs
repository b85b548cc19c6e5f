//! The completer: writes the outcome of finished attempts in batches.
//!
//! Attempts send an [`Ack`] over a channel; the completer takes the first one,
//! then everything else already waiting, and writes them with one statement
//! per kind. An idle system therefore writes each ack at once, and a busy one
//! folds hundreds into a statement. A failed write is retried (acks are never
//! dropped) until it succeeds or the process gives up at the end of shutdown,
//! in which case the jobs' leases expire and the rescuer retries them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::handler::{JobError, Retry};
use crate::job::JobState;
use crate::maintenance::vacuum::VacuumAfter;
use crate::metrics::QueueMetrics;
use crate::store::{self, Failure};
use crate::wakeup::Wakeups;

/// Largest number of acks written in one statement.
pub const MAX_BATCH: usize = 1000;

/// How an attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Completed(Option<Value>),
    /// The error's message is stored; its [`Retry`] goes to `fail_jobs`.
    Failed(JobError),
    /// Not run to the end because the process is stopping: give the attempt
    /// back unburned.
    Released,
}

#[derive(Debug)]
pub struct Ack {
    pub queue: Arc<str>,
    pub metrics: Arc<QueueMetrics>,
    pub id: i64,
    pub attempt: i32,
    pub outcome: Outcome,
}

pub type AckSender = mpsc::Sender<Ack>;

impl Ack {
    /// Hands the outcome to the completer. That fails only if the completer
    /// died; the job's lease then expires and the rescuer takes it.
    pub async fn send(self, acks: &AckSender) {
        let id = self.id;
        if acks.send(self).await.is_err() {
            warn!(
                job_id = id,
                "completer gone; job will be rescued after its lease"
            );
        }
    }
}

pub struct Completer {
    pool: Pool,
    wakeups: Wakeups,
    acks: mpsc::Receiver<Ack>,
    /// Queues with retention 0: their completed jobs are deleted, not kept.
    discard: HashSet<String>,
    /// Queues whose workers look again once a job is finished (singleton,
    /// stately: the finished job may have been holding its key).
    wake_after_finish: HashSet<String>,
    /// Told how many jobs each write finished.
    vacuum: Option<VacuumAfter>,
}

impl Completer {
    pub fn new(
        pool: Pool,
        wakeups: Wakeups,
        discard: HashSet<String>,
        wake_after_finish: HashSet<String>,
        vacuum: Option<VacuumAfter>,
        capacity: usize,
    ) -> (Completer, AckSender) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Completer {
                pool,
                wakeups,
                acks: rx,
                discard,
                wake_after_finish,
                vacuum,
            },
            tx,
        )
    }

    /// Runs until every sender is dropped and all acks are written, or until
    /// `give_up` fires while the database is unreachable.
    pub async fn run(mut self, give_up: CancellationToken) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.acks.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let mut failures = 0u32;
            loop {
                match self.write(&batch).await {
                    Ok(()) => {
                        if let Some(vacuum) = &self.vacuum {
                            vacuum.finished(batch.len() as u64);
                        }
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        metrics::counter!("pgtasks_ack_write_errors_total").increment(1);
                        let delay = Duration::from_millis(50 * u64::from(failures.min(40)));
                        warn!(error = %e, acks = batch.len(), retry_in_ms = delay.as_millis() as u64,
                              "could not write job outcomes; retrying");
                        tokio::select! {
                            _ = give_up.cancelled() => {
                                error!(acks = batch.len(), "gave up writing job outcomes at shutdown; \
                                       these jobs will be retried when their leases expire");
                                return;
                            }
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
            batch.clear();
        }
    }

    async fn write(&self, batch: &[Ack]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let client = self.pool.get().await?;
        let mut completed = Columns::default();
        let mut discarded = Columns::default();
        let mut failed = Columns::default();
        let mut released = Columns::default();
        let mut outputs = Vec::new();
        let mut failures = Vec::new();
        for ack in batch {
            match &ack.outcome {
                Outcome::Completed(_) if self.discard.contains(&*ack.queue) => discarded.push(ack),
                Outcome::Completed(output) => {
                    completed.push(ack);
                    outputs.push(output.clone());
                }
                Outcome::Failed(error) => {
                    failed.push(ack);
                    failures.push(Failure {
                        message: error.message().to_string(),
                        not_before: match error.retry() {
                            Retry::NotBefore(delay) => Some(delay),
                            Retry::Policy | Retry::Never => None,
                        },
                        final_attempt: error.retry() == Retry::Never,
                    });
                }
                Outcome::Released => released.push(ack),
            }
        }
        let mut finished = Vec::new();
        // Completions tell `?wait=` requests in the same statement.
        if !discarded.ids.is_empty() {
            store::delete_completed(&client, &discarded.ids, &discarded.attempts).await?;
        }
        if !completed.ids.is_empty() {
            store::complete_jobs(&client, &completed.ids, &completed.attempts, &outputs).await?;
        }
        // Both kinds are completions, kept or not.
        for ack in batch
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Completed(_)))
        {
            ack.metrics.completed.increment(1);
        }
        if !failed.ids.is_empty() {
            let results =
                store::fail_jobs(&client, &failed.ids, &failed.attempts, &failures).await?;
            let acks: HashMap<i64, &Ack> = batch
                .iter()
                .filter(|a| matches!(a.outcome, Outcome::Failed(_)))
                .map(|a| (a.id, a))
                .collect();
            for result in &results {
                let Some(ack) = acks.get(&result.id) else {
                    continue;
                };
                if result.state == JobState::Retry {
                    ack.metrics.retried.increment(1);
                    // The retry is due later: let the local worker arm its timer.
                    if let Some(wakeup) = self.wakeups.get(&ack.queue) {
                        wakeup.schedule_changed();
                    }
                } else {
                    ack.metrics.failed.increment(1);
                    finished.push(result.id);
                }
            }
        }
        if !released.ids.is_empty() {
            let n = store::release_jobs(&client, &released.ids, &released.attempts).await?;
            debug!(released = n, "released running jobs back to their queues");
        }
        if !finished.is_empty() {
            // Wakes `?wait=` requests on any instance; the outcome is already committed.
            store::notify_finished(&client, &finished).await?;
        }
        if !self.wake_after_finish.is_empty() {
            let queues: HashSet<&str> = batch.iter().map(|a| &*a.queue).collect();
            for queue in queues
                .into_iter()
                .filter(|q| self.wake_after_finish.contains(*q))
            {
                if let Some(wakeup) = self.wakeups.get(queue) {
                    wakeup.wake();
                }
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Columns {
    ids: Vec<i64>,
    attempts: Vec<i32>,
}

impl Columns {
    fn push(&mut self, ack: &Ack) {
        self.ids.push(ack.id);
        self.attempts.push(ack.attempt);
    }
}
