//! Enqueue throughput, with no worker running (as in the peers' method).
//!
//! - Single-row: `clients` connections, each committing one
//!   `INSERT … RETURNING id` after another for `seconds`, into
//!   `pgtasks.job`, then the same into `bench_job_plain`, a copy of the table
//!   (`LIKE pgtasks.job INCLUDING ALL`: columns, defaults, identity,
//!   constraints, indexes) without triggers. The ratio is the cost of the
//!   `job_inserted` row trigger's WHEN clause (the queue list and the
//!   sleeping-worker lock; no worker runs, so it never calls its function).
//! - Batch: one client, `pgtasks::store::insert_jobs` (one `INSERT … SELECT
//!   FROM unnest(arrays)` statement) per chunk of `chunk` jobs; the median of
//!   `ROUNDS` rounds of `batch_n` jobs.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use pgtasks::store::{insert_jobs, NewJob};

use crate::pickup::BENCH_QUEUE;
use crate::report::{percentile, Report};
use crate::scratch::{add_queues, vacuum_analyze, with_scratch, Scratch};

#[derive(Debug, Clone)]
pub struct EnqueueSpec {
    pub clients: usize,
    pub seconds: f64,
    pub batch_n: usize,
    pub chunk: usize,
}

const INSERT_TRIGGERED: &str = "INSERT INTO pgtasks.job (queue, data) VALUES ($1, $2) RETURNING id";
const INSERT_PLAIN: &str = "INSERT INTO bench_job_plain (queue, data) VALUES ($1, $2) RETURNING id";
const CREATE_PLAIN: &str = "CREATE TABLE bench_job_plain (LIKE pgtasks.job INCLUDING ALL)";

pub async fn run(report: &mut Report, admin_url: &str, spec: &EnqueueSpec) -> anyhow::Result<()> {
    with_scratch(admin_url, "enqueue", |db| async move {
        measure(report, &db, spec).await
    })
    .await
}

async fn measure(report: &mut Report, db: &Scratch, spec: &EnqueueSpec) -> anyhow::Result<()> {
    let admin = db.connect().await?;
    add_queues(&admin, &[BENCH_QUEUE.to_string()], false).await?;
    admin
        .batch_execute(CREATE_PLAIN)
        .await
        .context("creating bench_job_plain")?;

    report.step(&format!(
        "enqueue: {} clients x single-row INSERT for {} s, with and without the trigger",
        spec.clients, spec.seconds
    ));
    // Alternating short rounds, so a noisy stretch of the machine hits both
    // tables alike; the figures are the medians of the per-round rates.
    vacuum_analyze(&admin).await?;
    let round_s = spec.seconds / ROUNDS as f64;
    let (mut with_jobs, mut with_s, mut with_rates) = (0, 0.0, Vec::new());
    let (mut plain_jobs, mut plain_s, mut plain_rates) = (0, 0.0, Vec::new());
    for _ in 0..ROUNDS {
        let (jobs, seconds) = single(db, INSERT_TRIGGERED, spec.clients, round_s).await?;
        (with_jobs, with_s) = (with_jobs + jobs, with_s + seconds);
        with_rates.push(jobs as f64 / seconds);
        let (jobs, seconds) = single(db, INSERT_PLAIN, spec.clients, round_s).await?;
        (plain_jobs, plain_s) = (plain_jobs + jobs, plain_s + seconds);
        plain_rates.push(jobs as f64 / seconds);
    }
    let with_rate = median(&with_rates);
    let plain_rate = median(&plain_rates);
    for (metric, table, statement, jobs, seconds, rate, rates) in [
        (
            "enqueue_single",
            "pgtasks.job",
            INSERT_TRIGGERED,
            with_jobs,
            with_s,
            with_rate,
            &with_rates,
        ),
        (
            "enqueue_single_no_trigger",
            "bench_job_plain",
            INSERT_PLAIN,
            plain_jobs,
            plain_s,
            plain_rate,
            &plain_rates,
        ),
    ] {
        report.emit(
            metric,
            json!({
                "config": {
                    "concurrent_clients": spec.clients,
                    "connections": "one per client",
                    "seconds_target": spec.seconds,
                    "table": table,
                    "statement": statement,
                    "worker_running": false,
                    "vacuumed_before": true,
                    "rounds": ROUNDS,
                    "alternating": "with trigger, without, with, ...",
                    "jobs_per_s": "median of the rounds' rates",
                },
                "jobs": jobs,
                "seconds": (seconds * 1000.0).round() / 1000.0,
                "jobs_per_s": rate.round(),
                "round_jobs_per_s": rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
            }),
        );
    }
    let ratio = with_rate / plain_rate;
    report.emit(
        "enqueue_trigger_cost",
        json!({
            "with_trigger_jobs_per_s": with_rate.round(),
            "without_trigger_jobs_per_s": plain_rate.round(),
            "ratio_with_over_without": (ratio * 1000.0).round() / 1000.0,
            "trigger": "job_inserted (schema step 6): BEFORE row trigger; WHEN = standard-queue list + shared try of the queue's sleep lock",
        }),
    );
    report.note(format!(
        "enqueue single-row, {} clients: {with_rate:.0} jobs/s into pgtasks.job, {plain_rate:.0} without the trigger (ratio {ratio:.2})",
        spec.clients
    ));

    report.step(&format!(
        "enqueue: {ROUNDS} rounds of a batch of {} in chunks of {} via pgtasks::store::insert_jobs",
        spec.batch_n, spec.chunk
    ));
    vacuum_analyze(&admin).await?;
    // Rounds, as above: one round's rate swings by half on this kind of
    // machine (a commit's WAL flush of ~300 kB per chunk varies).
    let (mut batch_jobs, mut batch_s, mut batch_rates) = (0, 0.0, Vec::new());
    for _ in 0..ROUNDS {
        let (jobs, seconds) = batch(db, spec).await?;
        (batch_jobs, batch_s) = (batch_jobs + jobs, batch_s + seconds);
        batch_rates.push(jobs as f64 / seconds);
    }
    let batch_rate = median(&batch_rates);
    report.emit(
        "enqueue_batch",
        json!({
            "config": {
                "n": spec.batch_n,
                "chunk": spec.chunk,
                "clients": 1,
                "api": "pgtasks::store::insert_jobs (one INSERT ... SELECT FROM unnest(arrays) per chunk)",
                "worker_running": false,
                "rounds": ROUNDS,
                "jobs_per_s": "median of the rounds' rates",
            },
            "jobs": batch_jobs,
            "seconds": (batch_s * 1000.0).round() / 1000.0,
            "jobs_per_s": batch_rate.round(),
            "round_jobs_per_s": batch_rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
        }),
    );
    report.note(format!(
        "enqueue batch, chunks of {}: {batch_rate:.0} jobs/s (median of {ROUNDS} rounds of {} jobs: {})",
        spec.chunk,
        spec.batch_n,
        batch_rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
    Ok(())
}

/// Rounds per table in the single-row figure, and of the batch figure.
const ROUNDS: usize = 5;

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 50.0).unwrap_or(0.0)
}

