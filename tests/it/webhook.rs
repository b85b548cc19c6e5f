//! The webhook handler against a real HTTP receiver on an ephemeral
//! 127.0.0.1 port: outputs, retries, permanent failures, timeouts,
//! signatures, Retry-After, dead and slow endpoints.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use pgtasks::config::{HandlerConfig, QueueConfig, Secret, WebhookConfig};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::time::Instant;
use warp::http::{HeaderMap, Response};
use warp::Filter;

use crate::support::{
    count_state, insert_job, serve_configured, wait_for, wait_for_state, TestDb, SECS_10,
};

/// A request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    /// The client's end of the connection: equal for a reused connection.
    peer: Option<SocketAddr>,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

/// An answer the receiver gives; after the scripted ones, 200 `{"ok": true}`.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn new(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct Script {
    received: Mutex<Vec<Received>>,
    replies: Mutex<VecDeque<Reply>>,
}

/// A real HTTP server on 127.0.0.1 that records requests and answers from
/// a script.
struct Receiver {
    addr: SocketAddr,
    script: Arc<Script>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(replies: Vec<Reply>) -> Receiver {
        let script = Arc::new(Script::default());
        script.replies.lock().unwrap().extend(replies);
        let shared = script.clone();
        let route = warp::any()
            .and(warp::addr::remote())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |peer, headers: HeaderMap, body: warp::hyper::body::Bytes| {
                    let script = shared.clone();
                    async move {
                        script.received.lock().unwrap().push(Received {
                            at: Instant::now(),
                            peer,
                            headers,
                            body: body.to_vec(),
                        });
                        let reply = script
                            .replies
                            .lock()
                            .unwrap()
                            .pop_front()
                            .unwrap_or_else(|| Reply::new(200, r#"{"ok": true}"#));
                        tokio::time::sleep(reply.delay).await;
                        let mut response = Response::builder().status(reply.status);
                        for (name, value) in &reply.headers {
                            response = response.header(*name, value);
                        }
                        response.body(reply.body).unwrap()
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(warp::serve(route).incoming(listener).run());
        Receiver {
            addr,
            script,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jobs", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.script.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A queue whose jobs go to `url`, retried quickly.
fn webhook_queue(url: String, tweak: impl FnOnce(&mut WebhookConfig)) -> QueueConfig {
    let mut webhook = WebhookConfig {
        url,
        ..WebhookConfig::default()
    };
    tweak(&mut webhook);
    QueueConfig {
        retry_limit: 3,
        retry_delay: Duration::from_millis(10),
        retry_backoff: false,
        handler: Some(HandlerConfig::Webhook(webhook)),
        ..QueueConfig::default()
    }
}

#[tokio::test]
async fn webhook_posts_the_job_and_stores_the_json_answer_as_output() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(vec![Reply::new(200, r#"{"sent": true, "n": 1}"#)]).await;
    let mut config = db.config();
    config.queues.insert(
        "hooks".into(),
        webhook_queue(receiver.url(), |w| {
            w.headers
                .insert("Authorization".into(), "Bearer t0ken".into());
        }),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    let id = insert_job(&client, "hooks", json!({"to": "a@example.com"})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    let output: Value = client
        .query_one("SELECT output FROM pgtasks.job WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(output, json!({"sent": true, "n": 1}));
    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.header("idempotency-key"),
        Some(id.to_string().as_str())
    );
    assert_eq!(request.header("authorization"), Some("Bearer t0ken"));
    assert_eq!(request.header("x-pgtasks-signature"), None, "no secret");
    let body = request.json();
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["queue"], json!("hooks"));
    assert_eq!(body["data"], json!({"to": "a@example.com"}));
    assert_eq!(body["attempt"], json!(1));
    assert_eq!(body["max_attempts"], json!(4));
    let created_at = body["created_at"].as_str().expect("created_at is a string");
    chrono::DateTime::parse_from_rfc3339(created_at).expect("created_at is RFC 3339");
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn webhook_500_is_retried_and_the_error_history_keeps_status_and_body() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(vec![Reply::new(500, "database on fire")]).await;
    let mut config = db.config();
    config
        .queues
        .insert("hooks".into(), webhook_queue(receiver.url(), |_| {}));
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    let id = insert_job(&client, "hooks", json!({})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    let row = client
        .query_one(
            "SELECT attempt, errors->0->>'error', output FROM pgtasks.job WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(
        row.get::<_, String>(1),
        "webhook answered 500 Internal Server Error: database on fire"
    );
    assert_eq!(row.get::<_, Value>(2), json!({"ok": true}));
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].header("idempotency-key"),
        received[1].header("idempotency-key"),
        "the same key on every attempt"
    );
    assert_eq!(received[1].json()["attempt"], json!(2));
    assert_eq!(
        received[0].peer, received[1].peer,
        "the second attempt reused the pooled connection"
    );
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn webhook_4xx_fails_the_job_at_once_unless_configured_to_retry() {
    let db = TestDb::new().await;
    let strict = Receiver::start(vec![Reply::new(400, r#"{"error": "bad email"}"#)]).await;
    let lenient = Receiver::start(vec![Reply::new(404, "not yet")]).await;
    let mut config = db.config();
    config
        .queues
        .insert("strict".into(), webhook_queue(strict.url(), |_| {}));
    config.queues.insert(
        "lenient".into(),
        webhook_queue(lenient.url(), |w| w.retry_client_errors = true),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "strict", json!({})).await;
    insert_job(&client, "lenient", json!({})).await;
    wait_for_state(&client, "failed", 1, SECS_10).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    let rows = client
        .query(
            "SELECT queue, state::text, attempt, last_error FROM pgtasks.job ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(1), "failed");
    assert_eq!(rows[0].get::<_, i32>(2), 1, "no retry after a 400");
    assert_eq!(
        rows[0].get::<_, String>(3),
        r#"webhook answered 400 Bad Request: {"error": "bad email"}"#
    );
    assert_eq!(strict.received().len(), 1);
    assert_eq!(rows[1].get::<_, String>(1), "completed");
    assert_eq!(rows[1].get::<_, i32>(2), 2, "the 404 was retried");
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn webhook_that_does_not_answer_in_time_is_retried() {
    let db = TestDb::new().await;
    let receiver =
        Receiver::start(vec![Reply::new(200, "{}").after(Duration::from_secs(30))]).await;
    let mut config = db.config();
    config.queues.insert(
        "hooks".into(),
        webhook_queue(receiver.url(), |w| w.timeout = Duration::from_millis(300)),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "hooks", json!({})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    let row = client
        .query_one("SELECT attempt, errors->0->>'error' FROM pgtasks.job", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(
        row.get::<_, String>(1),
        "webhook did not answer within 300ms"
    );
    let received = receiver.received();
    let gap = received[1].at - received[0].at;
    assert!(
        gap >= Duration::from_millis(300) && gap < Duration::from_secs(5),
        "second attempt {gap:?} after the first"
    );
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn signed_webhook_requests_verify_with_the_shared_secret() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(vec![]).await;
    let mut config = db.config();
    config.queues.insert(
        "hooks".into(),
        webhook_queue(receiver.url(), |w| w.secret = Some(Secret::new("s3cret"))),
    );
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "hooks", json!({"amount": 12})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    let request = &receiver.received()[0];
    let timestamp = request.header("x-pgtasks-timestamp").expect("timestamp");
    let signature = request.header("x-pgtasks-signature").expect("signature");
    // What a receiver does: HMAC-SHA256 over "<timestamp>.<raw body>".
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    let hex = signature.strip_prefix("sha256=").expect("sha256= prefix");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    mac.verify_slice(&bytes).expect("the signature verifies");
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp is now-ish: {age} s old");

    // A tampered body does not verify.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{timestamp}.{{\"amount\": 13}}").as_bytes());
    assert!(mac.verify_slice(&bytes).is_err());
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let db = TestDb::new().await;
    let receiver = Receiver::start(vec![
        Reply::new(503, "maintenance").header("Retry-After", "1"),
        Reply::new(429, "slow down").header("Retry-After", "1"),
    ])
    .await;
    let mut config = db.config();
    config
        .queues
        .insert("hooks".into(), webhook_queue(receiver.url(), |_| {}));
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "hooks", json!({})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;

    let received = receiver.received();
    assert_eq!(received.len(), 3);
    for pair in received.windows(2) {
        let gap = pair[1].at - pair[0].at;
        // The queue's own delay is 10 ms.
        assert!(
            gap >= Duration::from_millis(990) && gap < Duration::from_secs(5),
            "retried {gap:?} after a Retry-After of 1 s"
        );
    }
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn slow_and_dead_endpoints_do_not_block_other_queues_and_shutdown_releases() {
    let db = TestDb::new().await;
    let slow = Receiver::start(vec![
        Reply::new(200, "{}").after(Duration::from_secs(60)),
        Reply::new(200, "{}").after(Duration::from_secs(60)),
    ])
    .await;
    let live = Receiver::start(vec![]).await;
    // A port nobody listens on: connections are refused.
    let dead_addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut config = db.config();
    config.worker.shutdown_grace = Duration::from_millis(200);
    let mut slow_queue = webhook_queue(slow.url(), |w| w.timeout = Duration::from_secs(120));
    slow_queue.concurrency = 2;
    config.queues.insert("slow".into(), slow_queue);
    config.queues.insert(
        "dead".into(),
        QueueConfig {
            retry_delay: Duration::from_secs(60),
            ..webhook_queue(format!("http://{dead_addr}/jobs"), |_| {})
        },
    );
    config
        .queues
        .insert("live".into(), webhook_queue(live.url(), |_| {}));
    let (running, shutdown) = serve_configured(config).await;
    let client = db.client().await;
    insert_job(&client, "slow", json!({})).await;
    insert_job(&client, "slow", json!({})).await;
    insert_job(&client, "dead", json!({})).await;
    wait_for("both slow requests in flight", SECS_10, || async {
        (slow.received().len() == 2).then_some(())
    })
    .await;
    wait_for_state(&client, "retry", 1, SECS_10).await;
    let started = Instant::now();
    insert_job(&client, "live", json!({})).await;
    wait_for_state(&client, "completed", 1, SECS_10).await;
    assert!(started.elapsed() < Duration::from_secs(2));

    let error: String = client
        .query_one(
            "SELECT last_error FROM pgtasks.job WHERE queue = 'dead'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        error.starts_with("webhook request failed") && error.contains("refused"),
        "{error}"
    );
    assert_eq!(count_state(&client, "active").await, 2);

    // Shutdown cancels the slow requests and hands their jobs back.
    shutdown.cancel();
    tokio::time::timeout(SECS_10, running.stopped())
        .await
        .expect("stopped");
    let states = client
        .query(
            "SELECT state::text, attempt, last_error FROM pgtasks.job WHERE queue = 'slow'",
            &[],
        )
        .await
        .unwrap();
    for row in states {
        assert_eq!(
            (row.get::<_, String>(0).as_str(), row.get::<_, i32>(1)),
            ("created", 0),
            "{:?}",
            row.get::<_, Option<String>>(2)
        );
    }
}
