//! Queue policies (schema steps 4 and 5): limits enforced by a unique index, so
//! they hold for plain SQL, `pgtasks.send`, HTTP and any number of instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtasks::config::{QueueConfig, QueuePolicy};
use pgtasks::{Job, JobContext, Runtime};
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use crate::support::{wait_for_state, TestDb, SECS_10};

async fn queue_with_policy(client: &tokio_postgres::Client, queue: &str, policy: &str) {
    client
        .execute(
            "INSERT INTO pgtasks.queue (name, policy) VALUES ($1, $2)",
            &[&queue, &policy],
        )
        .await
        .unwrap();
}

async fn send(client: &tokio_postgres::Client, queue: &str, key: Option<&str>) -> (i64, bool) {
    let row = client
        .query_one(
            "SELECT id, duplicate FROM pgtasks.send($1, singleton_key => $2)",
            &[&queue, &key],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn state_of(client: &tokio_postgres::Client, id: i64) -> String {
    client
        .query_one("SELECT state::text FROM pgtasks.job WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Moves a waiting job to running, as a claim does.
async fn start(client: &tokio_postgres::Client, id: i64) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE pgtasks.job SET state = 'active', attempt = attempt + 1,
                    started_at = now(), lease_until = now() + interval '1 minute'
              WHERE id = $1",
            &[&id],
        )
        .await
}

async fn fail(client: &tokio_postgres::Client, id: i64) {
    client
        .execute(
            "SELECT pgtasks.fail_jobs(ARRAY[$1::bigint],
                    ARRAY[(SELECT attempt FROM pgtasks.job WHERE id = $1)], ARRAY['boom'])",
            &[&id],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn short_keeps_one_queued_job_per_key_from_sql_and_send() {
    let db = TestDb::new().await;
    let client = db.client().await;
    queue_with_policy(&client, "short-q", "short").await;

    let (first, duplicate) = send(&client, "short-q", None).await;
    assert!(!duplicate);
    // A plain INSERT is refused by the policy index, whose detail names the rule...
    let err = client
        .execute("INSERT INTO pgtasks.job (queue) VALUES ('short-q')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));
    let detail = err.as_db_error().unwrap().detail().unwrap_or_default();
    assert!(detail.contains("short: the queued job"), "{detail}");
    // ...send() answers with the queued job...
    assert_eq!(send(&client, "short-q", None).await, (first, true));
    // ...another key has a place of its own...
    let (keyed, duplicate) = send(&client, "short-q", Some("k")).await;
    assert!(!duplicate && keyed != first);
    // ...and once the job runs, the next one queues.
    start(&client, first).await.unwrap();
    let (next, duplicate) = send(&client, "short-q", None).await;
    assert!(!duplicate && next != first);
}

#[tokio::test]
async fn exclusive_keeps_one_job_queued_or_running_per_key() {
    let db = TestDb::new().await;
    let client = db.client().await;
    queue_with_policy(&client, "excl", "exclusive").await;
    let (first, _) = send(&client, "excl", Some("tenant-1")).await;
    assert_eq!(send(&client, "excl", Some("tenant-1")).await, (first, true));
    start(&client, first).await.unwrap();
    assert_eq!(send(&client, "excl", Some("tenant-1")).await, (first, true));
    // A keyed plain INSERT meets the index itself; its error says which rule.
    let err = client
        .execute(
            "INSERT INTO pgtasks.job (queue, singleton_key) VALUES ('excl', 'tenant-1')",
            &[],
        )
        .await
        .unwrap_err();
    let db_error = err.as_db_error().unwrap();
    assert_eq!(db_error.constraint(), Some("job_policy_idx"));
    let detail = db_error.detail().unwrap_or_default();
    assert!(
        detail.contains("exclusive: the queued or running job"),
        "{detail}"
    );
    client
        .execute(
            "UPDATE pgtasks.job SET state = 'completed', completed_at = now(), lease_until = NULL
              WHERE id = $1",
            &[&first],
        )
        .await
        .unwrap();
    let (second, duplicate) = send(&client, "excl", Some("tenant-1")).await;
    assert!(!duplicate && second != first);
}

#[tokio::test]
async fn stately_keeps_one_job_per_state_and_a_blocked_retry_fails_visibly() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO pgtasks.queue (name) VALUES ('stately-dlq');
             INSERT INTO pgtasks.queue (name, policy, retry_limit, dead_letter)
             VALUES ('stately', 'stately', 5, 'stately-dlq');",
        )
        .await
        .unwrap();
    let (a, _) = send(&client, "stately", None).await;
    assert_eq!(send(&client, "stately", None).await, (a, true));
    start(&client, a).await.unwrap();
    // One running, one queued.
    let (b, duplicate) = send(&client, "stately", None).await;
    assert!(!duplicate);
    // A second running job of the key is refused by the index.
    let err = start(&client, b).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION));

    // a fails: it waits to retry; b may now run.
    fail(&client, a).await;
    assert_eq!(state_of(&client, a).await, "retry");
    start(&client, b).await.unwrap();
    // b fails while a already waits to retry: b fails for good, visibly.
    fail(&client, b).await;
    assert_eq!(state_of(&client, b).await, "failed");
    let last_error: String = client
        .query_one("SELECT last_error FROM pgtasks.job WHERE id = $1", &[&b])
        .await
        .unwrap()
        .get(0);
    assert!(last_error.contains("policy stately"), "{last_error}");
    let dead_letters: i64 = client
        .query_one(
            "SELECT count(*) FROM pgtasks.job WHERE queue = 'stately-dlq' AND dead_letter_of = $1",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead_letters, 1, "the refused retry is dead-lettered");
}

