//! The HTTP API (warp). One function per endpoint in `jobs` and `system`;
//! this module assembles the routes, authentication, request metrics, and
//! serves them with a graceful, bounded drain.
//!
//! | method | path | |
//! | --- | --- | --- |
//! | GET | `/health` | liveness, no database |
//! | GET | `/ready` | database + listener, 503 during shutdown |
//! | GET | `/metrics` | Prometheus |
//! | POST | `/api/jobs/{route}` | seed-compatible submit (body = data) |
//! | POST | `/api/queues/{queue}/jobs` | submit with options |
//! | POST | `/api/queues/{queue}/jobs/batch` | many jobs, one transaction |
//! | GET | `/api/jobs/{id}` | a job; `?wait=30s` long-polls until it finishes |
//! | POST | `/api/jobs/{id}/cancel`, `/retry`, `/resume` | |
//! | POST | `/api/queues/{queue}/pause`, `/resume` | |
//! | GET | `/api/queues` | counts per state |
//! | POST | `/api/queues/{queue}/redrive` | dead letters back to their queues |
//! | GET, PUT, DELETE | `/api/schedules`, `/api/schedules/{name}` | cron schedules |
//! | GET | `/api/openapi.json` | this API, described |

pub mod body;
pub mod error;
pub mod jobs;
pub mod openapi;
pub mod schedules;
pub mod system;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::config::Config;
use crate::listener::{ListenerStatus, Sleeper};
use crate::submit::Submitter;
use crate::wakeup::FinishedJobs;
use error::ApiError;

/// What every handler may use. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub pool: Pool,
    pub submitter: Submitter,
    /// Route name → queue, from `queues.<name>.route`.
    pub routes: Arc<HashMap<String, String>>,
    /// Present when this process runs a listener (then `/ready` checks it).
    pub listener: Option<Arc<ListenerStatus>>,
    pub shutdown: CancellationToken,
    pub token: Option<Arc<str>>,
    pub metrics_require_token: bool,
    pub max_body_bytes: u64,
    /// Where `?wait=` requests learn that their job finished.
    pub finished: FinishedJobs,
    /// Makes finishing statements notify while a `?wait=` request waits
    /// (present with the listener).
    pub sleeper: Option<Sleeper>,
}

impl ApiState {
    pub fn new(
        config: &Config,
        pool: Pool,
        submitter: Submitter,
        listener: Option<Arc<ListenerStatus>>,
        shutdown: CancellationToken,
    ) -> Self {
        let routes = config
            .queues
            .iter()
            .filter_map(|(queue, q)| q.route.clone().map(|r| (r, queue.clone())))
            .collect();
        ApiState {
            pool,
            submitter,
            routes: Arc::new(routes),
            listener,
            shutdown,
            token: config.api.token.as_deref().map(Arc::from),
            metrics_require_token: config.api.metrics_require_token,
            max_body_bytes: config.api.max_body_bytes,
            finished: FinishedJobs::default(),
            sleeper: None,
        }
    }

    /// Lets `?wait=` requests be woken by this process's listener (without
    /// one they re-read the job every second).
    pub fn with_finished(mut self, finished: FinishedJobs, sleeper: Option<Sleeper>) -> Self {
        self.finished = finished;
        self.sleeper = sleeper;
        self
    }
}

