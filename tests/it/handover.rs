//! Handover (schema step 9): an insert that finds a worker asleep claims its
//! row itself and sends the job to one process's LISTEN session. These tests
//! show which inserts hand over, and that a job handed to a session that
//! ends before the attempt confirms it is given back unburned and runs.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtasks::config::QueueConfig;
use pgtasks::store::NewJob;
use pgtasks::Runtime;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::runway::gated;
use crate::support::{
    count, insert_job, kill_listener, listening, start_recording, start_recording_with, wait_for,
    Recorder, TestDb, SECS_10,
};

/// A job's state, attempt and `handed_to`.
async fn job_row(client: &tokio_postgres::Client, id: i64) -> (String, i32, Option<i32>) {
    let row = client
        .query_one(
            "SELECT state::text, attempt, handed_to FROM pgtasks.job WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A session of the test's that becomes `queue`'s address, as a process's
/// LISTEN session does (but it never listens); its pid.
async fn another_address(db: &TestDb, queue: &str) -> (tokio_postgres::Client, i32) {
    let other = db.client().await;
    let pid: i32 = other
        .query_one("SELECT pgtasks.take_handovers('{}')", &[])
        .await
        .unwrap()
        .get(0);
    other
        .execute("SELECT pgtasks.sleeper_at($1, $2)", &[&queue, &pid])
        .await
        .unwrap();
    (other, pid)
}

/// A recording runtime whose rescuer runs every 100 ms.
async fn start_rescuing(db: &TestDb, recorder: &Recorder) -> (pgtasks::Running, CancellationToken) {
    let mut config = db.config();
    config.maintenance.rescue_interval = Duration::from_millis(100);
    start_recording_with(config, recorder).await
}

/// Waits until the job completed in its first attempt, not handed over (or
/// given back since).
async fn completed_as_claimed(client: &tokio_postgres::Client, id: i64) {
    wait_for(&format!("job {id} to complete"), SECS_10, || async {
        (job_row(client, id).await == ("completed".into(), 1, None)).then_some(())
    })
    .await;
}

/// Makes another session `readme-queue`'s address and inserts a job, which
/// is handed to that session: the session, its pid and the job.
async fn hand_one_elsewhere(
    db: &TestDb,
    client: &tokio_postgres::Client,
) -> (tokio_postgres::Client, i32, i64) {
    let (other, pid) = another_address(db, "readme-queue").await;
    let id = insert_job(client, "readme-queue", json!({})).await;
    assert_eq!(job_row(client, id).await, ("active".into(), 1, Some(pid)));
    (other, pid, id)
}

/// A job's lease, in whole seconds from its start.
async fn lease_secs(client: &tokio_postgres::Client, id: i64) -> i64 {
    let sql = format!(
        "SELECT extract(epoch FROM lease_until - started_at)::bigint FROM pgtasks.job WHERE id = {id}"
    );
    count(client, &sql).await
}

/// The backend pid of the runtime's LISTEN session.
async fn listener_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one(
            "SELECT pid FROM pg_stat_activity
              WHERE application_name = 'pgtasks-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn ran(recorder: &Recorder, id: i64) {
    wait_for(&format!("job {id} to run"), SECS_10, || async {
        recorder.runs().contains_key(&id).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_inserted_while_the_worker_sleeps_is_handed_to_it_by_the_insert() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let stats = running.stats("readme-queue").unwrap();
    let client = db.client().await;
    let claimed_before = stats.claimed();

    let id = insert_job(&client, "readme-queue", json!({})).await;
    ran(&recorder, id).await;
    // Claimed by its insert, for this process's LISTEN session; a quick
    // attempt never confirms it.
    let pid = listener_pid(&client).await;
    wait_for("the job to complete", SECS_10, || async {
        (job_row(&client, id).await == ("completed".into(), 1, Some(pid))).then_some(())
    })
    .await;
    assert_eq!(stats.handed(), 1);
    assert_eq!(stats.claimed(), claimed_before);
    shutdown.cancel();
    running.stopped().await;
}

/// `pgtasks.handover = off`, paused queues, payloads too large for a
/// notification and keyed rows (ON CONFLICT may drop them after the trigger
/// ran): the insert notifies only, and the worker claims the job.
#[tokio::test]
async fn some_inserts_only_notify() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let stats = running.stats("readme-queue").unwrap();
    let client = db.client().await;

    client
        .batch_execute("SET pgtasks.handover = off")
        .await
        .unwrap();
    let off = insert_job(&client, "readme-queue", json!({})).await;
    ran(&recorder, off).await;
    client
        .batch_execute("RESET pgtasks.handover")
        .await
        .unwrap();
    listening(&running).await;

    let large = insert_job(
        &client,
        "readme-queue",
        json!({ "text": "x".repeat(10_000) }),
    )
    .await;
    ran(&recorder, large).await;
    listening(&running).await;

    let keyed: i64 = client
        .query_one(
            "INSERT INTO pgtasks.job (queue, singleton_key) VALUES ('readme-queue', 'k')
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    ran(&recorder, keyed).await;
    listening(&running).await;

    client
        .execute("SELECT pgtasks.pause_queue('readme-queue')", &[])
        .await
        .unwrap();
    let paused = insert_job(&client, "readme-queue", json!({})).await;
    assert_eq!(job_row(&client, paused).await, ("created".into(), 0, None));
    client
        .execute("SELECT pgtasks.resume_queue('readme-queue')", &[])
        .await
        .unwrap();
    ran(&recorder, paused).await;

    for id in [off, large, keyed, paused] {
        completed_as_claimed(&client, id).await;
    }
    assert_eq!(stats.handed(), 0);
    shutdown.cancel();
    running.stopped().await;
}

/// A job handed to a LISTEN session that ends before its attempt confirmed
/// it (here a session that never takes it; a process that stopped or lost
/// its listener connection is the same) is given back by the rescuer with
/// its attempt unburned, and runs.
#[tokio::test]
async fn a_job_handed_to_a_session_that_ends_is_given_back_unburned() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_rescuing(&db, &recorder).await;
    let client = db.client().await;
    let (other, _, id) = hand_one_elsewhere(&db, &client).await;
    // While that session lasts, the job is its own.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pgtasks.release_handovers(100)"
        )
        .await,
        0
    );

    drop(other);
    ran(&recorder, id).await;
    completed_as_claimed(&client, id).await;
    assert_eq!(recorder.runs().get(&id), Some(&1));
    shutdown.cancel();
    running.stopped().await;
}

/// A live session that takes no notice of a job handed to it (half-open, or
/// its pid now another process's) keeps it only for the handover's first
/// lease; the rescuer then gives it back unburned, and that session stops
/// being the queue's address.
#[tokio::test]
async fn a_job_handed_to_a_session_that_takes_no_notice_is_given_back_after_its_first_lease() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_rescuing(&db, &recorder).await;
    let client = db.client().await;
    let (other, other_pid, id) = hand_one_elsewhere(&db, &client).await;
    assert_eq!(lease_secs(&client, id).await, 15);
    // As if those 15 s had passed.
    client
        .execute(
            "UPDATE pgtasks.job SET lease_until = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    ran(&recorder, id).await;
    completed_as_claimed(&client, id).await;
    let still_addressed =
        format!("SELECT count(*) FROM pgtasks.queue_sleeper WHERE listener = {other_pid}");
    assert_eq!(count(&client, &still_addressed).await, 0);
    assert_eq!(recorder.runs().get(&id), Some(&1));
    drop(other);
    shutdown.cancel();
    running.stopped().await;
}

/// A handed-over attempt that runs on confirms the job, so losing the LISTEN
/// session it came through does not give it back while it runs.
#[tokio::test]
async fn a_long_handed_over_attempt_outlives_its_listen_session() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.maintenance.rescue_interval = Duration::from_millis(100);
    let started = Arc::new(Mutex::new(HashSet::new()));
    let gate = Arc::new(Semaphore::new(0));
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .queue(
            "ahead",
            QueueConfig::default(),
            gated(started.clone(), gate.clone()),
        )
        .start(shutdown.clone())
        .await
        .unwrap();
    listening(&running).await;
    let client = db.client().await;

    let id = insert_job(&client, "ahead", json!({ "hold": true })).await;
    wait_for("the attempt to confirm the job", SECS_10, || async {
        (job_row(&client, id).await == ("active".into(), 1, None)).then_some(())
    })
    .await;
    // The queue's lease (15 minutes) applies from then.
    assert_eq!(lease_secs(&client, id).await, 900);
    assert!(started.lock().unwrap().contains(&id));
    assert_eq!(running.stats("ahead").unwrap().handed(), 1);

    assert_eq!(kill_listener(&client).await, 1);
    wait_for("the listener to reconnect", SECS_10, || async {
        (running.listener().reconnects() >= 1 && running.listener().is_connected()).then_some(())
    })
    .await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pgtasks.release_handovers(100)"
        )
        .await,
        0
    );
    gate.add_permits(1);
    completed_as_claimed(&client, id).await;
    shutdown.cancel();
    running.stopped().await;
}

