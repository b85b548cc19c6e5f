//! Maintenance: background upkeep that must run on one instance at a time.
//! Each pass takes a transaction-level advisory lock; an instance that does
//! not get it skips the pass, so any number of instances may run this loop.
//!
//! - the rescuer fails attempts whose lease expired without an ack (the
//!   worker crashed, hung, or lost the database) through the queue's normal
//!   retry policy, so the job runs again elsewhere or fails visibly.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::job::JobState;
use crate::store;

/// Rows rescued per statement; keeps each transaction short.
const RESCUE_BATCH: i64 = 500;

const RESCUE_MESSAGE: &str =
    "lease expired without an outcome: the worker crashed, hung, or lost the database";

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error("maintenance: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("maintenance: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What one rescue pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rescued {
    /// Returned to their queue for another attempt.
    pub retried: usize,
    /// Out of attempts: failed (and dead-lettered where configured).
    pub failed: usize,
    /// Whether this instance held the maintenance lock for the pass.
    pub leader: bool,
}

pub struct Maintenance {
    pool: Pool,
    rescue_interval: Duration,
}

impl Maintenance {
    pub fn new(pool: Pool, rescue_interval: Duration) -> Self {
        Maintenance {
            pool,
            rescue_interval,
        }
    }

    /// Runs passes until `shutdown`; errors are logged and the loop goes on.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.rescue_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.rescue_once().await {
                Ok(r) if r.retried + r.failed > 0 => {
                    info!(
                        retried = r.retried,
                        failed = r.failed,
                        "rescued jobs with expired leases"
                    )
                }
                Ok(_) => debug!("rescue pass found nothing"),
                Err(e) => {
                    metrics::counter!("pgtasks_maintenance_errors_total").increment(1);
                    warn!(error = %e, "rescue pass failed")
                }
            }
        }
    }

    /// One rescue pass, if this instance is the leader.
    pub async fn rescue_once(&self) -> Result<Rescued, MaintenanceError> {
        let mut client = self.pool.get().await?;
        let mut total = Rescued::default();
        loop {
            let tx = client.transaction().await?;
            if !store::try_maintenance_lock(&tx).await? {
                return Ok(total);
            }
            total.leader = true;
            let rescued = store::rescue_expired(&tx, RESCUE_BATCH, RESCUE_MESSAGE).await?;
            tx.commit().await?;
            for r in &rescued {
                if r.state == JobState::Retry {
                    total.retried += 1;
                } else {
                    total.failed += 1;
                }
            }
            if (rescued.len() as i64) < RESCUE_BATCH {
                return Ok(total);
            }
        }
    }
}
