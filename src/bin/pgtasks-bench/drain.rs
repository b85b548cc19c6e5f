//! Drain throughput: how fast a worker empties a queue that is already full.
//!
//! Method: `n` no-op jobs are inserted by one `INSERT … SELECT
//! generate_series` into paused queue(s) (spread evenly over `queues`
//! queues), then `VACUUM ANALYZE` (outside timing, as the peers' harness did
//! for its fresh-statistics figures). The worker process starts with every
//! queue at `concurrency` and reports `ready`; the clock starts when one
//! statement resumes the queues and notifies their channels, and stops when
//! the database shows no job of them waiting or running. Starting the clock
//! at the resume keeps process start-up out of the figure.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::time::Instant;
use tokio_postgres::Client;

use pgtasks::wakeup::CHANNEL_PREFIX;

use crate::pickup::BENCH_QUEUE;
use crate::report::Report;
use crate::scratch::{add_queues, vacuum_analyze, with_scratch, Scratch};
use crate::worker::{Event, ReportMode, WorkerArgs, WorkerProcess};

#[derive(Debug, Clone)]
pub struct DrainSpec {
    pub n: usize,
    pub queues: usize,
    /// Per queue.
    pub concurrency: usize,
    pub max_seconds: u64,
    /// `fresh`, or the scale benchmark's labels.
    pub scenario: String,
    pub completed: CompletedJobs,
}

/// What the drained worker does with completed jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletedJobs {
    /// Kept for the default retention (7 days), as pg-boss keeps them.
    Kept,
    /// Deleted (`retention = 0`), as graphile-worker does.
    Deleted,
}

impl CompletedJobs {
    pub fn label(self) -> &'static str {
        match self {
            CompletedJobs::Kept => "kept",
            CompletedJobs::Deleted => "deleted",
        }
    }
}

pub struct DrainResult {
    pub jobs_per_s: f64,
}

const PREFILL: &str = "
INSERT INTO pgtasks.job (queue, data)
SELECT ($1::text[])[1 + i % cardinality($1::text[])], jsonb_build_object('i', i)
  FROM generate_series(1, $2::int) i";

/// One statement, one transaction: the NOTIFYs are delivered after the
/// queues are visible as resumed.
const RESUME: &str = "
WITH resumed AS (
    UPDATE pgtasks.queue SET paused = false WHERE name = ANY($1) RETURNING name
)
SELECT pg_notify($2 || name, '') FROM resumed";

const UNFINISHED: &str = "
SELECT count(*) FROM pgtasks.job
 WHERE queue = ANY($1) AND state IN ('created', 'retry', 'active')";

const COMPLETED: &str =
    "SELECT count(*) FROM pgtasks.job WHERE queue = ANY($1) AND state = 'completed'";

/// With `retention = 0` a completed job is deleted: the rows left are the
/// jobs not completed.
const LEFT: &str = "SELECT count(*) FROM pgtasks.job WHERE queue = ANY($1)";

/// The queue names: `bench` alone, or `bench-00` … for several.
pub fn queue_names(queues: usize) -> Vec<String> {
    if queues <= 1 {
        vec![BENCH_QUEUE.to_string()]
    } else {
        (0..queues)
            .map(|i| format!("{BENCH_QUEUE}-{i:02}"))
            .collect()
    }
}

/// Measures on a scratch database of its own.
pub async fn run(
    report: &mut Report,
    admin_url: &str,
    spec: &DrainSpec,
) -> anyhow::Result<DrainResult> {
    with_scratch(admin_url, "drain", |db| async move {
        measure(report, &db, spec).await
    })
    .await
}

