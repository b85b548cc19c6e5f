//! Pickup latency: how long a job waits between its submitter seeing the
//! commit and a handler starting on it, with the worker idle.
//!
//! Method (the peers'): the worker runs in its own process (see
//! [`crate::worker`]) and idles for `settle`; producers then submit `n` jobs
//! one at a time on a fixed schedule (`rate` per second). Each producer has its
//! own connection (SQL) or shares one HTTP client (`POST /api/jobs/readme`);
//! job `i` goes to producer `i % producers` and is due at `t0 + i / rate`.
//! Per job the producer reads the wall clock (µs) just before the call and
//! just after it returned; the worker reports the wall clock at handler start.
//! Latency = handler start − call returned (slightly negative values are
//! possible: the NOTIFY can wake the worker before the client has read its
//! COMMIT reply). Also reported: from before the call, and the database's own
//! `started_at − created_at` (created_at is the INSERT's transaction start).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use pgtasks::config::README_QUEUE;

use crate::report::{merged, wall_us, Report, Summary};
use crate::scratch::{with_scratch, Scratch};
use crate::worker::{collect_jobs, ReportMode, WorkerArgs, WorkerProcess};

/// The queue SQL benchmarks use.
pub const BENCH_QUEUE: &str = "bench";

/// The producers' statement: a plain INSERT, as any other system would send.
const INSERT_JOB: &str = "INSERT INTO pgtasks.job (queue, data) VALUES ($1, $2) RETURNING id";

/// The seed's request body.
pub const README_BODY: &str = r#"{"arg1":"read me","arg2":"any data"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// A plain SQL INSERT per job, each committed on its own.
    Sql,
    /// `POST /api/jobs/readme` to the worker process's own API.
    Http,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Sql => "sql",
            Via::Http => "http",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PickupSpec {
    pub via: Via,
    pub rate: f64,
    pub n: usize,
    pub producers: usize,
    pub concurrency: usize,
    pub settle: Duration,
    /// `fresh` (an empty table), or the scale benchmark's labels.
    pub scenario: String,
}

pub struct PickupResult {
    pub after: Summary,
    pub before: Summary,
    pub db: Summary,
}

/// Measures on a scratch database of its own.
pub async fn run(
    report: &mut Report,
    admin_url: &str,
    spec: &PickupSpec,
) -> anyhow::Result<PickupResult> {
    with_scratch(admin_url, "pickup", |db| async move {
        measure(report, &db, spec, &json!({})).await
    })
    .await
}

/// One submitted job as its producer saw it.
struct Sent {
    id: i64,
    before_us: i64,
    after_us: i64,
}

/// Measures on `db` as it is (the scale benchmark pre-fills it). `extra` is
/// merged into the reported config.
pub async fn measure(
    report: &mut Report,
    db: &Scratch,
    spec: &PickupSpec,
    extra: &Value,
) -> anyhow::Result<PickupResult> {
    if spec.n == 0 || spec.rate <= 0.0 || spec.producers == 0 {
        bail!("pickup needs n > 0, rate > 0 and at least one producer");
    }
    report.step(&format!(
        "pickup latency: {} at {}/s, {} jobs, {} producer(s), scenario {}",
        spec.via.name(),
        spec.rate,
        spec.n,
        spec.producers,
        spec.scenario
    ));
    let queue = match spec.via {
        Via::Sql => BENCH_QUEUE,
        Via::Http => README_QUEUE,
    };
    let args = WorkerArgs {
        url: db.url.clone(),
        queues: vec![queue.to_string()],
        concurrency: spec.concurrency,
        api: spec.via == Via::Http,
        report: ReportMode::Jobs,
        discard_completed: false,
    };
    let (worker, events) = WorkerProcess::start(&args).await?;
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let collector = tokio::spawn(collect_jobs(events, count_tx));
    tokio::time::sleep(spec.settle).await;

    let produced = match spec.via {
        Via::Sql => produce_sql(db, spec, queue).await,
        Via::Http => match worker.api_addr {
            Some(addr) => produce_http(addr, spec).await,
            None => Err(anyhow::anyhow!("the worker reported no API address")),
        },
    };
    let expected = produced.as_ref().map_or(0, Vec::len);
    let _ = tokio::time::timeout(
        Duration::from_secs(15),
        count_rx.wait_for(|&picked| picked >= expected),
    )
    .await;
    worker.stop().await?;
    let started = collector.await.context("collecting worker events")?;
    let sent = produced?;

    let mut after = Vec::with_capacity(sent.len());
    let mut before = Vec::with_capacity(sent.len());
    for s in &sent {
        if let Some(&at) = started.get(&s.id) {
            after.push((at - s.after_us) as f64 / 1000.0);
            before.push((at - s.before_us) as f64 / 1000.0);
        }
    }
    let picked = after.len();
    let ids: Vec<i64> = sent.iter().map(|s| s.id).collect();
    let db_ms: Vec<f64> = db
        .connect()
        .await?
        .query(
            "SELECT (extract(epoch FROM started_at - created_at) * 1000)::float8
               FROM pgtasks.job WHERE id = ANY($1) AND started_at IS NOT NULL",
            &[&ids],
        )
        .await
        .context("reading started_at - created_at")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let first = sent.iter().map(|s| s.before_us).min().unwrap_or(0);
    let last = sent.iter().map(|s| s.before_us).max().unwrap_or(0);
    let achieved_rate = if last > first {
        (sent.len() - 1) as f64 / ((last - first) as f64 / 1e6)
    } else {
        0.0
    };

    let result = PickupResult {
        after: Summary::of(after),
        before: Summary::of(before),
        db: Summary::of(db_ms),
    };
    let (submit, call) = match spec.via {
        Via::Sql => (INSERT_JOB, "INSERT"),
        Via::Http => ("POST /api/jobs/readme", "HTTP response"),
    };
    let config = merged(
        json!({
            "via": spec.via.name(),
            "submit": submit,
            "rate_per_s": spec.rate,
            "n": spec.n,
            "producers": spec.producers,
            "concurrency": spec.concurrency,
            "worker": "separate process (pgtasks-bench worker), idle before the first job",
            "settle_s": spec.settle.as_secs_f64(),
            "listen": true,
            "poll_interval_s": pgtasks::Config::default().worker.poll_interval.as_secs_f64(),
            "scenario": spec.scenario,
        }),
        extra,
    );
    let with = |basis: String, summary: &Summary, more: Value| {
        let mut line = json!({ "basis": basis, "config": config });
        if let Value::Object(map) = &mut line {
            map.extend(summary.fields());
        }
        merged(line, &more)
    };
    report.emit(
        "pickup_latency",
        with(
            format!("client: handler start - {call} returned"),
            &result.after,
            json!({
                "picked": picked,
                "sent": sent.len(),
                "achieved_rate_per_s": (achieved_rate * 10.0).round() / 10.0,
            }),
        ),
    );
    report.emit(
        "pickup_latency_incl_insert",
        with(
            format!("client: handler start - before {call}"),
            &result.before,
            json!({}),
        ),
    );
    report.emit(
        "pickup_latency_db",
        with(
            "db: started_at - created_at".to_string(),
            &result.db,
            json!({}),
        ),
    );
    report.note(format!(
        "pickup {} {}/s x{} [{}]: {}",
        spec.via.name(),
        spec.rate,
        spec.n,
        spec.scenario,
        result.after.line()
    ));
    report.note(format!(
        "    incl. submit: {} | db: {} | picked {picked}/{} at {achieved_rate:.1}/s",
        result.before.line(),
        result.db.line(),
        sent.len()
    ));
    if achieved_rate < 0.9 * spec.rate {
        report.note(format!(
            "    WARNING: the producers reached {achieved_rate:.0}/s of the {}/s asked (more --producers, or a quieter machine)",
            spec.rate
        ));
    }
    if picked < sent.len() {
        report.note(format!(
            "    WARNING: {} jobs were not picked up within 15 s",
            sent.len() - picked
        ));
    }
    Ok(result)
}