/// An insert whose transaction commits a second or more after it began
/// (the handover's first lease counts from there): at commit the row is
/// returned to the queue, and the worker claims it.
#[tokio::test]
async fn a_late_commit_leaves_an_ordinary_job() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let stats = running.stats("readme-queue").unwrap();
    let mut client = db.client().await;

    let tx = client.transaction().await.unwrap();
    let id: i64 = tx
        .query_one(
            "INSERT INTO pgtasks.job (queue) VALUES ('readme-queue') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let handed: Option<i32> = tx
        .query_one("SELECT handed_to FROM pgtasks.job WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(handed.is_some(), "handed over at insert");
    tx.execute("SELECT pg_sleep(1.1)", &[]).await.unwrap();
    tx.commit().await.unwrap();

    ran(&recorder, id).await;
    completed_as_claimed(&client, id).await;
    assert_eq!(stats.handed(), 0);
    assert_eq!(recorder.runs().get(&id), Some(&1));
    shutdown.cancel();
    running.stopped().await;
}

/// A stopping process whose worker no longer takes jobs gives back what is
/// handed to it at once, through its LISTEN session (kept while attempts
/// finish), not when that session ends.
#[tokio::test]
async fn a_stopping_process_gives_back_what_is_handed_to_it() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.worker.shutdown_grace = SECS_10;
    let started = Arc::new(Mutex::new(HashSet::new()));
    let gate = Arc::new(Semaphore::new(0));
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .queue(
            "ahead",
            QueueConfig::default(),
            gated(started.clone(), gate.clone()),
        )
        .start(shutdown.clone())
        .await
        .unwrap();
    listening(&running).await;
    let client = db.client().await;
    let pid = listener_pid(&client).await;

    // An attempt keeps the process in its grace period.
    let held = insert_job(&client, "ahead", json!({ "hold": true })).await;
    wait_for("the held job to start", SECS_10, || async {
        started.lock().unwrap().contains(&held).then_some(())
    })
    .await;
    shutdown.cancel();
    let wakeup = running.wakeup("ahead").unwrap();
    wait_for("the worker to stop taking handovers", SECS_10, || async {
        wakeup.handovers_closed().then_some(())
    })
    .await;

    // This session sleeps on the queue, and names the stopping process's
    // LISTEN session as its address: the next insert is handed to it.
    let other = db.client().await;
    other
        .execute("SELECT pgtasks.sleep_on('ahead', false, '1 second')", &[])
        .await
        .unwrap();
    other
        .execute("SELECT pgtasks.sleeper_at('ahead', $1)", &[&pid])
        .await
        .unwrap();
    let id = insert_job(&client, "ahead", json!({})).await;
    wait_for("the handed job to be given back", SECS_10, || async {
        (job_row(&client, id).await == ("created".into(), 0, None)).then_some(())
    })
    .await;
    assert_eq!(listener_pid(&client).await, pid, "the session still lasts");
    assert!(!started.lock().unwrap().contains(&id));

    gate.add_permits(1);
    running.stopped().await;
}

