//! The listener's and the sleep connection's reconnects, and running
//! without a listener.

use std::time::Duration;

use pgtasks::Runtime;
use tokio_util::sync::CancellationToken;

use crate::support::{
    insert_jobs, sleeper_locks, start_recording, start_recording_with, wait_for, wait_for_state,
    Recorder, TestDb, SECS_10,
};

#[tokio::test]
async fn listener_reconnects_after_its_backend_is_killed_and_misses_nothing() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    // Poll every 60 s: only the listener can run these jobs promptly.
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let client = db.client().await;

    assert_eq!(crate::support::kill_listener(&client).await, 1);
    // Inserted while the listener is down or reconnecting: its notification
    // may be lost, so the reconnect must wake the queue.
    insert_jobs(&client, "readme-queue", 1).await;
    wait_for("reconnect", SECS_10, || async {
        (running.listener().reconnects() >= 1 && running.listener().is_connected()).then_some(())
    })
    .await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    // And notifications flow again on the new connection.
    insert_jobs(&client, "readme-queue", 1).await;
    wait_for_state(&client, "completed", 2, SECS_10).await;
    assert_eq!(recorder.total(), 2);
    shutdown.cancel();
    running.stopped().await;
}

/// The sleep connection's session carries the sleeping worker's lock; when
/// it is lost, the reconnect must make the worker take the lock again, or
/// inserts would stop notifying until the poll (a minute here).
#[tokio::test]
async fn sleep_connection_reconnects_and_the_worker_arms_again() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let client = db.client().await;
    let queue_locks = || sleeper_locks(&client, "l.mode = 'ExclusiveLock'");
    assert_eq!(
        queue_locks().await,
        1,
        "the idle worker holds its queue's lock"
    );
    let sleeper_pid = || async {
        client
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                  WHERE application_name = 'pgtasks-sleeper' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .map(|row| row.get::<_, i32>(0))
    };
    let killed = sleeper_pid().await.expect("a sleep connection");
    client
        .execute("SELECT pg_terminate_backend($1)", &[&killed])
        .await
        .unwrap();
    wait_for("the lock on a new sleep session", SECS_10, || async {
        let replaced = sleeper_pid().await.is_some_and(|pid| pid != killed);
        (replaced && queue_locks().await == 1).then_some(())
    })
    .await;
    insert_jobs(&client, "readme-queue", 1).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;
    assert_eq!(recorder.total(), 1);
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn poll_only_mode_runs_jobs_without_a_listener() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.worker.listen = false;
    config.worker.poll_interval = Duration::from_millis(100);
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording_with(config, &recorder).await;
    let client = db.client().await;
    insert_jobs(&client, "readme-queue", 20).await;
    wait_for_state(&client, "completed", 20, SECS_10).await;
    assert_eq!(recorder.total(), 20);
    assert!(!running.listener().is_connected());
    let listeners: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'pgtasks-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listeners, 0);
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn startup_waits_for_an_unreachable_database_then_gives_up_naming_it() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.database.url = "postgres://postgres@127.0.0.1:1/none".into();
    config.database.connect_timeout = Duration::from_millis(200);
    config.database.startup_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let result = Runtime::new(config).start(CancellationToken::new()).await;
    let error = result.err().expect("no database, no start").to_string();
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "it retried for a while"
    );
    assert!(started.elapsed() < Duration::from_secs(8), "then gave up");
    assert!(error.contains("connect"), "{error}");
}