/// The due time of job `i`.
fn due(t0: Instant, i: usize, rate: f64) -> Instant {
    t0 + Duration::from_secs_f64(i as f64 / rate)
}

async fn produce_sql(db: &Scratch, spec: &PickupSpec, queue: &str) -> anyhow::Result<Vec<Sent>> {
    let mut producers = Vec::with_capacity(spec.producers);
    for _ in 0..spec.producers {
        let client = db.connect().await?;
        let statement = client
            .prepare(INSERT_JOB)
            .await
            .context("preparing INSERT")?;
        producers.push((client, statement));
    }
    let t0 = Instant::now() + Duration::from_millis(10);
    let mut tasks = JoinSet::new();
    for (p, (client, statement)) in producers.into_iter().enumerate() {
        let (n, step, rate, queue) = (spec.n, spec.producers, spec.rate, queue.to_string());
        tasks.spawn(async move {
            let mut sent = Vec::new();
            for i in (p..n).step_by(step) {
                tokio::time::sleep_until(due(t0, i, rate)).await;
                let data = json!({ "i": i });
                let before_us = wall_us();
                let row = client.query_one(&statement, &[&queue, &data]).await?;
                let after_us = wall_us();
                sent.push(Sent {
                    id: row.get(0),
                    before_us,
                    after_us,
                });
            }
            anyhow::Ok(sent)
        });
    }
    gather(tasks).await
}

async fn produce_http(addr: SocketAddr, spec: &PickupSpec) -> anyhow::Result<Vec<Sent>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://{addr}/api/jobs/readme");
    let t0 = Instant::now() + Duration::from_millis(10);
    let mut tasks = JoinSet::new();
    for p in 0..spec.producers {
        let (client, url) = (client.clone(), url.clone());
        let (n, step, rate) = (spec.n, spec.producers, spec.rate);
        tasks.spawn(async move {
            let mut sent = Vec::new();
            for i in (p..n).step_by(step) {
                tokio::time::sleep_until(due(t0, i, rate)).await;
                let before_us = wall_us();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(README_BODY)
                    .send()
                    .await?;
                let status = response.status();
                let body: Value = response.json().await?;
                let after_us = wall_us();
                let id = body["jobId"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .with_context(|| format!("POST {url}: {status} {body}"))?;
                sent.push(Sent {
                    id,
                    before_us,
                    after_us,
                });
            }
            anyhow::Ok(sent)
        });
    }
    gather(tasks).await
}

async fn gather(mut tasks: JoinSet<anyhow::Result<Vec<Sent>>>) -> anyhow::Result<Vec<Sent>> {
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("producer task")??);
    }
    Ok(all)
}
