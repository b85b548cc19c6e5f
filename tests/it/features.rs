//! Queue features: singletons and throttles, pause, cancel of a running job,
//! progress, retention, cron schedules, waiting for a result, redrive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgtasks::config::{QueueConfig, ScheduleConfig};
use pgtasks::maintenance::Maintenance;
use pgtasks::{Job, JobContext, Runtime};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::{
    count, count_state, drain_until_sentinel, insert_job, insert_jobs, listen, listening,
    sleeper_locks, wait_for, wait_for_state, Recorder, TestDb, SECS_10,
};

async fn send(client: &tokio_postgres::Client, sql_args: &str) -> (i64, bool) {
    let row = client
        .query_one(
            &format!("SELECT id, duplicate FROM pgtasks.send({sql_args})"),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn singleton_keys_and_throttles_are_enforced_by_the_database() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO pgtasks.queue (name) VALUES ('q')")
        .await
        .unwrap();
    let (first, dup) = send(&client, "'q', '{\"n\":1}', singleton_key => 'k'").await;
    assert!(!dup);
    let (second, dup) = send(&client, "'q', '{\"n\":2}', singleton_key => 'k'").await;
    assert_eq!(
        (second, dup),
        (first, true),
        "the queued job's id, marked duplicate"
    );
    // A plain INSERT with the same key is refused by the unique index.
    let err = client
        .execute(
            "INSERT INTO pgtasks.job (queue, singleton_key) VALUES ('q', 'k')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().unwrap().constraint(),
        Some("job_singleton_queued_idx")
    );
    // Once the first is running, the key is free for a new queued job.
    client
        .execute("UPDATE pgtasks.job SET state = 'active', attempt = 1, lease_until = now() + interval '1 minute' WHERE id = $1", &[&first])
        .await
        .unwrap();
    let (third, dup) = send(&client, "'q', singleton_key => 'k'").await;
    assert!(!dup && third != first);

    // Throttle: one job per key per 60 s slot, whatever its state.
    let (t1, _) = send(
        &client,
        "'q', singleton_key => 't', singleton_seconds => 60",
    )
    .await;
    client
        .execute(
            "UPDATE pgtasks.job SET state = 'completed', completed_at = now() WHERE id = $1",
            &[&t1],
        )
        .await
        .unwrap();
    let (t2, dup) = send(
        &client,
        "'q', singleton_key => 't', singleton_seconds => 60",
    )
    .await;
    assert_eq!((t2, dup), (t1, true));
}

#[tokio::test]
async fn pause_stops_every_instance_and_resume_wakes_them_at_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO pgtasks.queue (name, paused) VALUES ('readme-queue', true)")
        .await
        .unwrap();
    // Jobs waiting before the workers start: each worker's first claim
    // certainly sees them.
    insert_jobs(&client, "readme-queue", 10).await;
    let recorder = Recorder::default();
    let shutdown = CancellationToken::new();
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        let running = Runtime::new(db.config())
            .handler("readme-queue", recorder.handler())
            .start(shutdown.clone())
            .await
            .unwrap();
        listening(&running).await;
        let stats = running.stats("readme-queue").unwrap();
        wait_for("the first claim", SECS_10, || async {
            (stats.claims() >= 1).then_some(())
        })
        .await;
        runtimes.push(running);
    }
    // More while they run: a notification each worker hears.
    insert_jobs(&client, "readme-queue", 10).await;
    for running in &runtimes {
        let wakeup = running.wakeup("readme-queue").unwrap();
        wait_for("the insert's notification", SECS_10, || async {
            (wakeup.notifications() >= 1).then_some(())
        })
        .await;
    }
    assert_eq!(recorder.total(), 0);
    assert_eq!(count_state(&client, "created").await, 20);

    let resumed: bool = client
        .query_one("SELECT pgtasks.resume_queue('readme-queue')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(resumed);
    // The poll is 60 s: only the resume notification explains a prompt run.
    wait_for_state(&client, "completed", 20, SECS_10).await;
    assert_eq!(recorder.total(), 20);
    shutdown.cancel();
    for running in runtimes {
        running.stopped().await;
    }
}

