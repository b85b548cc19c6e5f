//! Claiming ahead: jobs claimed beyond the free slots wait for one, in the
//! bounds set, and are given back (not lost, not run) when the process stops
//! or the job is cancelled first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgtasks::config::QueueConfig;
use pgtasks::{Job, JobContext, Runtime};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::support::{
    count, count_state, insert_jobs, kill_listener, wait_for, wait_for_state, TestDb, SECS_10,
};

/// A handler that records each job it starts; jobs with `{"hold": true}`
/// then wait for a permit of `gate` (or for their cancel token, and fail),
/// others return at once.
pub fn gated(started: Arc<Mutex<HashSet<i64>>>, gate: Arc<Semaphore>) -> impl pgtasks::Handler {
    move |job: Job, ctx: JobContext| {
        let (started, gate) = (started.clone(), gate.clone());
        async move {
            started.lock().unwrap().insert(job.id);
            if job.data["hold"] == true {
                tokio::select! {
                    permit = gate.acquire() => permit.map(|p| p.forget())?,
                    _ = ctx.cancelled().cancelled() => return Err("stopped".into()),
                }
            }
            Ok(None)
        }
    }
}

/// Starts `queue` at `concurrency` claiming up to `ahead` beyond (with the
/// default lease, or `lease`), runs one quick job so the worker knows its
/// handlers are quick (if `warm_up`), then inserts `held` jobs that hold
/// their slots until the gate opens, the `n`th of priority `n` if
/// `rising_priority` (else 0).
struct Held {
    client: tokio_postgres::Client,
    running: pgtasks::Running,
    shutdown: CancellationToken,
    started: Arc<Mutex<HashSet<i64>>>,
    gate: Arc<Semaphore>,
}

struct Setup {
    concurrency: usize,
    ahead: usize,
    lease: Option<Duration>,
    warm_up: bool,
    held: i32,
    rising_priority: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            concurrency: 1,
            ahead: 3,
            lease: None,
            warm_up: true,
            held: 4,
            rising_priority: false,
        }
    }
}

async fn hold_slots(db: &TestDb, setup: Setup) -> Held {
    let mut config = db.config();
    config.worker.shutdown_grace = Duration::from_millis(200);
    let mut queue = QueueConfig {
        concurrency: setup.concurrency,
        claim_ahead: setup.ahead,
        ..QueueConfig::default()
    };
    if let Some(lease) = setup.lease {
        queue.lease = lease;
    }
    let started = Arc::new(Mutex::new(HashSet::new()));
    let gate = Arc::new(Semaphore::new(0));
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .queue("ahead", queue, gated(started.clone(), gate.clone()))
        .start(shutdown.clone())
        .await
        .unwrap();
    let client = db.client().await;
    if setup.warm_up {
        insert_jobs(&client, "ahead", 1).await;
        wait_for_state(&client, "completed", 1, SECS_10).await;
    }
    // Every job claimed (none handed over by its insert): these tests are
    // about claims.
    client
        .batch_execute("SET pgtasks.handover = off")
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, data, priority)
             SELECT 'ahead', jsonb_build_object('hold', true, 'n', i), CASE WHEN $2 THEN i ELSE 0 END
               FROM generate_series(1, $1) i",
            &[&setup.held, &setup.rising_priority],
        )
        .await
        .unwrap();
    Held {
        client,
        running,
        shutdown,
        started,
        gate,
    }
}

impl Held {
    /// Waits until `active` jobs are claimed and `started` have started.
    async fn claimed(&self, active: i64, started: usize) {
        wait_for_state(&self.client, "active", active, SECS_10).await;
        self.started(started).await;
    }

    /// Stops the runtime; returns the test's connection.
    async fn stop(self) -> tokio_postgres::Client {
        self.shutdown.cancel();
        self.running.stopped().await;
        self.client
    }

    /// Waits until `n` jobs have started, the warm-up included.
    async fn started(&self, n: usize) {
        let started = self.started.clone();
        wait_for(&format!("{n} jobs started"), SECS_10, || {
            let started = started.clone();
            async move { (started.lock().unwrap().len() == n).then_some(()) }
        })
        .await;
    }
}

#[tokio::test]
async fn jobs_claimed_ahead_wait_for_a_slot_and_are_given_back_at_shutdown() {
    let db = TestDb::new().await;
    let held = hold_slots(
        &db,
        Setup {
            concurrency: 2,
            ahead: 5,
            held: 20,
            ..Setup::default()
        },
    )
    .await;
    // Two running, five claimed ahead: one claim of free slots plus five.
    wait_for_state(&held.client, "active", 7, SECS_10).await;
    held.started(3).await;
    assert_eq!(count_state(&held.client, "active").await, 7);

    held.shutdown.cancel();
    tokio::time::timeout(SECS_10, held.running.stopped())
        .await
        .expect("stopped within its grace period");
    assert_eq!(
        held.started.lock().unwrap().len(),
        3,
        "the five waiting never ran"
    );
    let rows = held
        .client
        .query(
            "SELECT count(*), count(*) FILTER (WHERE attempt = 0 AND lease_until IS NULL)
               FROM pgtasks.job WHERE state = 'created' AND data ? 'hold'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows[0].get::<_, i64>(0),
        20,
        "every held job is available again"
    );
    assert_eq!(rows[0].get::<_, i64>(1), 20, "with its attempt unburned");
}

