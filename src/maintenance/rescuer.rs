//! The rescuer: attempts whose lease expired without an outcome, and jobs
//! handed over to a process that went away before starting them.

use deadpool_postgres::Pool;

use super::MaintenanceError;
use crate::job::JobState;
use crate::store;

/// Rows rescued per statement; keeps each transaction short.
const BATCH: i64 = 500;

const MESSAGE: &str =
    "lease expired without an outcome: the worker crashed, hung, or lost the database";

/// What one rescue pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rescued {
    /// Returned to their queue for another attempt.
    pub retried: usize,
    /// Out of attempts: failed (and dead-lettered where configured).
    pub failed: usize,
    /// Handed over at insert to a LISTEN session that ended before the
    /// attempt confirmed them: given back unburned.
    pub handed_back: usize,
    /// Whether this instance held the maintenance lock for the pass.
    pub leader: bool,
}

pub async fn rescue_once(pool: &Pool) -> Result<Rescued, MaintenanceError> {
    let mut client = pool.get().await?;
    let mut total = Rescued::default();
    loop {
        let tx = client.transaction().await?;
        if !store::try_maintenance_lock(&tx).await? {
            return Ok(total);
        }
        total.leader = true;
        let handed_back = store::release_handovers(&tx, BATCH as i32).await?;
        let rescued = store::rescue_expired(&tx, BATCH, MESSAGE).await?;
        tx.commit().await?;
        total.handed_back += handed_back as usize;
        for r in &rescued {
            if r.state == JobState::Retry {
                total.retried += 1;
            } else {
                total.failed += 1;
            }
        }
        if (rescued.len() as i64) < BATCH && handed_back < BATCH {
            return Ok(total);
        }
    }
}