/// Records, per key, how many of its jobs run at once (the most seen).
#[derive(Clone, Default)]
struct PerKey {
    running: Arc<Mutex<HashMap<String, usize>>>,
    most: Arc<Mutex<HashMap<String, usize>>>,
}

impl PerKey {
    fn handler(&self) -> impl pgtasks::Handler {
        let this = self.clone();
        move |job: Job, _ctx: JobContext| {
            let this = this.clone();
            async move {
                let key = job.data["key"].as_str().unwrap_or_default().to_string();
                {
                    let mut running = this.running.lock().unwrap();
                    let now = running.entry(key.clone()).or_default();
                    *now += 1;
                    let mut most = this.most.lock().unwrap();
                    let seen = most.entry(key.clone()).or_default();
                    *seen = (*seen).max(*now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                *this.running.lock().unwrap().get_mut(&key).unwrap() -= 1;
                Ok(None)
            }
        }
    }
}

#[tokio::test]
async fn singleton_runs_one_job_per_key_at_a_time_across_two_instances() {
    let db = TestDb::new().await;
    let policy = QueueConfig {
        concurrency: 5,
        policy: QueuePolicy::Singleton,
        ..QueueConfig::default()
    };
    let per_key = PerKey::default();
    let shutdown = CancellationToken::new();
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        let running = Runtime::new(db.config())
            .queue("one-at-a-time", policy.clone(), per_key.handler())
            .start(shutdown.clone())
            .await
            .unwrap();
        crate::support::listening(&running).await;
        runtimes.push(running);
    }
    let client = db.client().await;
    // 15 jobs for each of two keys, all waiting at once.
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, data, singleton_key)
             SELECT 'one-at-a-time', jsonb_build_object('key', k), k
               FROM generate_series(1, 15), unnest(ARRAY['a', 'b']) k",
            &[],
        )
        .await
        .unwrap();
    wait_for_state(&client, "completed", 30, SECS_10 * 3).await;
    let most = per_key.most.lock().unwrap().clone();
    assert_eq!(
        most,
        HashMap::from([("a".to_string(), 1), ("b".to_string(), 1)]),
        "a key ran twice at once"
    );
    shutdown.cancel();
    for running in runtimes {
        running.stopped().await;
    }
}

#[tokio::test]
async fn http_submit_to_a_short_queue_returns_the_queued_job_as_a_duplicate() {
    let db = TestDb::new().await;
    let mut config = db.config();
    config.api.host = "127.0.0.1".into();
    config.api.port = 0;
    config.queues.get_mut("readme-queue").unwrap().policy = QueuePolicy::Short;
    let shutdown = CancellationToken::new();
    // API only: the job stays queued.
    let running = Runtime::new(config)
        .api(true)
        .workers(false)
        .start(shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{}", running.api_addr().unwrap());
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = http
            .post(format!("{base}/api/jobs/readme"))
            .json(&json!({"arg1": "read me"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert_eq!(answers[0].get("duplicate"), None, "{answers:?}");
    assert_eq!(answers[1]["duplicate"], true, "{answers:?}");
    assert_eq!(answers[0]["jobId"], answers[1]["jobId"], "{answers:?}");
    shutdown.cancel();
    running.stopped().await;
}