/// A row its own transaction cancels before committing is not sent: the
/// job never runs.
#[tokio::test]
async fn a_job_cancelled_by_its_inserting_transaction_is_not_sent() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let mut client = db.client().await;

    let tx = client.transaction().await.unwrap();
    let id: i64 = tx
        .query_one(
            "INSERT INTO pgtasks.job (queue) VALUES ('readme-queue') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.execute("SELECT pgtasks.cancel_job($1)", &[&id])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // Anything sent for it would have arrived before this one's wakeup.
    listening(&running).await;
    let next = insert_job(&client, "readme-queue", json!({})).await;
    ran(&recorder, next).await;
    assert!(!recorder.runs().contains_key(&id));
    let state: String = client
        .query_one("SELECT state::text FROM pgtasks.job WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "cancelled");
    shutdown.cancel();
    running.stopped().await;
}

/// `store::insert_jobs` (the path of `Client::send_batch`, and of the HTTP
/// submitter when idle) hands over a single job, but not a batch, plain or
/// with options: the worker claims those in priority order.
#[tokio::test]
async fn insert_jobs_hands_over_a_single_job_but_not_a_batch() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let stats = running.stats("readme-queue").unwrap();
    let client = db.client().await;
    let pid = listener_pid(&client).await;
    let jobs = pgtasks::Client::connect(&db.url).unwrap();

    let one = jobs
        .send_batch(&[NewJob::new("readme-queue", json!({}))])
        .await
        .unwrap();
    ran(&recorder, one[0]).await;
    wait_for("the single job to complete", SECS_10, || async {
        (job_row(&client, one[0]).await == ("completed".into(), 1, Some(pid))).then_some(())
    })
    .await;

    let plain = vec![NewJob::new("readme-queue", json!({})); 3];
    let mut with_options = plain.clone();
    for (n, job) in with_options.iter_mut().enumerate() {
        job.priority = Some(n as i32);
    }
    for batch in [plain, with_options] {
        listening(&running).await;
        for id in jobs.send_batch(&batch).await.unwrap() {
            completed_as_claimed(&client, id).await;
        }
    }
    assert_eq!(stats.handed(), 1);
    shutdown.cancel();
    running.stopped().await;
}

/// A handed job that returns to the queue unconfirmed (here failed by
/// `fail_jobs`, as the rescuer and the completer fail jobs) is an ordinary
/// job again: no longer tied to the session it was handed to.
#[tokio::test]
async fn a_handed_job_that_fails_waits_as_an_ordinary_one() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;
    let client = db.client().await;
    let (_other, _, id) = hand_one_elsewhere(&db, &client).await;
    client
        .execute(
            "SELECT pgtasks.fail_jobs(ARRAY[$1::bigint], ARRAY[1], ARRAY['failed'])",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(job_row(&client, id).await, ("retry".into(), 1, None));
    shutdown.cancel();
    running.stopped().await;
}