/// Every route, with the JSON error recovery and request metrics.
pub fn routes(state: ApiState) -> BoxedFilter<(Response,)> {
    crate::metrics::install();
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    let body = body::json(state.max_body_bytes);

    let health = warp::path!("health")
        .and(warp::get())
        .map(|| system::health().into_response());
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_state.clone())
        .then(|s| async move { system::ready(s).await.into_response() });
    let metrics_auth = if state.metrics_require_token {
        authorized(state.token.clone()).boxed()
    } else {
        warp::any().boxed()
    };
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(metrics_auth)
        .and(with_state.clone())
        .then(|s| async move { system::metrics(s).await.into_response() });

    let submit_by_route = warp::path!("jobs" / String)
        .and(warp::post())
        .and(with_state.clone())
        .and(body.clone())
        .then(|route, s, b| async move { respond(jobs::submit_by_route(s, route, b).await) });
    let get_job = warp::path!("jobs" / i64)
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::query::<HashMap<String, String>>())
        .then(|id, s, q: HashMap<String, String>| async move {
            respond(jobs::get_waiting(s, id, q.get("wait").cloned()).await)
        });
    let redrive = warp::path!("queues" / String / "redrive")
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::query::<HashMap<String, String>>())
        .then(|q, s, params: HashMap<String, String>| async move {
            respond(system::redrive(s, q, params.get("max").cloned()).await)
        });
    let schedules = warp::path!("schedules")
        .and(warp::get())
        .and(with_state.clone())
        .then(|s| async move { respond(schedules::list(s).await) });
    let put_schedule = warp::path!("schedules" / String)
        .and(warp::put())
        .and(with_state.clone())
        .and(body.clone())
        .then(|n, s, b| async move { respond(schedules::put(s, n, b).await) });
    let delete_schedule = warp::path!("schedules" / String)
        .and(warp::delete())
        .and(with_state.clone())
        .then(|n, s| async move { respond(schedules::delete(s, n).await) });
    let cancel = warp::path!("jobs" / i64 / "cancel")
        .and(warp::post())
        .and(with_state.clone())
        .then(|id, s| async move { respond(jobs::act(s, id, jobs::JobAction::Cancel).await) });
    let retry = warp::path!("jobs" / i64 / "retry")
        .and(warp::post())
        .and(with_state.clone())
        .then(|id, s| async move { respond(jobs::act(s, id, jobs::JobAction::Retry).await) });
    let resume = warp::path!("jobs" / i64 / "resume")
        .and(warp::post())
        .and(with_state.clone())
        .then(|id, s| async move { respond(jobs::act(s, id, jobs::JobAction::Resume).await) });
    let pause_queue = warp::path!("queues" / String / "pause")
        .and(warp::post())
        .and(with_state.clone())
        .then(|q, s| async move { respond(system::set_paused(s, q, true).await) });
    let resume_queue = warp::path!("queues" / String / "resume")
        .and(warp::post())
        .and(with_state.clone())
        .then(|q, s| async move { respond(system::set_paused(s, q, false).await) });
    let submit_to_queue = warp::path!("queues" / String / "jobs")
        .and(warp::post())
        .and(with_state.clone())
        .and(body.clone())
        .then(|q, s, b| async move { respond(jobs::submit_to_queue(s, q, b).await) });
    let submit_batch = warp::path!("queues" / String / "jobs" / "batch")
        .and(warp::post())
        .and(with_state.clone())
        .and(body)
        .then(|q, s, b| async move { respond(jobs::submit_batch(s, q, b).await) });
    let queues = warp::path!("queues")
        .and(warp::get())
        .and(with_state)
        .then(|s| async move { respond(system::queues(s).await) });
    let openapi = warp::path!("openapi.json").and(warp::get()).map(|| {
        warp::reply::with_header(openapi::document(), "content-type", "application/json")
            .into_response()
    });

    // Each route is boxed before they are combined: one nested filter type
    // over a dozen routes makes the compiler crawl.
    let api_routes = [
        submit_by_route.boxed(),
        get_job.boxed(),
        cancel.boxed(),
        retry.boxed(),
        resume.boxed(),
        pause_queue.boxed(),
        resume_queue.boxed(),
        redrive.boxed(),
        schedules.boxed(),
        put_schedule.boxed(),
        delete_schedule.boxed(),
        submit_to_queue.boxed(),
        submit_batch.boxed(),
        queues.boxed(),
        openapi.boxed(),
    ]
    .into_iter()
    .reduce(|a, b| a.or(b).unify().boxed())
    .expect("at least one route");
    let api = warp::path("api")
        .and(authorized(state.token.clone()))
        .and(api_routes)
        .boxed();

    [health.boxed(), ready.boxed(), metrics.boxed(), api]
        .into_iter()
        .reduce(|a, b| a.or(b).unify().boxed())
        .expect("at least one route")
        .recover(error::recover)
        .unify()
        .with(warp::log::custom(|info| {
            crate::metrics::record_http(
                info.method().as_str(),
                route_label(info.method().as_str(), info.path()),
                info.status().as_u16(),
                info.elapsed().as_secs_f64(),
            )
        }))
        .map(Reply::into_response)
        .boxed()
}