/// Runs `statement` from `clients` connections for `seconds`.
/// Returns the rows inserted and the seconds from start to the last commit.
async fn single(
    db: &Scratch,
    statement: &str,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<(u64, f64)> {
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = db.connect().await?;
        let prepared = client
            .prepare(statement)
            .await
            .context("preparing INSERT")?;
        connections.push((client, prepared));
    }
    let started = Instant::now();
    let stop_at = started + Duration::from_secs_f64(seconds);
    let mut tasks = JoinSet::new();
    for (client, prepared) in connections {
        tasks.spawn(async move {
            let mut inserted = 0u64;
            while Instant::now() < stop_at {
                let data = json!({ "i": inserted });
                client.query_one(&prepared, &[&BENCH_QUEUE, &data]).await?;
                inserted += 1;
            }
            anyhow::Ok(inserted)
        });
    }
    let mut total = 0;
    while let Some(done) = tasks.join_next().await {
        total += done.context("client task")??;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}

async fn batch(db: &Scratch, spec: &EnqueueSpec) -> anyhow::Result<(u64, f64)> {
    let config = pgtasks::config::DatabaseConfig {
        url: db.url.clone(),
        ..Default::default()
    };
    let pool = pgtasks::db::create_pool(&config)?;
    let client = pool.get().await.context("connecting")?;
    let chunk = spec.chunk.max(1);
    let started = Instant::now();
    let mut inserted = 0u64;
    for first in (0..spec.batch_n).step_by(chunk) {
        let jobs: Vec<NewJob> = (first..(first + chunk).min(spec.batch_n))
            .map(|i| NewJob {
                queue: BENCH_QUEUE.to_string(),
                data: json!({ "i": i }),
                ..Default::default()
            })
            .collect();
        inserted += insert_jobs(&client, &jobs)
            .await
            .context("insert_jobs")?
            .len() as u64;
    }
    Ok((inserted, started.elapsed().as_secs_f64()))
}
