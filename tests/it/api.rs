//! The HTTP API: routes through `warp::test`, and end to end over a socket.

use std::collections::HashSet;
use std::time::Duration;

use pgtasks::api::{self, ApiState};
use pgtasks::config::Config;
use pgtasks::submit::Submitter;
use pgtasks::Runtime;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::support::{listening, wait_for, wait_for_state, Recorder, TestDb, SECS_10};

/// Routes over the test database, with no workers running.
struct Api {
    routes: BoxedFilter<(Response,)>,
    shutdown: CancellationToken,
    _tasks: TaskTracker,
}

fn api_for(config: &Config) -> Api {
    let pool = pgtasks::db::create_pool(&config.database).unwrap();
    let tasks = TaskTracker::new();
    let submitter = Submitter::start(pool.clone(), 2, &tasks);
    let shutdown = CancellationToken::new();
    let state = ApiState::new(config, pool, submitter, None, shutdown.clone());
    Api {
        routes: api::routes(state),
        shutdown,
        _tasks: tasks,
    }
}

async fn queues_exist(db: &TestDb, names: &[&str]) {
    let client = db.client().await;
    for name in names {
        client
            .execute(
                "INSERT INTO pgtasks.queue (name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[name],
            )
            .await
            .unwrap();
    }
}

async fn call(api: &Api, request: warp::test::RequestBuilder) -> (u16, Value) {
    let response = request.reply(&api.routes).await;
    let status = response.status().as_u16();
    let body = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
    (status, body)
}

fn post_json(path: &str, body: &str) -> warp::test::RequestBuilder {
    warp::test::request()
        .method("POST")
        .path(path)
        .header("content-type", "application/json")
        .header("content-length", body.len().to_string())
        .body(body)
}

fn assert_error(status: u16, body: &Value, expected_status: u16, contains: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["success"], json!(false), "{body}");
    let error = body["error"].as_str().expect("error is a string");
    assert!(
        error.contains(contains),
        "error {error:?} should contain {contains:?}"
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        2,
        "only success and error: {body}"
    );
}