async fn measure(
    report: &mut Report,
    db: &Scratch,
    spec: &DrainSpec,
) -> anyhow::Result<DrainResult> {
    if spec.n == 0 || spec.concurrency == 0 {
        bail!("drain needs n > 0 and concurrency > 0");
    }
    report.step(&format!(
        "drain: {} jobs over {} queue(s), concurrency {} per queue, scenario {}, completed jobs {}",
        spec.n,
        spec.queues,
        spec.concurrency,
        spec.scenario,
        spec.completed.label()
    ));
    let queues = queue_names(spec.queues);
    let client = db.connect().await?;
    add_queues(&client, &queues, true).await?;
    let fill_started = Instant::now();
    let n = i32::try_from(spec.n).context("n is too large")?;
    client
        .execute(PREFILL, &[&queues, &n])
        .await
        .context("pre-filling jobs")?;
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    vacuum_analyze(&client).await?;

    let args = WorkerArgs {
        url: db.url.clone(),
        queues: queues.clone(),
        concurrency: spec.concurrency,
        api: false,
        report: ReportMode::Count,
        discard_completed: spec.completed == CompletedJobs::Deleted,
    };
    let (worker, mut events) = WorkerProcess::start(&args).await?;

    let started = Instant::now();
    client
        .execute(RESUME, &[&queues, &CHANNEL_PREFIX])
        .await
        .context("resuming the queues")?;
    let deadline = started + Duration::from_secs(spec.max_seconds);
    let mut handled = 0u64;
    let mut progress = Vec::new();
    let mut next_sample = started + Duration::from_millis(500);
    let mut finished = false;
    while Instant::now() < deadline {
        // Once every handler has run, ask the database often: the end is
        // the last outcome's commit.
        let wait = if handled >= spec.n as u64 { 2 } else { 20 };
        match tokio::time::timeout(Duration::from_millis(wait), events.recv()).await {
            Ok(Some(Event::Handled(count))) => handled = count,
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => bail!("the worker process exited during the drain"),
        }
        if Instant::now() >= next_sample {
            progress.push(json!([
                (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                handled
            ]));
            next_sample += Duration::from_millis(500);
        }
        if handled >= spec.n as u64 && count(&client, UNFINISHED, &queues).await? == 0 {
            finished = true;
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    worker.stop().await?;
    let completed = if spec.completed == CompletedJobs::Deleted {
        spec.n as i64 - count(&client, LEFT, &queues).await?
    } else {
        count(&client, COMPLETED, &queues).await?
    };
    let jobs_per_s = completed as f64 / seconds;

    let defaults = pgtasks::Config::default();
    report.emit(
        "process_throughput",
        json!({
            "config": {
                "queues": spec.queues,
                "concurrency_per_queue": spec.concurrency,
                "claim": "one UPDATE ... FOR UPDATE SKIP LOCKED per wakeup, up to the free slots (<= concurrency)",
                "completer_batch_max": pgtasks::worker::completer::MAX_BATCH,
                "pool_size": defaults.database.pool_size,
                "listen": defaults.worker.listen,
                "poll_interval_s": defaults.worker.poll_interval.as_secs_f64(),
                "worker": "separate process (pgtasks-bench worker)",
                "timed_from": "resume of the paused, pre-filled queue(s) (UPDATE + NOTIFY)",
                "vacuum_analyzed_after_fill": true,
                "scenario": spec.scenario,
                "completed_jobs": spec.completed.label(),
            },
            "n": spec.n,
            "completed": completed,
            "timed_out": !finished,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "jobs_per_s": (jobs_per_s * 10.0).round() / 10.0,
            "fill_seconds": (fill_seconds * 1000.0).round() / 1000.0,
            "progress_handled": progress,
        }),
    );
    report.note(format!(
        "drain {} jobs, {} queue(s) x concurrency {} [{}, completed {}]: {:.0} jobs/s ({:.2} s){}",
        spec.n,
        spec.queues,
        spec.concurrency,
        spec.scenario,
        spec.completed.label(),
        jobs_per_s,
        seconds,
        if finished {
            String::new()
        } else {
            format!(
                " TIMED OUT after {} s, {completed} completed",
                spec.max_seconds
            )
        }
    ));
    Ok(DrainResult { jobs_per_s })
}

async fn count(client: &Client, statement: &str, queues: &[String]) -> anyhow::Result<i64> {
    Ok(client
        .query_one(statement, &[&queues])
        .await
        .context("counting jobs")?
        .get(0))
}
