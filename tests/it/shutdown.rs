//! Graceful shutdown: finish what can finish, release the rest, lose nothing.

use std::time::Duration;

use pgtasks::config::QueueConfig;
use pgtasks::{Job, JobContext, Runtime};
use tokio_util::sync::CancellationToken;

use crate::support::{count_state, wait_for_state, Recorder, TestDb, SECS_10};

#[tokio::test]
async fn graceful_shutdown_finishes_short_jobs_and_releases_long_ones() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.worker.shutdown_grace = Duration::from_millis(500);
    // Jobs with {"ms": n} take n milliseconds.
    let handler = |job: Job, _ctx: JobContext| async move {
        let ms = job.data["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(None)
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .queue("mixed", QueueConfig::default(), handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES
               ('mixed', '{\"ms\": 200}'),
               ('mixed', '{\"ms\": 600000}'), ('mixed', '{\"ms\": 600000}')",
        )
        .await
        .unwrap();
    wait_for_state(&client, "active", 3, SECS_10).await;

    let started = std::time::Instant::now();
    shutdown.cancel();
    tokio::time::timeout(SECS_10, running.stopped())
        .await
        .expect("shutdown within its grace period");
    assert!(started.elapsed() < Duration::from_secs(5));

    assert_eq!(count_state(&client, "completed").await, 1);
    let released = client
        .query(
            "SELECT state::text, attempt, lease_until IS NULL, started_at IS NULL
               FROM pgtasks.job WHERE data->>'ms' = '600000'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(released.len(), 2);
    for row in &released {
        assert_eq!(row.get::<_, String>(0), "created", "available at once");
        assert_eq!(row.get::<_, i32>(1), 0, "attempt not burned");
        assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    }

    // Another instance takes the released jobs straight away.
    client
        .execute(
            "UPDATE pgtasks.job SET data = '{}' WHERE state = 'created'",
            &[],
        )
        .await
        .unwrap();
    let recorder = Recorder::default();
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .handler("mixed", recorder.handler())
        .start(shutdown.clone())
        .await
        .unwrap();
    wait_for_state(&client, "completed", 3, SECS_10).await;
    assert_eq!(recorder.total(), 2);
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn handlers_that_give_up_when_cancelled_at_shutdown_release_their_jobs() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.worker.shutdown_grace = Duration::from_millis(100);
    // Returns an error the moment its token fires, as the webhook and
    // command handlers do.
    let handler = |_job: Job, ctx: JobContext| async move {
        ctx.cancelled().cancelled().await;
        Err("cancelled".into())
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .queue("quitters", QueueConfig::default(), handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    crate::support::insert_jobs(&client, "quitters", 8).await;
    wait_for_state(&client, "active", 8, SECS_10).await;
    shutdown.cancel();
    running.stopped().await;
    assert_eq!(count_state(&client, "created").await, 8, "all released");
}
