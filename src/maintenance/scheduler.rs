//! The scheduler: enqueues each due cron run exactly once.
//!
//! Under the maintenance lock it locks due schedules, enqueues the run with
//! a singleton key naming the schedule and the run time (a unique index makes
//! a second enqueue of the same run a no-op, whoever tries), and computes the
//! next run after the database's `now()`. Runs missed while no instance was
//! up are caught up once, not once per missed slot. A schedule whose
//! expression or zone cannot be read gets `last_error` and is skipped until
//! it is changed.

use deadpool_postgres::Pool;
use tracing::{info, warn};

use super::MaintenanceError;
use crate::schedule::CronSchedule;
use crate::store;

const BATCH: i64 = 100;

pub async fn schedule_once(pool: &Pool) -> Result<usize, MaintenanceError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if !store::try_maintenance_lock(&tx).await? {
        return Ok(0);
    }
    let mut enqueued = 0;
    for (schedule, now) in store::due_schedules(&tx, BATCH).await? {
        let parsed = match CronSchedule::parse(&schedule.cron, &schedule.timezone) {
            Ok(parsed) => parsed,
            Err(error) => {
                warn!(schedule = %schedule.name, %error, "schedule skipped");
                store::set_schedule_run(&tx, &schedule.name, None, None, None, Some(&error))
                    .await?;
                continue;
            }
        };
        let (mut ran_at, mut job_id) = (None, None);
        if let Some(due) = schedule.next_run_at {
            job_id = store::enqueue_scheduled(&tx, &schedule, due).await?;
            ran_at = Some(due);
            if let Some(id) = job_id {
                enqueued += 1;
                info!(schedule = %schedule.name, job_id = id, run_at = %due, "scheduled run enqueued");
            }
        }
        let after = schedule.next_run_at.map_or(now, |due| due.max(now));
        match parsed.next_after(after) {
            Ok(next) => {
                store::set_schedule_run(&tx, &schedule.name, Some(next), ran_at, job_id, None)
                    .await?
            }
            Err(error) => {
                store::set_schedule_run(&tx, &schedule.name, None, ran_at, job_id, Some(&error))
                    .await?
            }
        }
    }
    tx.commit().await?;
    Ok(enqueued)
}
