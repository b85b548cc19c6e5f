//! The engine end to end: SQL inserts run by live workers, retries, dead
//! letters, panics, leases, and several runtimes on one database.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgtasks::config::QueueConfig;
use pgtasks::maintenance::Maintenance;
use pgtasks::{Job, JobContext, Runtime};
use tokio_util::sync::CancellationToken;

use crate::support::{
    count_state, insert_jobs, listening, start_recording, start_recording_with, wait_for_state,
    Recorder, TestDb, SECS_10,
};

#[tokio::test]
async fn psql_style_insert_is_run_by_a_live_worker_within_milliseconds() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;

    let client = db.client().await;
    let id: i64 = client
        .query_one(
            "INSERT INTO pgtasks.job (queue, data) VALUES ('readme-queue', '{\"arg1\":\"read me\"}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_for_state(&client, "completed", 1, SECS_10).await;
    let row = client
        .query_one(
            "SELECT attempt, data->>'arg1', started_at - created_at < interval '1 second'
               FROM pgtasks.job WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, String>(1), "read me");
    // The poll is 60 s here: only the notification can explain this.
    assert!(row.get::<_, bool>(2));
    assert_eq!(recorder.runs().get(&id), Some(&1));
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn burst_of_1000_rows_is_few_wakeups_and_every_job_runs_once() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let client = db.client().await;
    insert_jobs(&client, "readme-queue", 1000).await;
    wait_for_state(&client, "completed", 1000, Duration::from_secs(30)).await;

    let runs = recorder.runs();
    assert_eq!(runs.len(), 1000);
    assert!(runs.values().all(|&n| n == 1), "a job ran twice");
    let wakeup = running.wakeup("readme-queue").unwrap();
    let stats = running.stats("readme-queue").unwrap();
    // The first row is handed to the sleeping worker; one more
    // notification wakes it for the rest.
    assert_eq!(stats.handed(), 1);
    assert_eq!(
        wakeup.notifications(),
        2,
        "one statement, two notifications"
    );
    // Each may wake it, as may the wakeups of the start (the listener's and
    // the sleep connection's) if still pending: few, not a thousand.
    assert!(
        stats.notified() <= 4,
        "notified wakeups: {}",
        stats.notified()
    );
    // Concurrency 10 and 100 claimed ahead: a claim takes at most 110 jobs,
    // and ten on average at least.
    assert_eq!(stats.claimed(), 999);
    assert!(
        (10..=100).contains(&stats.claims()),
        "claims: {}",
        stats.claims()
    );
    shutdown.cancel();
    running.stopped().await;
}

/// A handler that always fails and records when each attempt started.
fn failing(starts: Arc<Mutex<Vec<DateTime<Utc>>>>) -> impl pgtasks::Handler {
    move |job: Job, _ctx: JobContext| {
        let starts = starts.clone();
        async move {
            starts.lock().unwrap().push(Utc::now());
            Err(format!("boom on attempt {}", job.attempt).into())
        }
    }
}

