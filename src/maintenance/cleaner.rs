//! The cleaner: finished jobs past their queue's retention are deleted in
//! small batches, each its own short transaction, so it never holds long
//! locks and the job table stays small under sustained load.

use deadpool_postgres::Pool;

use super::MaintenanceError;
use crate::store;

/// Rows deleted per transaction.
const BATCH: i64 = 1000;
/// Batches per pass, so one pass cannot monopolise a connection.
const MAX_BATCHES: usize = 50;

pub async fn clean_once(pool: &Pool) -> Result<u64, MaintenanceError> {
    let mut client = pool.get().await?;
    let mut deleted = 0;
    for _ in 0..MAX_BATCHES {
        let tx = client.transaction().await?;
        if !store::try_maintenance_lock(&tx).await? {
            break;
        }
        let n = store::delete_expired(&tx, BATCH).await?;
        tx.commit().await?;
        deleted += n;
        if n < BATCH as u64 {
            break;
        }
    }
    Ok(deleted)
}
