//! Inserts notify only while a worker waits (schema step 4). These tests
//! prove no wakeup is lost when inserts race a worker going to sleep: the
//! test config's poll is a minute, so a lost wakeup shows as a job that does
//! not run within its deadline.

use std::sync::Arc;
use std::time::Duration;

use pgtasks::config::QueueConfig;
use pgtasks::{Job, JobContext, Runtime};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::support::{
    drain_until_sentinel, insert_job, listen, listening, sleeper_locks, start_recording, wait_for,
    Recorder, TestDb, SECS_10,
};

/// Inserters each submit a job, wait for it to start, and submit the next
/// at once, so inserts keep landing while the worker finishes a claim and
/// records itself as waiting again: thousands of rounds of that race.
#[tokio::test]
async fn no_wakeup_is_lost_while_inserts_race_the_worker_going_to_sleep() {
    const INSERTERS: usize = 4;
    const ROUNDS: usize = 750;
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown) = start_recording(&db, &recorder).await;

    let mut inserters = JoinSet::new();
    for i in 0..INSERTERS {
        let client = db.client().await;
        let recorder = recorder.clone();
        inserters.spawn(async move {
            for round in 0..ROUNDS {
                let id = insert_job(&client, "readme-queue", serde_json::json!({"i": i})).await;
                wait_for(
                    &format!("inserter {i} round {round}: job {id} to run"),
                    Duration::from_secs(5),
                    || async { recorder.runs().contains_key(&id).then_some(()) },
                )
                .await;
                // Vary where the next insert lands in the worker's cycle.
                if round % 3 == 1 {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    while let Some(done) = inserters.join_next().await {
        done.expect("an inserter failed");
    }

    let jobs = INSERTERS * ROUNDS;
    let runs = recorder.runs();
    assert_eq!(runs.len(), jobs);
    assert!(runs.values().all(|&n| n == 1), "a job ran twice");
    let stats = running.stats("readme-queue").unwrap();
    let notifications = running.wakeup("readme-queue").unwrap().notifications();
    eprintln!(
        "{jobs} jobs: {notifications} notifications, {} claims, {} unsettled records",
        stats.claims(),
        stats.unsettled()
    );
    // The point of the design: inserts while the worker was awake sent none.
    assert!(
        (notifications as usize) < jobs,
        "every insert notified: {notifications} for {jobs} jobs"
    );
    shutdown.cancel();
    running.stopped().await;
}

/// `readme-queue` at concurrency 1, listening; jobs with `{"block": true}`
/// wait for a permit of `gate`, and every job is recorded.
async fn start_one_slot(
    db: &TestDb,
    gate: &Arc<Semaphore>,
    recorder: &Recorder,
) -> (pgtasks::Running, CancellationToken) {
    let blocker = {
        let gate = gate.clone();
        let record = recorder.handler();
        move |job: Job, ctx: JobContext| {
            let gate = gate.clone();
            let record = record(job.clone(), ctx);
            async move {
                if job.data["block"] == true {
                    let _permit = gate.acquire().await;
                }
                record.await
            }
        }
    };
    let one_slot = QueueConfig {
        concurrency: 1,
        ..QueueConfig::default()
    };
    let shutdown = CancellationToken::new();
    let running = Runtime::new(db.config())
        .queue("readme-queue", one_slot, blocker)
        .start(shutdown.clone())
        .await
        .unwrap();
    listening(&running).await;
    (running, shutdown)
}

/// The race, made to happen: an insert reads "nobody waits" while the worker
/// is busy, and is still uncommitted when the worker records itself as
/// waiting and looks at the queue one last time. The record must not settle
/// until the insert commits, and then the job runs without any poll.
#[tokio::test]
async fn an_insert_in_flight_while_the_worker_goes_to_sleep_still_runs() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let gate = Arc::new(Semaphore::new(0));
    let (running, shutdown) = start_one_slot(&db, &gate, &recorder).await;
    let stats = running.stats("readme-queue").unwrap();
    let client = db.client().await;

    // The worker is busy with its one slot, so its record says awake.
    let blocking = insert_job(&client, "readme-queue", serde_json::json!({"block": true})).await;
    wait_for("the blocking job to start", SECS_10, || async {
        (stats.claimed() + stats.handed() == 1).then_some(())
    })
    .await;

    let mut inserter = db.client().await;
    let tx = inserter.transaction().await.unwrap();
    let late: i64 = tx
        .query_one(
            "INSERT INTO pgtasks.job (queue, data) VALUES ('readme-queue', '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // The slot frees; the claim cannot see the uncommitted row; the worker
    // records itself as waiting, which cannot settle while the insert is open.
    let unsettled_before = stats.unsettled();
    gate.add_permits(1);
    wait_for("the waiting record to be unsettled", SECS_10, || async {
        (stats.unsettled() > unsettled_before).then_some(())
    })
    .await;
    assert!(!recorder.runs().contains_key(&late));

    tx.commit().await.unwrap();
    wait_for("the late job to run", SECS_10, || async {
        recorder.runs().contains_key(&late).then_some(())
    })
    .await;
    assert!(recorder.runs().contains_key(&blocking));
    shutdown.cancel();
    running.stopped().await;
}

/// A worker running what it claimed lets go of the queue's lock (it looks
/// again by itself when a slot frees up): inserts meanwhile do not notify
/// (a notifying commit holds a cluster-wide lock through its WAL flush).
/// Once it has emptied the queue it sleeps on the lock again, and they do.
#[tokio::test]
async fn inserts_do_not_notify_a_saturated_worker() {
    let db = TestDb::new().await;
    let gate = Arc::new(Semaphore::new(0));
    let (running, shutdown) = start_one_slot(&db, &gate, &Recorder::default()).await;
    let stats = running.stats("readme-queue").unwrap();
    let client = db.client().await;
    let (_listener, mut rx) = listen(&db.url, &["pgtasks.readme-queue", "sentinel"]).await;
    let queue_lock = "l.objsubid = 1
        AND l.classid::bigint = (pgtasks.waiter_lock_key('readme-queue') >> 32) & 4294967295
        AND l.objid::bigint = pgtasks.waiter_lock_key('readme-queue') & 4294967295";
    let lock_held = |held: bool| {
        let client = &client;
        async move {
            wait_for(
                &format!("the queue's lock held: {held}"),
                SECS_10,
                || async { ((sleeper_locks(client, queue_lock).await > 0) == held).then_some(()) },
            )
            .await
        }
    };

    // Busy with its one slot: the worker lets go, and an insert is silent.
    insert_job(&client, "readme-queue", serde_json::json!({"block": true})).await;
    wait_for("the blocking job to start", SECS_10, || async {
        (stats.claimed() + stats.handed() == 1).then_some(())
    })
    .await;
    lock_held(false).await;
    drain_until_sentinel(&client, &mut rx).await;
    insert_job(&client, "readme-queue", serde_json::json!({})).await;
    assert_eq!(drain_until_sentinel(&client, &mut rx).await, vec![]);

    // Both done, the queue is empty: the worker sleeps on the lock again,
    // and an insert notifies (handing its job over).
    gate.add_permits(1);
    wait_for("both jobs to run", SECS_10, || async {
        (stats.claimed() + stats.handed() == 2 && stats.waiting()).then_some(())
    })
    .await;
    lock_held(true).await;
    drain_until_sentinel(&client, &mut rx).await;
    let id = insert_job(&client, "readme-queue", serde_json::json!({})).await;
    let heard = drain_until_sentinel(&client, &mut rx).await;
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0].0, "pgtasks.readme-queue");
    let handover: serde_json::Value = serde_json::from_str(&heard[0].1).unwrap();
    assert_eq!(handover["id"], id);
    shutdown.cancel();
    running.stopped().await;
}

/// Two processes on one queue: the first to sleep holds the queue's lock,
/// the second relies on it. When the holder stops, it notifies the queue so
/// that the other takes the lock over at once (not at its next check, a
/// second later): the notification is asserted. Then jobs run promptly with
/// the one left, and with two sharing the queue again. The test config's
/// poll is a minute: a job that waits for it fails its deadline.
#[tokio::test]
async fn two_processes_share_a_queue_and_one_takes_over_when_the_other_stops() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let client = db.client().await;
    let asleep = |r: &pgtasks::Running| r.stats("readme-queue").unwrap().waiting();
    let run_one = |round: usize| {
        let (client, recorder) = (&client, recorder.clone());
        async move {
            let id = insert_job(client, "readme-queue", serde_json::json!({"round": round})).await;
            wait_for(
                &format!("round {round}: job {id} to run"),
                Duration::from_secs(5),
                || async { recorder.runs().contains_key(&id).then_some(()) },
            )
            .await;
        }
    };

    // The first is asleep (holding) before the second starts (relying).
    let (first, stop_first) = start_recording(&db, &recorder).await;
    let (second, stop_second) = start_recording(&db, &recorder).await;
    let (_listener, mut rx) = listen(&db.url, &["pgtasks.readme-queue", "sentinel"]).await;
    stop_first.cancel();
    first.stopped().await;
    assert_eq!(
        drain_until_sentinel(&client, &mut rx).await,
        vec![("pgtasks.readme-queue".to_string(), String::new())],
        "the stopping holder wakes the process relying on it"
    );
    for round in 0..20 {
        wait_for("the second worker asleep and armed", SECS_10, || async {
            asleep(&second).then_some(())
        })
        .await;
        run_one(round).await;
    }

    // Two sharing the queue again.
    let (third, stop_third) = start_recording(&db, &recorder).await;
    for round in 20..40 {
        wait_for("both workers asleep and armed", SECS_10, || async {
            (asleep(&second) && asleep(&third)).then_some(())
        })
        .await;
        run_one(round).await;
    }
    assert_eq!(recorder.runs().len(), 40);
    stop_second.cancel();
    stop_third.cancel();
    second.stopped().await;
    third.stopped().await;
}