#[tokio::test]
async fn failing_job_retries_with_backoff_then_fails_visibly() {
    let db = TestDb::new().await;
    let starts = Arc::new(Mutex::new(Vec::new()));
    let policy = QueueConfig {
        retry_limit: 2,
        retry_delay: Duration::from_millis(200),
        retry_backoff: true,
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .queue("flaky", policy, failing(starts.clone()))
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    insert_jobs(&client, "flaky", 1).await;
    wait_for_state(&client, "failed", 1, SECS_10).await;

    let row = client
        .query_one(
            "SELECT attempt, last_error, jsonb_array_length(errors), errors->1->>'error', completed_at IS NOT NULL
               FROM pgtasks.job",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    assert_eq!(row.get::<_, String>(1), "boom on attempt 3");
    assert_eq!(row.get::<_, i32>(2), 3);
    assert_eq!(row.get::<_, String>(3), "boom on attempt 2");
    assert!(row.get::<_, bool>(4));

    // Backoff: 200 ms, then 400 ms; the worker's timer (not the 60 s poll)
    // ran the retries on time.
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 3);
    let gap1 = (starts[1] - starts[0]).num_milliseconds();
    let gap2 = (starts[2] - starts[1]).num_milliseconds();
    assert!((190..5000).contains(&gap1), "first retry after {gap1} ms");
    assert!((390..5000).contains(&gap2), "second retry after {gap2} ms");
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn exhausted_job_is_copied_to_the_dead_letter_queue_with_its_history() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config
        .queues
        .insert("work-dead".into(), QueueConfig::default());
    let policy = QueueConfig {
        retry_limit: 0,
        dead_letter: Some("work-dead".into()),
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .queue("work", policy, failing(Arc::default()))
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES ('work', '{\"k\": 7}')",
            &[],
        )
        .await
        .unwrap();
    wait_for_state(&client, "failed", 1, SECS_10).await;
    let dead = client
        .query_one(
            "SELECT state::text, data->>'k', errors->0->>'error', jsonb_array_length(errors)
               FROM pgtasks.job WHERE queue = 'work-dead'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dead.get::<_, String>(0), "created");
    assert_eq!(dead.get::<_, String>(1), "7");
    assert_eq!(dead.get::<_, String>(2), "boom on attempt 1");
    assert_eq!(dead.get::<_, i32>(3), 2);
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn panicking_handler_fails_the_attempt_and_the_worker_survives() {
    let db = TestDb::new().await;
    let handler = |job: Job, _ctx: JobContext| async move {
        if job.data["panic"].as_bool() == Some(true) {
            panic!("handler exploded on job {}", job.id);
        }
        Ok(Some(serde_json::json!({"ok": job.id})))
    };
    let policy = QueueConfig {
        retry_limit: 0,
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .queue("risky", policy, handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES ('risky', '{\"panic\": true}')",
            &[],
        )
        .await
        .unwrap();
    wait_for_state(&client, "failed", 1, SECS_10).await;
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES ('risky', '{}')",
            &[],
        )
        .await
        .unwrap();
    wait_for_state(&client, "completed", 1, SECS_10).await;
    let rows = client
        .query(
            "SELECT state::text, last_error, output FROM pgtasks.job ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let error: String = rows[0].get(1);
    assert!(
        error.starts_with("handler panicked: handler exploded on job"),
        "{error}"
    );
    let output: serde_json::Value = rows[1].get(2);
    assert!(output["ok"].is_i64());
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn expired_lease_of_a_crashed_worker_is_rescued_and_run_again() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgtasks.queue (name, retry_limit) VALUES ('readme-queue', 1);
             INSERT INTO pgtasks.job (queue) VALUES ('readme-queue'), ('readme-queue');
             -- What a crash leaves: active rows whose lease ran out. The
             -- second is on its last attempt.
             UPDATE pgtasks.job SET state = 'active', attempt = 1, started_at = now(),
                    lease_until = now() - interval '1 second' WHERE id = 1;
             UPDATE pgtasks.job SET state = 'active', attempt = 2, started_at = now(),
                    lease_until = now() - interval '1 second' WHERE id = 2;",
        )
        .await
        .unwrap();
    let mut config = db.config();
    config.queues.get_mut("readme-queue").unwrap().retry_limit = 1;
    let pool = pgtasks::db::create_pool(&config.database).unwrap();
    let rescued = Maintenance::new(pool.clone(), config.maintenance.intervals())
        .rescue_once()
        .await
        .unwrap();
    assert_eq!(
        (rescued.retried, rescued.failed, rescued.leader),
        (1, 1, true)
    );
    let states = client
        .query(
            "SELECT state::text, run_at > now() FROM pgtasks.job ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(states[0].get::<_, String>(0), "retry");
    assert_eq!(states[1].get::<_, String>(0), "failed");

    // A live worker picks the rescued job up after its retry delay.
    let recorder = Recorder::default();
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .handler("readme-queue", recorder.handler())
        .maintenance(false)
        .start(shutdown.clone())
        .await
        .unwrap();
    wait_for_state(&client, "completed", 1, SECS_10).await;
    assert_eq!(recorder.runs().get(&1), Some(&1));
    shutdown.cancel();
    running.stopped().await;

    // With nothing expired a pass does nothing.
    let again = Maintenance::new(
        pool,
        pgtasks::config::MaintenanceConfig::default().intervals(),
    )
    .rescue_once()
    .await
    .unwrap();
    assert_eq!((again.retried, again.failed), (0, 0));
}

#[tokio::test]
async fn attempt_running_past_its_lease_is_cancelled_and_counted_as_failed() {
    let db = TestDb::new().await;
    let saw_cancel = Arc::new(Mutex::new(false));
    let flag = saw_cancel.clone();
    let handler = move |_job: Job, ctx: JobContext| {
        let flag = flag.clone();
        async move {
            ctx.cancelled().cancelled().await;
            *flag.lock().unwrap() = true;
            // Keep running: the runtime must not wait for us.
            std::future::pending::<()>().await;
            Ok(None)
        }
    };
    let policy = QueueConfig {
        retry_limit: 0,
        lease: Duration::from_millis(300),
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .queue("slow", policy, handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    insert_jobs(&client, "slow", 1).await;
    wait_for_state(&client, "failed", 1, SECS_10).await;
    let error: String = client
        .query_one("SELECT last_error FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert!(error.starts_with("lease expired"), "{error}");
    assert!(
        *saw_cancel.lock().unwrap(),
        "handler saw its cancellation token fire"
    );
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn two_runtimes_on_one_database_run_5000_jobs_exactly_once() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let mut runtimes = Vec::new();
    let shutdown = CancellationToken::new();
    for _ in 0..2 {
        let running = Runtime::new(db.config())
            .handler("readme-queue", recorder.handler())
            .start(shutdown.clone())
            .await
            .unwrap();
        listening(&running).await;
        runtimes.push(running);
    }
    let client = db.client().await;
    for _ in 0..10 {
        insert_jobs(&client, "readme-queue", 500).await;
    }
    wait_for_state(&client, "completed", 5000, Duration::from_secs(60)).await;
    let runs = recorder.runs();
    assert_eq!(runs.len(), 5000);
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    assert_eq!(count_state(&client, "active").await, 0);
    shutdown.cancel();
    for running in runtimes {
        running.stopped().await;
    }
}

#[tokio::test]
async fn job_errors_can_refuse_a_retry_or_ask_for_a_later_one() {
    use pgtasks::JobError;
    let db = TestDb::new().await;
    // {"permanent": true} fails for good; otherwise retry no sooner than 2 s.
    let handler = |job: Job, _ctx: JobContext| async move {
        if job.data["permanent"].as_bool() == Some(true) {
            return Err(JobError::permanent("the account is gone").into());
        }
        Err(JobError::retry_after("busy", Duration::from_secs(2)).into())
    };
    let policy = QueueConfig {
        retry_limit: 5,
        retry_delay: Duration::from_millis(10),
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .queue("picky", policy, handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgtasks.job (queue, data) VALUES
               ('picky', '{\"permanent\": true}'), ('picky', '{}')",
        )
        .await
        .unwrap();
    wait_for_state(&client, "failed", 1, SECS_10).await;
    wait_for_state(&client, "retry", 1, SECS_10).await;
    let rows = client
        .query(
            "SELECT state::text, attempt, last_error,
                    extract(epoch FROM run_at - (errors->0->>'at')::timestamptz)::float8
               FROM pgtasks.job ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "failed");
    assert_eq!(
        rows[0].get::<_, i32>(1),
        1,
        "no retry after a permanent error"
    );
    assert_eq!(rows[0].get::<_, String>(2), "the account is gone");
    assert_eq!(rows[1].get::<_, String>(0), "retry");
    let delay = rows[1].get::<_, f64>(3);
    assert!(
        (1.9..2.5).contains(&delay),
        "retry delayed {delay} s, not 10 ms"
    );
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn retries_due_in_milliseconds_are_not_left_for_the_poll() {
    let db = TestDb::new().await;
    // Fails the first attempt of every job.
    let handler = |job: Job, _ctx: JobContext| async move {
        if job.attempt == 1 {
            return Err("first attempt fails".into());
        }
        Ok(None)
    };
    let policy = QueueConfig {
        concurrency: 4,
        retry_delay: Duration::from_millis(5),
        retry_backoff: false,
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .queue("quick-retries", policy, handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    // One at a time, so each retry's timer is read on its own.
    for _ in 0..100 {
        // Counted before the insert: the job may finish before a count after it.
        let n = count_state(&client, "completed").await + 1;
        insert_jobs(&client, "quick-retries", 1).await;
        // The poll is 60 s: a retry only the poll would find stalls here.
        wait_for_state(&client, "completed", n, SECS_10).await;
    }
    shutdown.cancel();
    running.stopped().await;
}

/// The worker's timer finds the earliest future job whatever its priority
/// (a skip scan over priorities on the claim index): each delayed job
/// starts at its time, not when a later timer or the minute-long poll fires.
#[tokio::test]
async fn delayed_jobs_of_every_priority_start_at_their_own_time() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, priority, run_at)
             VALUES ('readme-queue', 10, now() + interval '2.5 seconds'),
                    ('readme-queue', 0, now() + interval '300 milliseconds'),
                    ('readme-queue', -5, now() + interval '900 milliseconds')",
            &[],
        )
        .await
        .unwrap();
    wait_for_state(&client, "completed", 3, SECS_10).await;
    let lateness: Vec<(i32, f64)> = client
        .query(
            "SELECT priority, extract(epoch FROM started_at - run_at)::float8
               FROM pgtasks.job ORDER BY run_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Never early; late by far less than the gap to the next job's time.
    for (priority, late) in &lateness {
        assert!(
            (0.0..0.5).contains(late),
            "priority {priority} started {late:.3} s after its run_at: {lateness:?}"
        );
    }
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn worker_connections_commit_asynchronously_and_reuse_generic_plans_while_submits_do_not() {
    let db = TestDb::new().await;
    let config = db.config();
    let show = |pool: deadpool_postgres::Pool| async move {
        let client = pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT current_setting('synchronous_commit'), current_setting('plan_cache_mode')",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, String>(1))
    };
    let workers = pgtasks::db::create_worker_pool(&config.database).unwrap();
    assert_eq!(
        show(workers).await,
        ("off".to_string(), "force_generic_plan".to_string())
    );
    // Submits are acknowledged only once durable: the server's default.
    let shared = pgtasks::db::create_pool(&config.database).unwrap();
    assert_eq!(show(shared).await, ("on".to_string(), "auto".to_string()));
}

#[tokio::test]
async fn job_table_is_vacuumed_after_every_so_many_finished_jobs() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.maintenance.vacuum_after_jobs = 200;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording_with(config, &recorder).await;
    let client = db.client().await;
    let vacuums = || async {
        client
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables
                  WHERE schemaname = 'pgtasks' AND relname = 'job'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(vacuums().await, 0, "a fresh database has no manual vacuum");

    insert_jobs(&client, "readme-queue", 500).await;
    wait_for_state(&client, "completed", 500, SECS_10).await;
    // Counted after each write of outcomes, so 500 jobs start at least one.
    crate::support::wait_for("a VACUUM of pgtasks.job", SECS_10, || async {
        (vacuums().await > 0).then_some(())
    })
    .await;
    assert_eq!(recorder.total(), 500);
    shutdown.cancel();
    running.stopped().await;
}
