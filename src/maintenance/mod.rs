//! Maintenance: background upkeep that must run on one instance at a time.
//! Each pass takes a transaction-level advisory lock; an instance that does
//! not get it skips the pass, so any number of instances may run this loop
//! and a crashed leader is replaced at the next pass.
//!
//! - [`rescuer`]: fails attempts whose lease expired without an ack (the
//!   worker crashed, hung, or lost the database) through the queue's retry
//!   policy, so the job runs again elsewhere or fails visibly;
//! - [`cleaner`]: deletes finished jobs past their queue's retention, in
//!   small batches;
//! - [`scheduler`]: enqueues each due cron run exactly once.
//!
//! Apart from these timed passes, [`vacuum`] vacuums the job table after
//! every so many finished jobs (the completer counts them).
//!
//! Every pass has a `*_once` method that tests call directly.

pub mod cleaner;
pub mod rescuer;
pub mod scheduler;
pub mod vacuum;

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use rescuer::Rescued;

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("maintenance: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("maintenance: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// How often each pass runs.
#[derive(Debug, Clone)]
pub struct Intervals {
    pub rescue: Duration,
    pub clean: Duration,
    pub schedule: Duration,
}

pub struct Maintenance {
    pool: Pool,
    intervals: Intervals,
}

impl Maintenance {
    pub fn new(pool: Pool, intervals: Intervals) -> Self {
        Maintenance { pool, intervals }
    }

    /// Runs passes until `shutdown`; errors are logged and the loop goes on.
    pub async fn run(self, shutdown: CancellationToken) {
        let tick = |period: Duration| {
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let (mut rescue, mut clean, mut schedule) = (
            tick(self.intervals.rescue),
            tick(self.intervals.clean),
            tick(self.intervals.schedule),
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = rescue.tick() => match self.rescue_once().await {
                    Ok(r) if r.retried + r.failed + r.handed_back > 0 => {
                        info!(retried = r.retried, failed = r.failed, handed_back = r.handed_back,
                              "rescued jobs with expired leases or never started")
                    }
                    Ok(_) => debug!("rescue pass found nothing"),
                    Err(e) => failed("rescue", &e),
                },
                _ = clean.tick() => match self.clean_once().await {
                    Ok(n) if n > 0 => info!(deleted = n, "deleted finished jobs past retention"),
                    Ok(_) => debug!("clean pass found nothing"),
                    Err(e) => failed("clean", &e),
                },
                _ = schedule.tick() => match self.schedule_once().await {
                    Ok(n) if n > 0 => debug!(enqueued = n, "enqueued scheduled runs"),
                    Ok(_) => {}
                    Err(e) => failed("schedule", &e),
                },
            }
        }
    }

    /// One rescue pass, if this instance is the leader.
    pub async fn rescue_once(&self) -> Result<Rescued, MaintenanceError> {
        rescuer::rescue_once(&self.pool).await
    }

    /// One clean pass, if this instance is the leader; returns rows deleted.
    pub async fn clean_once(&self) -> Result<u64, MaintenanceError> {
        cleaner::clean_once(&self.pool).await
    }

    /// One scheduler pass, if this instance is the leader; returns jobs enqueued.
    pub async fn schedule_once(&self) -> Result<usize, MaintenanceError> {
        scheduler::schedule_once(&self.pool).await
    }
}

fn failed(pass: &str, error: &MaintenanceError) {
    metrics::counter!("pgtasks_maintenance_errors_total", "pass" => pass.to_string()).increment(1);
    warn!(pass, %error, "maintenance pass failed");
}
