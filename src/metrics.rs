//! Prometheus metrics. The rest of the code records through the `metrics`
//! facade; this module installs the process-wide recorder once and renders
//! it for `GET /metrics`, refreshing the gauges that are read, not counted
//! (queue depth, pool usage, listener state) at each scrape.
//!
//! Labels are bounded: queue names come from config, HTTP routes are
//! templates (`/api/jobs/{id}`), never ids.

use std::sync::OnceLock;

use deadpool_postgres::Pool;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::listener::ListenerStatus;
use crate::store;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Seconds; from sub-millisecond pickups to multi-minute jobs.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Installs the recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder =
                match builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS) {
                    Ok(b) => b,
                    Err(_) => PrometheusBuilder::new(),
                };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if the embedding program installed its own recorder;
            // ours then renders nothing, which the caller's exporter covers.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// One queue's worker metrics, registered once when its worker starts:
/// recording through these handles costs no allocation and no registry
/// lookup per job. A recorder installed later than that is not seen, so the
/// runtime installs its own first when it serves `/metrics`.
pub struct QueueMetrics {
    pub pickup_latency: metrics::Histogram,
    pub run_duration: metrics::Histogram,
    pub completed: metrics::Counter,
    pub retried: metrics::Counter,
    pub failed: metrics::Counter,
    pub claim_errors: metrics::Counter,
}

impl std::fmt::Debug for QueueMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueMetrics").finish_non_exhaustive()
    }
}

impl QueueMetrics {
    pub fn new(queue: &str) -> QueueMetrics {
        let queue = queue.to_string();
        QueueMetrics {
            pickup_latency: metrics::histogram!("pgtasks_pickup_latency_seconds", "queue" => queue.clone()),
            run_duration: metrics::histogram!("pgtasks_run_duration_seconds", "queue" => queue.clone()),
            completed: metrics::counter!("pgtasks_jobs_completed_total", "queue" => queue.clone()),
            retried: metrics::counter!("pgtasks_jobs_retried_total", "queue" => queue.clone()),
            failed: metrics::counter!("pgtasks_jobs_failed_total", "queue" => queue.clone()),
            claim_errors: metrics::counter!("pgtasks_claim_errors_total", "queue" => queue),
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "pgtasks_jobs_submitted_total",
        "Jobs submitted through the API, by queue."
    );
    describe_counter!(
        "pgtasks_jobs_completed_total",
        "Attempts that completed, by queue."
    );
    describe_counter!(
        "pgtasks_jobs_failed_total",
        "Jobs failed for good (attempts exhausted), by queue."
    );
    describe_counter!(
        "pgtasks_jobs_retried_total",
        "Failed attempts scheduled for retry, by queue."
    );
    describe_histogram!(
        "pgtasks_pickup_latency_seconds",
        Unit::Seconds,
        "Claim time minus the later of created_at and run_at."
    );
    describe_histogram!(
        "pgtasks_run_duration_seconds",
        Unit::Seconds,
        "Handler run time per attempt."
    );
    describe_gauge!(
        "pgtasks_queue_waiting",
        "Jobs in created or retry state, by queue."
    );
    describe_gauge!("pgtasks_queue_active", "Jobs running, by queue.");
    describe_gauge!(
        "pgtasks_listener_connected",
        "1 when the LISTEN connection is up."
    );
    describe_counter!(
        "pgtasks_listener_reconnects_total",
        "LISTEN connections lost and retried."
    );
    describe_gauge!("pgtasks_pool_connections", "Open pooled connections.");
    describe_gauge!("pgtasks_pool_available", "Idle pooled connections.");
    describe_gauge!(
        "pgtasks_pool_waiting",
        "Tasks waiting for a pooled connection."
    );
    describe_counter!(
        "pgtasks_http_requests_total",
        "HTTP requests by method, route and status."
    );
    describe_histogram!(
        "pgtasks_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request time by route."
    );
}

/// Refreshes the read-at-scrape gauges and renders the text format.
pub async fn render(pool: &Pool, listener: Option<&ListenerStatus>) -> String {
    let handle = install();
    let status = pool.status();
    metrics::gauge!("pgtasks_pool_connections").set(status.size as f64);
    metrics::gauge!("pgtasks_pool_available").set(status.available as f64);
    metrics::gauge!("pgtasks_pool_waiting").set(status.waiting as f64);
    if let Some(listener) = listener {
        metrics::gauge!("pgtasks_listener_connected").set(if listener.is_connected() {
            1.0
        } else {
            0.0
        });
    }
    if let Ok(client) = pool.get().await {
        if let Ok(depths) = store::queue_depths(&client).await {
            for (queue, waiting, active) in depths {
                metrics::gauge!("pgtasks_queue_waiting", "queue" => queue.clone())
                    .set(waiting as f64);
                metrics::gauge!("pgtasks_queue_active", "queue" => queue).set(active as f64);
            }
        }
    }
    handle.render()
}

/// Counts one HTTP request under its route template.
pub fn record_http(method: &str, route: &'static str, status: u16, seconds: f64) {
    metrics::counter!("pgtasks_http_requests_total",
        "method" => method.to_string(), "route" => route, "status" => status.to_string())
    .increment(1);
    metrics::histogram!("pgtasks_http_request_duration_seconds", "route" => route).record(seconds);
}