fn respond<T: Reply>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(reply) => reply.into_response(),
        Err(error) => error.into_response(),
    }
}

/// Passes when no token is configured or the request carries it.
fn authorized(
    token: Option<Arc<str>>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .or(warp::any().map(|| None))
        .unify()
        .and_then(move |header: Option<String>| {
            let token = token.clone();
            async move {
                let Some(token) = token else { return Ok(()) };
                let presented = header
                    .as_deref()
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .unwrap_or("");
                // Constant time over the token's bytes; lengths may differ.
                if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
                    Ok(())
                } else {
                    Err(warp::reject::custom(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token",
                    )))
                }
            }
        })
        .untuple_one()
}

/// The route template for metrics labels: never an id or a free-form path.
pub fn route_label(method: &str, path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (_, ["health"]) => "/health",
        (_, ["ready"]) => "/ready",
        (_, ["metrics"]) => "/metrics",
        (_, ["api", "openapi.json"]) => "/api/openapi.json",
        (_, ["api", "queues"]) => "/api/queues",
        (_, ["api", "queues", _, "jobs"]) => "/api/queues/{queue}/jobs",
        (_, ["api", "queues", _, "jobs", "batch"]) => "/api/queues/{queue}/jobs/batch",
        (_, ["api", "jobs", _, "cancel"]) => "/api/jobs/{id}/cancel",
        (_, ["api", "jobs", _, "retry"]) => "/api/jobs/{id}/retry",
        (_, ["api", "jobs", _, "resume"]) => "/api/jobs/{id}/resume",
        (_, ["api", "queues", _, "pause"]) => "/api/queues/{queue}/pause",
        (_, ["api", "queues", _, "resume"]) => "/api/queues/{queue}/resume",
        (_, ["api", "queues", _, "redrive"]) => "/api/queues/{queue}/redrive",
        (_, ["api", "schedules"]) => "/api/schedules",
        (_, ["api", "schedules", _]) => "/api/schedules/{name}",
        ("POST", ["api", "jobs", _]) => "/api/jobs/{route}",
        (_, ["api", "jobs", _]) => "/api/jobs/{id}",
        _ => "other",
    }
}

/// A bound API server, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    routes: BoxedFilter<(Response,)>,
}

impl Server {
    /// Binds first, so a taken port is a startup error, not a panic later.
    pub async fn bind(
        addr: impl tokio::net::ToSocketAddrs,
        routes: BoxedFilter<(Response,)>,
    ) -> std::io::Result<Server> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(Server { listener, routes })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then stops accepting and lets in-flight
    /// requests finish for at most `drain`.
    pub async fn run(self, shutdown: CancellationToken, drain: Duration) {
        if let Ok(addr) = self.listener.local_addr() {
            info!(%addr, "HTTP API listening");
        }
        let server = warp::serve(self.routes)
            .incoming(self.listener)
            .graceful(shutdown.clone().cancelled_owned())
            .run();
        let mut server = std::pin::pin!(server);
        tokio::select! {
            _ = &mut server => {}
            _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                warn!(drain_ms = drain.as_millis() as u64, "in-flight requests did not finish in time; closing");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn route_labels_never_carry_ids() {
        assert_eq!(route_label("GET", "/api/jobs/123"), "/api/jobs/{id}");
        assert_eq!(route_label("POST", "/api/jobs/readme"), "/api/jobs/{route}");
        assert_eq!(
            route_label("POST", "/api/jobs/9/cancel"),
            "/api/jobs/{id}/cancel"
        );
        assert_eq!(
            route_label("POST", "/api/queues/q/jobs/batch"),
            "/api/queues/{queue}/jobs/batch"
        );
        assert_eq!(route_label("GET", "/wp-admin/x"), "other");
    }
}
