//! Scale: do the figures hold when the table is big or the work is spread?
//!
//! - Pickup latency (SQL, `rate`/s, `n` jobs) on a fresh table, then on a table
//!   that already holds `finished` completed jobs and `delayed` jobs due in a
//!   day, all in the benchmark's own queue, so the delayed rows share its
//!   claim index and the finished rows its heap and primary key.
//! - Drain of `drain_n` jobs: in one queue at `concurrency`; in one queue at
//!   `queues × concurrency`; spread evenly over `queues` queues worked at once,
//!   each at `concurrency`. The last against the first two separates the cost
//!   of many queues from the effect of more jobs in flight.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;

use crate::drain::{self, CompletedJobs, DrainSpec};
use crate::pickup::{self, PickupResult, PickupSpec, Via, BENCH_QUEUE};
use crate::report::Report;
use crate::scratch::{add_queues, vacuum_analyze, with_scratch, Scratch};

#[derive(Debug, Clone)]
pub struct ScaleSpec {
    pub finished: usize,
    pub delayed: usize,
    pub rate: f64,
    pub n: usize,
    pub concurrency: usize,
    pub settle: Duration,
    pub drain_n: usize,
    pub queues: usize,
    pub max_seconds: u64,
}

/// Finished and delayed rows, without waking anyone: the schema's
/// documented session switch for bulk loads.
const FILL_FINISHED: &str = "
INSERT INTO pgtasks.job (queue, data, state, attempt, created_at, run_at, started_at, completed_at)
SELECT $1, jsonb_build_object('i', i), 'completed', 1, now(), now(), now(), now()
  FROM generate_series(1, $2::int) i";
const FILL_DELAYED: &str = "
INSERT INTO pgtasks.job (queue, data, run_at)
SELECT $1, jsonb_build_object('i', i), now() + interval '1 day'
  FROM generate_series(1, $2::int) i";

pub async fn run(report: &mut Report, admin_url: &str, spec: &ScaleSpec) -> anyhow::Result<()> {
    let pickup = |scenario: &str| PickupSpec {
        via: Via::Sql,
        rate: spec.rate,
        n: spec.n,
        producers: 1,
        concurrency: spec.concurrency,
        settle: spec.settle,
        scenario: scenario.to_string(),
    };
    let fresh = pickup::run(report, admin_url, &pickup("scale-fresh")).await?;

    let loaded_spec = pickup("scale-loaded");
    let loaded = {
        let report = &mut *report;
        with_scratch(admin_url, "scale", |db| async move {
            fill_and_measure(report, &db, spec, &loaded_spec).await
        })
        .await?
    };

    let drain = |queues: usize, concurrency: usize, scenario: &str| DrainSpec {
        n: spec.drain_n,
        queues,
        concurrency,
        max_seconds: spec.max_seconds,
        scenario: scenario.to_string(),
        completed: CompletedJobs::Kept,
    };
    let one = drain::run(
        report,
        admin_url,
        &drain(1, spec.concurrency, "scale-1-queue"),
    )
    .await?;
    let total = spec.concurrency * spec.queues;
    let one_total = drain::run(
        report,
        admin_url,
        &drain(1, total, "scale-1-queue-same-total"),
    )
    .await?;
    let many = drain::run(
        report,
        admin_url,
        &drain(spec.queues, spec.concurrency, "scale-many-queues"),
    )
    .await?;

    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some((a / b * 1000.0).round() / 1000.0),
        _ => None,
    };
    let p50 = ratio(loaded.after.p50, fresh.after.p50);
    let p99 = ratio(loaded.after.p99, fresh.after.p99);
    let drain_ratio = ratio(Some(many.jobs_per_s), Some(one.jobs_per_s));
    let drain_ratio_total = ratio(Some(many.jobs_per_s), Some(one_total.jobs_per_s));
    report.emit(
        "scale_summary",
        json!({
            "config": {
                "finished": spec.finished, "delayed": spec.delayed, "rate_per_s": spec.rate,
                "n": spec.n, "drain_n": spec.drain_n, "queues": spec.queues,
                "concurrency_per_queue": spec.concurrency,
            },
            "pickup_p50_loaded_over_fresh": p50,
            "pickup_p99_loaded_over_fresh": p99,
            "drain_many_queues_over_one": drain_ratio,
            "drain_many_queues_over_one_same_total_concurrency": drain_ratio_total,
            "drain_one_queue_jobs_per_s": one.jobs_per_s.round(),
            "drain_one_queue_same_total_concurrency_jobs_per_s": one_total.jobs_per_s.round(),
            "drain_many_queues_jobs_per_s": many.jobs_per_s.round(),
        }),
    );
    let show = |r: Option<f64>| r.map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
    report.note(format!(
        "scale: pickup with {} finished + {} delayed vs fresh: p50 x{}, p99 x{}; drain over {} queues vs 1 queue: x{} (same concurrency per queue), x{} (same total concurrency {total})",
        spec.finished,
        spec.delayed,
        show(p50),
        show(p99),
        spec.queues,
        show(drain_ratio),
        show(drain_ratio_total)
    ));
    Ok(())
}

/// Fills `db` with finished and delayed jobs, then measures pickup on it.
async fn fill_and_measure(
    report: &mut Report,
    db: &Scratch,
    spec: &ScaleSpec,
    pickup_spec: &PickupSpec,
) -> anyhow::Result<PickupResult> {
    report.step(&format!(
        "scale: filling {} finished and {} delayed jobs",
        spec.finished, spec.delayed
    ));
    let mut client = db.connect().await?;
    add_queues(&client, &[BENCH_QUEUE.to_string()], false).await?;
    let started = Instant::now();
    let finished = i32::try_from(spec.finished).context("finished is too large")?;
    let delayed = i32::try_from(spec.delayed).context("delayed is too large")?;
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL pgtasks.skip_notify = on")
        .await?;
    tx.execute(FILL_FINISHED, &[&BENCH_QUEUE, &finished])
        .await
        .context("filling finished jobs")?;
    tx.execute(FILL_DELAYED, &[&BENCH_QUEUE, &delayed])
        .await
        .context("filling delayed jobs")?;
    tx.commit().await?;
    let fill_seconds = started.elapsed().as_secs_f64();
    vacuum_analyze(&client).await?;
    // Writing 1.1M rows leaves a checkpoint due, whose writes would land in
    // the measurement: a table that grew over weeks has no such backlog.
    client
        .batch_execute("CHECKPOINT")
        .await
        .context("CHECKPOINT after the fill (needs a superuser)")?;
    let extra = json!({
        "table": { "finished": spec.finished, "delayed": spec.delayed, "same_queue": true },
        "fill_seconds": (fill_seconds * 1000.0).round() / 1000.0,
    });
    pickup::measure(report, db, pickup_spec, &extra).await
}