#[tokio::test]
async fn cancelling_a_running_job_fires_its_token_and_progress_is_visible() {
    let db = TestDb::new().await;
    let saw_cancel = Arc::new(AtomicUsize::new(0));
    let seen = saw_cancel.clone();
    let handler = move |_job: Job, ctx: JobContext| {
        let seen = seen.clone();
        async move {
            ctx.progress(40.0, "downloading").await?;
            ctx.cancelled().cancelled().await;
            seen.fetch_add(1, Ordering::SeqCst);
            Err("stopped on cancel".into())
        }
    };
    let shutdown = CancellationToken::new();
    let mut config = db.config();
    config.worker.shutdown_grace = Duration::from_millis(300);
    let running = Runtime::new(config)
        .queue("long", QueueConfig::default(), handler)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    insert_jobs(&client, "long", 1).await;
    let progress: Value = wait_for("progress", SECS_10, || async {
        client
            .query_one("SELECT progress FROM pgtasks.job", &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<Value>>(0))
    })
    .await;
    assert_eq!(
        (progress["percent"].as_f64(), progress["message"].as_str()),
        (Some(40.0), Some("downloading"))
    );

    let previous: String = client
        .query_one("SELECT pgtasks.cancel_job(1)::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(previous, "active");
    wait_for("handler saw the cancel", SECS_10, || async {
        (saw_cancel.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // Its late error does not overwrite the cancellation.
    assert_eq!(count_state(&client, "cancelled").await, 1);

    // Resume makes it wait again; it runs (and blocks) again.
    let previous: String = client
        .query_one("SELECT pgtasks.resume_job(1)::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(previous, "cancelled");
    wait_for_state(&client, "active", 1, SECS_10).await;
    shutdown.cancel();
    running.stopped().await;
    // Every outcome is written once the runtime has stopped: the first
    // attempt's late error never reached the job's history.
    let errors: Option<Value> = client
        .query_one("SELECT errors FROM pgtasks.job WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !errors
            .unwrap_or_default()
            .to_string()
            .contains("stopped on cancel"),
        "the cancelled attempt's error was recorded"
    );
}

#[tokio::test]
async fn retention_zero_deletes_on_completion_and_the_cleaner_honours_retention() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let shutdown = CancellationToken::new();
    let policy = QueueConfig {
        retention: Duration::ZERO,
        ..QueueConfig::default()
    };
    let running = Runtime::new(db.config())
        .queue("ephemeral", policy, recorder.handler())
        .maintenance(false)
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    insert_jobs(&client, "ephemeral", 50).await;
    wait_for("all ran", SECS_10, || async {
        (recorder.total() == 50).then_some(())
    })
    .await;
    wait_for("all deleted", SECS_10, || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM pgtasks.job", &[])
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    running.stopped().await;

    // The cleaner: old finished jobs go, recent and waiting ones stay.
    client
        .batch_execute(
            "INSERT INTO pgtasks.queue (name, retention) VALUES ('kept', '1 hour');
             INSERT INTO pgtasks.job (queue, state, completed_at)
             SELECT 'kept', 'completed', now() - interval '2 hours' FROM generate_series(1, 1500);
             INSERT INTO pgtasks.job (queue, state, completed_at) VALUES ('kept', 'completed', now());
             INSERT INTO pgtasks.job (queue) VALUES ('kept');",
        )
        .await
        .unwrap();
    let pool = pgtasks::db::create_pool(&db.config().database).unwrap();
    let deleted = Maintenance::new(
        pool,
        pgtasks::config::MaintenanceConfig::default().intervals(),
    )
    .clean_once()
    .await
    .unwrap();
    assert_eq!(deleted, 1500);
    let left: i64 = client
        .query_one("SELECT count(*) FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 2);
}

#[tokio::test]
async fn cron_run_is_enqueued_once_by_two_instances() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.maintenance.schedule_interval = Duration::from_millis(50);
    config.schedules.insert(
        "every-second".into(),
        ScheduleConfig {
            cron: "* * * * * *".into(),
            timezone: "UTC".into(),
            queue: "readme-queue".into(),
            data: json!({"from": "cron"}),
            priority: 0,
            max_attempts: None,
        },
    );
    let shutdown = CancellationToken::new();
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        // No workers: the jobs stay queued so each run can be counted.
        runtimes.push(
            Runtime::new(config.clone())
                .workers(false)
                .start(shutdown.clone())
                .await
                .unwrap(),
        );
    }
    let client = db.client().await;
    wait_for("three scheduled runs", Duration::from_secs(15), || async {
        let n: i64 = client
            .query_one("SELECT count(*) FROM pgtasks.job", &[])
            .await
            .unwrap()
            .get(0);
        (n >= 3).then_some(())
    })
    .await;
    shutdown.cancel();
    for running in runtimes {
        running.stopped().await;
    }
    let rows = client
        .query(
            "SELECT singleton_on, data FROM pgtasks.job ORDER BY singleton_on",
            &[],
        )
        .await
        .unwrap();
    let mut slots: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.get(0)).collect();
    let n = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), n, "a run was enqueued twice");
    for pair in slots.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            1,
            "runs are one second apart: {slots:?}"
        );
    }
    assert_eq!(rows[0].get::<_, Value>(1), json!({"from": "cron"}));
}