#[tokio::test]
async fn a_queue_claims_no_more_than_its_slots_until_its_handlers_prove_quick() {
    let db = TestDb::new().await;
    let held = hold_slots(
        &db,
        Setup {
            concurrency: 2,
            ahead: 5,
            warm_up: false,
            held: 20,
            ..Setup::default()
        },
    )
    .await;
    // No handler has finished yet: its speed is unknown.
    held.started(2).await;
    assert_eq!(count_state(&held.client, "active").await, 2);
    let client = held.stop().await;
    assert_eq!(count_state(&client, "created").await, 20);
}

#[tokio::test]
async fn jobs_claimed_ahead_run_in_priority_order_as_slots_free_up() {
    let db = TestDb::new().await;
    let held = hold_slots(
        &db,
        Setup {
            rising_priority: true,
            ..Setup::default()
        },
    )
    .await;
    held.claimed(4, 2).await;

    // The highest priority runs first (later ids, higher priorities); when
    // it finishes, its slot takes the next in the claim's order.
    held.gate.add_permits(1);
    held.started(3).await;
    let order: Vec<i64> = held
        .client
        .query(
            "SELECT id FROM pgtasks.job WHERE data ? 'hold' ORDER BY priority DESC, run_at, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    {
        let started = held.started.lock().unwrap();
        assert!(started.contains(&order[0]) && started.contains(&order[1]));
        assert!(!started.contains(&order[2]) && !started.contains(&order[3]));
    }
    held.gate.add_permits(3);
    wait_for_state(&held.client, "completed", 5, SECS_10).await;
    held.stop().await;
}

#[tokio::test]
async fn a_job_cancelled_while_claimed_ahead_never_runs() {
    let db = TestDb::new().await;
    let held = hold_slots(&db, Setup::default()).await;
    held.claimed(4, 2).await;
    let waiting: i64 = held
        .client
        .query_one(
            "SELECT max(id) FROM pgtasks.job WHERE data ? 'hold' AND state = 'active'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!held.started.lock().unwrap().contains(&waiting));
    let cancelled: String = held
        .client
        .query_one("SELECT pgtasks.cancel_job($1)::text", &[&waiting])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cancelled, "active");
    // The listener handles notifications in order: once it has seen one sent
    // after the cancel, the cancel has reached the job's token.
    let wakeup = held.running.wakeup("ahead").unwrap();
    let seen = wakeup.notifications();
    held.client
        .execute("SELECT pg_notify('pgtasks.ahead', '')", &[])
        .await
        .unwrap();
    wait_for("a notification sent after the cancel", SECS_10, || async {
        (wakeup.notifications() > seen).then_some(())
    })
    .await;

    // A job inserted now is claimed behind the runway, so its one slot has
    // dealt with the cancelled job before it runs this one.
    insert_jobs(&held.client, "ahead", 1).await;
    held.gate.add_permits(4);
    // The warm-up job, the three others and the last one.
    wait_for_state(&held.client, "completed", 5, SECS_10).await;
    assert!(
        !held.started.lock().unwrap().contains(&waiting),
        "a cancelled job ran"
    );
    let state: String = held
        .client
        .query_one(
            "SELECT state::text FROM pgtasks.job WHERE id = $1",
            &[&waiting],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "cancelled");
    held.stop().await;
}

#[tokio::test]
async fn jobs_claimed_ahead_that_wait_too_long_are_given_back() {
    let db = TestDb::new().await;
    // Half a 4 s lease: jobs claimed ahead wait 2 s at most.
    let held = hold_slots(
        &db,
        Setup {
            lease: Some(Duration::from_secs(4)),
            ..Setup::default()
        },
    )
    .await;
    held.claimed(4, 2).await;

    // The running job holds its slot past that: the three waiting are given
    // back unburned. (That claiming ahead then stops until a handler
    // finishes is `runway::tests::stale_jobs_are_taken_oldest_first…`.)
    let back = "SELECT count(*) FROM pgtasks.job
                 WHERE data ? 'hold' AND state = 'created' AND attempt = 0";
    wait_for(
        "the jobs claimed ahead to be given back",
        SECS_10,
        || async { (count(&held.client, back).await == 3).then_some(()) },
    )
    .await;
    assert_eq!(count_state(&held.client, "active").await, 1);
    assert_eq!(held.started.lock().unwrap().len(), 2, "none of them ran");
    held.stop().await;
}

#[tokio::test]
async fn jobs_claimed_ahead_are_given_back_when_the_listener_reconnects() {
    let db = TestDb::new().await;
    let held = hold_slots(&db, Setup::default()).await;
    held.claimed(4, 2).await;
    let waiting: Vec<(i64, DateTime<Utc>)> = {
        let started = held.started.lock().unwrap().clone();
        held.client
            .query(
                "SELECT id, started_at FROM pgtasks.job WHERE state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .filter(|(id, _)| !started.contains(id))
            .collect()
    };
    assert_eq!(waiting.len(), 3);

    // Cancels sent while the listener is away are lost: the jobs waiting
    // could be among them, so they go back rather than start (and are
    // claimed again: a later claim, unless still waiting to be).
    assert_eq!(kill_listener(&held.client).await, 1);
    // Well before their 5 s on the runway are up, when the worker's timer
    // would give them back anyway.
    let within = Duration::from_secs(3);
    wait_for(
        "the jobs claimed ahead to be given back",
        within,
        || async {
            let mut back = 0;
            for (id, claimed_at) in &waiting {
                let row = held
                .client
                .query_one(
                    "SELECT state = 'created' OR started_at > $2 FROM pgtasks.job WHERE id = $1",
                    &[id, claimed_at],
                )
                .await
                .unwrap();
                back += usize::from(row.get::<_, bool>(0));
            }
            (back == waiting.len()).then_some(())
        },
    )
    .await;
    assert_eq!(held.started.lock().unwrap().len(), 2, "none of them ran");
    held.stop().await;
}