#[tokio::test]
async fn seed_routes_answer_exactly_like_the_seed() {
    let db = TestDb::new().await;
    queues_exist(&db, &["readme-queue"]).await;
    let api = api_for(&db.config());

    let response = warp::test::request()
        .path("/health")
        .reply(&api.routes)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().as_ref(), br#"{"status":"ok"}"#);

    // The seed's client: fetch with Content-Type JSON and JSON.stringify(body).
    let response = post_json(
        "/api/jobs/readme",
        r#"{"arg1":"read me","arg2":"any data"}"#,
    )
    .reply(&api.routes)
    .await;
    assert_eq!(response.status(), 200);
    let text = std::str::from_utf8(response.body()).unwrap();
    let body: Value = serde_json::from_str(text).unwrap();
    let id = body["jobId"].as_str().unwrap().to_string();
    assert_eq!(
        text,
        format!(r#"{{"success":true,"jobId":"{id}","queue":"readme-queue"}}"#)
    );

    let client = db.client().await;
    let data: Value = client
        .query_one(
            "SELECT data FROM pgtasks.job WHERE id = $1",
            &[&id.parse::<i64>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(data, json!({"arg1": "read me", "arg2": "any data"}));
}

#[tokio::test]
async fn every_error_is_json_with_the_right_status() {
    let db = TestDb::new().await;
    queues_exist(&db, &["readme-queue"]).await;
    let mut config = db.config();
    config.api.max_body_bytes = 1000;
    let api = api_for(&config);

    let (s, b) = call(&api, post_json("/api/jobs/readme", r#"{"arg1":"#)).await;
    assert_error(s, &b, 400, "not valid JSON");
    let (s, b) = call(&api, post_json("/api/jobs/readme", "[1,2]")).await;
    assert_error(s, &b, 400, "must be a JSON object");
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(2000));
    let (s, b) = call(&api, post_json("/api/jobs/readme", &big)).await;
    assert_error(s, &b, 413, "larger than 1000 bytes");
    // Without Content-Length (a chunked upload) the limit still holds...
    let unsized_big = warp::test::request()
        .method("POST")
        .path("/api/jobs/readme")
        .header("content-type", "application/json")
        .body(big.clone());
    let (s, b) = call(&api, unsized_big).await;
    assert_error(s, &b, 413, "larger than 1000 bytes");
    // ...and a small one is accepted, not refused with 411.
    let unsized_small = warp::test::request()
        .method("POST")
        .path("/api/jobs/readme")
        .header("content-type", "application/json")
        .body(r#"{"chunked":true}"#);
    let (s, b) = call(&api, unsized_small).await;
    assert_eq!(s, 200, "{b}");
    let form = warp::test::request()
        .method("POST")
        .path("/api/jobs/readme")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b");
    let (s, b) = call(&api, form).await;
    assert_error(s, &b, 415, "application/json");
    let (s, b) = call(&api, post_json("/api/jobs/nope", "{}")).await;
    assert_error(s, &b, 404, "no queue has the route `nope`");
    let (s, b) = call(&api, post_json("/api/queues/ghost/jobs", "{}")).await;
    assert_error(s, &b, 404, "unknown queue \"ghost\"");
    let (s, b) = call(
        &api,
        post_json("/api/queues/readme-queue/jobs", r#"{"priority":"high"}"#),
    )
    .await;
    assert_error(s, &b, 400, "priority");
    let (s, b) = call(
        &api,
        post_json("/api/queues/readme-queue/jobs", r#"{"prio":1}"#),
    )
    .await;
    assert_error(s, &b, 400, "unknown field `prio`");
    let (s, b) = call(
        &api,
        post_json(
            "/api/queues/readme-queue/jobs",
            r#"{"delay":5,"run_at":"2030-01-01T00:00:00Z"}"#,
        ),
    )
    .await;
    assert_error(s, &b, 400, "delay");
    let (s, b) = call(
        &api,
        post_json(
            "/api/queues/readme-queue/jobs/batch",
            r#"{"jobs":[{},{"max_attempts":0}]}"#,
        ),
    )
    .await;
    assert_error(s, &b, 400, "jobs[1].max_attempts");
    let (s, b) = call(&api, warp::test::request().path("/api/jobs/999999")).await;
    assert_error(s, &b, 404, "job 999999 not found");
    let (s, b) = call(&api, warp::test::request().path("/nowhere")).await;
    assert_error(s, &b, 404, "not found");
    let (s, b) = call(&api, warp::test::request().method("DELETE").path("/health")).await;
    assert_error(s, &b, 405, "method not allowed");

    // Nothing above wrote a job except the one accepted request.
    let client = db.client().await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM pgtasks.job", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // 500: the database refuses for a reason that is not the caller's.
    client
        .batch_execute("DROP TABLE pgtasks.job CASCADE")
        .await
        .unwrap();
    let (s, b) = call(&api, post_json("/api/jobs/readme", "{}")).await;
    assert_error(s, &b, 500, "database error");
}

#[tokio::test]
async fn database_down_is_503_and_ready_says_why() {
    let db = TestDb::new().await;
    let mut config = db.config();
    // Nothing listens on port 1.
    config.database.url = "postgres://postgres@127.0.0.1:1/none".into();
    config.database.connect_timeout = Duration::from_millis(500);
    let api = api_for(&config);
    let (s, b) = call(&api, post_json("/api/jobs/readme", r#"{"a":1}"#)).await;
    assert_error(s, &b, 503, "database unavailable");
    let (s, b) = call(&api, warp::test::request().path("/ready")).await;
    assert_eq!(s, 503);
    assert_eq!(b["status"], "unavailable");
    assert!(b["reason"].as_str().unwrap().starts_with("database"), "{b}");
    // Liveness does not depend on the database.
    let (s, _) = call(&api, warp::test::request().path("/health")).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn ready_is_200_until_shutdown_begins() {
    let db = TestDb::new().await;
    let api = api_for(&db.config());
    let (s, b) = call(&api, warp::test::request().path("/ready")).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ready")));
    api.shutdown.cancel();
    let (s, b) = call(&api, warp::test::request().path("/ready")).await;
    assert_eq!((s, b["reason"].as_str()), (503, Some("shutting down")));
}

#[tokio::test]
async fn token_guards_api_routes_but_not_health_or_ready() {
    let db = TestDb::new().await;
    queues_exist(&db, &["readme-queue"]).await;
    let mut config = db.config();
    // Numeric-looking on purpose: env would parse it as a number.
    config.api.token = Some("12345".into());
    let api = api_for(&config);
    let (s, b) = call(&api, post_json("/api/jobs/readme", "{}")).await;
    assert_error(s, &b, 401, "bearer token");
    let wrong = post_json("/api/jobs/readme", "{}").header("authorization", "Bearer 1234");
    let (s, b) = call(&api, wrong).await;
    assert_error(s, &b, 401, "bearer token");
    let right = post_json("/api/jobs/readme", "{}").header("authorization", "Bearer 12345");
    let (s, _) = call(&api, right).await;
    assert_eq!(s, 200);
    let (s, _) = call(&api, warp::test::request().path("/api/queues")).await;
    assert_eq!(s, 401);
    for open in ["/health", "/ready", "/metrics"] {
        let (s, _) = call(&api, warp::test::request().path(open)).await;
        assert_eq!(s, 200, "{open}");
    }
}

#[tokio::test]
async fn job_lifecycle_endpoints_get_cancel_retry_and_list() {
    let db = TestDb::new().await;
    queues_exist(&db, &["q"]).await;
    let api = api_for(&db.config());

    let (s, b) = call(
        &api,
        post_json(
            "/api/queues/q/jobs",
            r#"{"data":{"k":1},"priority":5,"delay":3600,"max_attempts":2,"singleton_key":"s"}"#,
        ),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let id = b["jobId"].as_str().unwrap().to_string();
    let (s, b) = call(&api, warp::test::request().path(&format!("/api/jobs/{id}"))).await;
    assert_eq!(s, 200);
    let job = &b["job"];
    assert_eq!(
        (job["id"].as_str(), job["state"].as_str()),
        (Some(id.as_str()), Some("created"))
    );
    assert_eq!(
        (job["priority"].as_i64(), job["max_attempts"].as_i64()),
        (Some(5), Some(2))
    );
    assert_eq!(job["data"], json!({"k": 1}));
    let run_at: chrono::DateTime<chrono::Utc> = job["run_at"].as_str().unwrap().parse().unwrap();
    assert!(run_at > chrono::Utc::now() + chrono::Duration::minutes(59));

    let cancel = |id: &str| {
        warp::test::request()
            .method("POST")
            .path(&format!("/api/jobs/{id}/cancel"))
    };
    let retry = |id: &str| {
        warp::test::request()
            .method("POST")
            .path(&format!("/api/jobs/{id}/retry"))
    };
    let (s, b) = call(&api, cancel(&id)).await;
    assert_eq!((s, b["job"]["state"].as_str()), (200, Some("cancelled")));
    let (s, b) = call(&api, cancel(&id)).await;
    assert_error(s, &b, 409, "is cancelled");
    let (s, b) = call(&api, retry(&id)).await;
    assert_error(s, &b, 409, "only failed jobs");

    // A failed job gets one more attempt, due now.
    let client = db.client().await;
    client
        .execute(
            "UPDATE pgtasks.job SET state = 'failed', attempt = 2 WHERE id = $1",
            &[&id.parse::<i64>().unwrap()],
        )
        .await
        .unwrap();
    let (s, b) = call(&api, retry(&id)).await;
    assert_eq!((s, b["job"]["state"].as_str()), (200, Some("retry")));
    assert_eq!(b["job"]["max_attempts"].as_i64(), Some(3));

    let (s, b) = call(
        &api,
        post_json(
            "/api/queues/q/jobs/batch",
            r#"{"jobs":[{"data":{"n":1}},{"data":{"n":2}}]}"#,
        ),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let ids: Vec<i64> = b["jobIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect();
    let rows = client
        .query(
            "SELECT id, (data->>'n')::int FROM pgtasks.job WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.get::<_, i32>(1)).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(
        rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>(),
        ids
    );

    let (s, b) = call(&api, warp::test::request().path("/api/queues")).await;
    assert_eq!(s, 200);
    let q = b["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "q")
        .unwrap()
        .clone();
    assert_eq!(
        (q["created"].as_i64(), q["retry"].as_i64()),
        (Some(2), Some(1))
    );
    assert!(q["oldest_waiting_seconds"].as_f64().unwrap() >= 0.0);

    let pause = warp::test::request()
        .method("POST")
        .path("/api/queues/q/pause");
    let (s, b) = call(&api, pause).await;
    assert_eq!(
        (s, b["queue"].as_str(), b["paused"].as_bool()),
        (200, Some("q"), Some(true))
    );
    let (_, b) = call(&api, warp::test::request().path("/api/queues")).await;
    let q = b["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "q")
        .unwrap()
        .clone();
    assert_eq!(q["paused"], json!(true));
    let ghost = warp::test::request()
        .method("POST")
        .path("/api/queues/ghost/resume");
    let (s, b) = call(&api, ghost).await;
    assert_error(s, &b, 404, "unknown queue");
}

#[tokio::test]
async fn openapi_document_lists_every_route() {
    let db = TestDb::new().await;
    let api = api_for(&db.config());
    let (s, doc) = call(&api, warp::test::request().path("/api/openapi.json")).await;
    assert_eq!(s, 200);
    // Every route the router answers, with a sample path that reaches it.
    let routes = [
        ("get", "/health", "/health"),
        ("get", "/ready", "/ready"),
        ("get", "/metrics", "/metrics"),
        ("post", "/api/jobs/{route}", "/api/jobs/readme"),
        ("post", "/api/queues/{queue}/jobs", "/api/queues/q/jobs"),
        (
            "post",
            "/api/queues/{queue}/jobs/batch",
            "/api/queues/q/jobs/batch",
        ),
        ("get", "/api/jobs/{id}", "/api/jobs/1"),
        ("post", "/api/jobs/{id}/cancel", "/api/jobs/1/cancel"),
        ("post", "/api/jobs/{id}/retry", "/api/jobs/1/retry"),
        ("post", "/api/jobs/{id}/resume", "/api/jobs/1/resume"),
        ("post", "/api/queues/{queue}/pause", "/api/queues/q/pause"),
        ("post", "/api/queues/{queue}/resume", "/api/queues/q/resume"),
        (
            "post",
            "/api/queues/{queue}/redrive",
            "/api/queues/q/redrive",
        ),
        ("get", "/api/schedules", "/api/schedules"),
        ("put", "/api/schedules/{name}", "/api/schedules/s"),
        ("delete", "/api/schedules/{name}", "/api/schedules/s"),
        ("get", "/api/queues", "/api/queues"),
        ("get", "/api/openapi.json", "/api/openapi.json"),
    ];
    let paths = doc["paths"].as_object().unwrap();
    for (method, template, sample) in routes {
        assert!(
            paths.get(template).and_then(|p| p.get(method)).is_some(),
            "{method} {template} missing from the document"
        );
        // The router really serves it: not the router's own 404 or 405.
        let response = warp::test::request()
            .method(&method.to_uppercase())
            .path(sample)
            .header("content-type", "application/json")
            .body("{}")
            .reply(&api.routes)
            .await;
        let body: Value = serde_json::from_slice(response.body()).unwrap_or(Value::Null);
        assert!(
            body["error"] != "not found" && response.status() != 405,
            "{method} {sample} is not routed: {body}"
        );
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        documented,
        routes.len(),
        "the document has operations the router does not serve"
    );
}

/// A runtime with the API on an ephemeral port and workers running.
async fn serve(db: &TestDb, recorder: &Recorder) -> (pgtasks::Running, CancellationToken, String) {
    let mut config = db.config();
    config.api.host = "127.0.0.1".into();
    config.api.port = 0;
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .handler("readme-queue", recorder.handler())
        .api(true)
        .start(shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{}", running.api_addr().unwrap());
    listening(&running).await;
    (running, shutdown, base)
}

#[tokio::test]
async fn end_to_end_over_a_socket_submit_run_and_see_it_completed() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown, base) = serve(&db, &recorder).await;
    let http = reqwest::Client::new();
    let submitted: Value = http
        .post(format!("{base}/api/jobs/readme"))
        .header("content-type", "application/json")
        .body(r#"{"arg1":"read me"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(submitted["success"], json!(true));
    let id = submitted["jobId"].as_str().unwrap().to_string();
    let job = wait_for("job completed", SECS_10, || {
        let (http, url) = (http.clone(), format!("{base}/api/jobs/{id}"));
        async move {
            let body: Value = http.get(url).send().await.ok()?.json().await.ok()?;
            (body["job"]["state"] == "completed").then_some(body)
        }
    })
    .await;
    assert_eq!(job["job"]["attempt"], json!(1));
    let ready = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("pgtasks_jobs_completed_total{queue=\"readme-queue\"}"));
    assert!(metrics.contains("pgtasks_pickup_latency_seconds_bucket"));
    assert!(metrics.contains("pgtasks_listener_connected 1"));
    shutdown.cancel();
    running.stopped().await;
}

#[tokio::test]
async fn two_thousand_submits_from_fifty_clients_each_get_their_own_job() {
    let db = TestDb::new().await;
    let recorder = Recorder::default();
    let (running, shutdown, base) = serve(&db, &recorder).await;
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for c in 0..50 {
        let (http, base) = (http.clone(), base.clone());
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..40 {
                let body: Value = http
                    .post(format!("{base}/api/jobs/readme"))
                    .header("content-type", "application/json")
                    .body(json!({"client": c, "i": i}).to_string())
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(body["success"], json!(true), "{body}");
                ids.push((
                    body["jobId"].as_str().unwrap().parse::<i64>().unwrap(),
                    c,
                    i,
                ));
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.unwrap());
    }
    assert_eq!(all.len(), 2000);
    let unique: HashSet<i64> = all.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(unique.len(), 2000, "two requests were given the same id");

    let client = db.client().await;
    wait_for_state(&client, "completed", 2000, Duration::from_secs(60)).await;
    // Each id is the row holding that request's own data.
    let ids: Vec<i64> = all.iter().map(|(id, _, _)| *id).collect();
    let rows = client
        .query("SELECT id, (data->>'client')::int, (data->>'i')::int FROM pgtasks.job WHERE id = ANY($1)", &[&ids])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000);
    let by_id: std::collections::HashMap<i64, (i32, i32)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for (id, c, i) in &all {
        assert_eq!(by_id[id], (*c, *i), "job {id} holds another request's data");
    }
    let runs = recorder.runs();
    assert_eq!(runs.len(), 2000);
    assert!(runs.values().all(|&n| n == 1));
    shutdown.cancel();
    running.stopped().await;
}