#[tokio::test]
async fn dead_letters_can_be_redriven_to_their_queue() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgtasks.queue (name) VALUES ('dead'), ('work');
             UPDATE pgtasks.queue SET dead_letter = 'dead', retry_limit = 0 WHERE name = 'work';
             INSERT INTO pgtasks.job (queue, data) VALUES ('work', '{\"k\":1}');
             UPDATE pgtasks.job SET state = 'active', attempt = 1, lease_until = now();
             SELECT * FROM pgtasks.fail_jobs(ARRAY[1::bigint], ARRAY[1], ARRAY['boom']);",
        )
        .await
        .unwrap();
    let moved: i32 = client
        .query_one("SELECT pgtasks.redrive('dead')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moved, 1);
    let row = client
        .query_one(
            "SELECT queue, state::text, attempt, data FROM pgtasks.job WHERE dead_letter_of = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "work");
    assert_eq!(row.get::<_, String>(1), "created");
    assert_eq!(row.get::<_, i32>(2), 0);
    assert_eq!(row.get::<_, Value>(3), json!({"k": 1}));
}

/// A runtime running `handler` on `readme-queue`, with its API on a free
/// port of 127.0.0.1, listening; and the API's base URL.
async fn serve_readme_queue(
    mut config: pgtasks::Config,
    handler: impl pgtasks::handler::Handler,
) -> (pgtasks::Running, CancellationToken, String) {
    config.api.host = "127.0.0.1".into();
    config.api.port = 0;
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .handler("readme-queue", handler)
        .api(true)
        .start(shutdown.clone())
        .await
        .unwrap();
    listening(&running).await;
    let base = format!("http://{}", running.api_addr().unwrap());
    (running, shutdown, base)
}

/// A handler whose jobs with `{"gate": true}` finish when the test adds a
/// permit to `gate`; others at once.
fn gated(gate: Arc<tokio::sync::Semaphore>) -> impl pgtasks::handler::Handler {
    move |job: Job, _ctx: JobContext| {
        let gate = gate.clone();
        async move {
            if job.data["gate"] == json!(true) {
                gate.acquire().await.unwrap().forget();
            }
            Ok(None)
        }
    }
}

/// `GET /api/jobs/{id}?wait=20s`: the job when it finished, or after 20 s.
async fn wait_for_job(base: String, id: i64) -> Value {
    reqwest::get(format!("{base}/api/jobs/{id}?wait=20s"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Whether the process's sleep connection holds the done-waiter lock.
async fn holds_done_lock(client: &tokio_postgres::Client) -> bool {
    let done_key = "l.objsubid = 1 AND l.objid = 0
                    AND l.classid::bigint = (pgtasks.done_waiter_lock_key() >> 32) & 4294967295";
    sleeper_locks(client, done_key).await > 0
}

/// Waits until the process's sleep connection holds the done-waiter lock,
/// or no longer does.
async fn done_lock_held(client: &tokio_postgres::Client, held: bool) {
    wait_for(
        &format!("the done-waiter lock held: {held}"),
        SECS_10,
        || async { (holds_done_lock(client).await == held).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn finished_jobs_are_announced_only_while_a_wait_request_waits() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let config = db.config();
    // Jobs with {"gate": true} finish when the test lets them.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (running, shutdown, base) = serve_readme_queue(config, gated(gate.clone())).await;
    let (_listener, mut rx) = listen(&db.url, &["pgtasks:done", "sentinel"]).await;

    // Nobody waits: the completion is silent.
    insert_job(&client, "readme-queue", json!({})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // A request waits: the process holds the lock, and the completion is
    // announced (which is what answers the request).
    let id = insert_job(&client, "readme-queue", json!({"gate": true})).await;
    let waiting = tokio::spawn(wait_for_job(base, id));
    done_lock_held(&client, true).await;
    gate.add_permits(1);
    let body = waiting.await.unwrap();
    assert_eq!(body["job"]["state"], "completed", "{body}");
    assert_eq!(
        drain_until_sentinel(&client, &mut rx).await,
        vec![("pgtasks:done".to_string(), id.to_string())]
    );

    // Answered, the process lets go, and completions are silent again.
    done_lock_held(&client, false).await;
    insert_job(&client, "readme-queue", json!({})).await;
    wait_for_state(&client, "completed", 3, SECS_10).await;
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn a_wait_request_that_could_not_take_the_done_lock_gets_it_at_the_next_liveness_check() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut config = db.config();
    config.worker.listener_check_interval = Duration::from_millis(200);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (running, shutdown, base) = serve_readme_queue(config, gated(gate.clone())).await;

    // A statement finishing jobs without announcing them is in flight: it
    // holds the lock exclusively until it commits.
    let finishing = db.client().await;
    finishing
        .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(pgtasks.done_waiter_lock_key())")
        .await
        .unwrap();
    let id = insert_job(&client, "readme-queue", json!({"gate": true})).await;
    let waiting = tokio::spawn(wait_for_job(base, id));
    // The sleep connection asks for the lock, gives up (after 100 ms), and
    // the request waits without it.
    let asking = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                   WHERE a.application_name = 'pgtasks-sleeper' AND a.datname = current_database()
                     AND l.locktype = 'advisory' AND NOT l.granted";
    wait_for(
        "the sleep connection to ask for the lock",
        SECS_10,
        || async { (count(&client, asking).await == 1).then_some(()) },
    )
    .await;
    wait_for("the sleep connection to give up", SECS_10, || async {
        (count(&client, asking).await == 0).then_some(())
    })
    .await;
    assert!(!holds_done_lock(&client).await);

    // Once the statement ends, the liveness check takes the lock for the
    // request still waiting.
    finishing.batch_execute("COMMIT").await.unwrap();
    done_lock_held(&client, true).await;
    gate.add_permits(1);
    let body = waiting.await.unwrap();
    assert_eq!(body["job"]["state"], "completed", "{body}");
    done_lock_held(&client, false).await;
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn get_with_wait_returns_as_soon_as_the_job_finishes() {
    let db = TestDb::new().await;
    let config = db.config();
    // Jobs take {"ms": n} milliseconds.
    let handler = |job: Job, _ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_millis(job.data["ms"].as_u64().unwrap_or(0))).await;
        Ok(Some(json!({"slept": job.data["ms"]})))
    };
    let (running, shutdown, base) = serve_readme_queue(config, handler).await;
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{base}/api/jobs/readme"))
        .json(&json!({"ms": 1500}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = submitted["jobId"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let body: Value = http
        .get(format!("{base}/api/jobs/{id}?wait=20s"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(body["job"]["state"], "completed", "{body}");
    assert_eq!(body["job"]["output"], json!({"slept": 1500}));
    assert!(
        waited < Duration::from_secs(10),
        "answered at the finish, not the timeout: {waited:?}"
    );

    // A wait that runs out returns the job as it is.
    let slow: Value = http
        .post(format!("{base}/api/jobs/readme"))
        .json(&json!({"ms": 60000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slow_id = slow["jobId"].as_str().unwrap().to_string();
    let body: Value = http
        .get(format!("{base}/api/jobs/{slow_id}?wait=300ms"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(body["job"]["state"], "completed");
    let bad = http
        .get(format!("{base}/api/jobs/{slow_id}?wait=soon"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    shutdown.cancel();
    running.stopped().await;
}
