//! The runtime: wires config, pool, listener, queue workers, completer and
//! maintenance together, and owns the shutdown sequence.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use pgtasks::{Config, Runtime, Job, JobContext, HandlerResult};
//! use tokio_util::sync::CancellationToken;
//!
//! async fn resize(job: Job, _ctx: JobContext) -> HandlerResult {
//!     println!("resizing {}", job.data["path"]);
//!     Ok(None)
//! }
//!
//! let shutdown = CancellationToken::new();
//! let running = Runtime::new(Config::default())
//!     .handler("images", resize)
//!     .start(shutdown.clone())
//!     .await?;
//! // ... later: shutdown.cancel();
//! running.stopped().await;
//! # Ok(()) }
//! ```
//!
//! Shutdown (when the token fires): workers stop claiming; running attempts
//! get `worker.shutdown_grace` to finish; those still running are cancelled
//! and released back to their queue (attempt not burned, available at once,
//! other instances woken by the update trigger); the completer flushes every
//! outcome; then [`Running::stopped`] returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::{self, ApiState, Server};
use crate::config::{validate_queue_name, Config, QueueConfig};
use crate::db::{self, DbError};
use crate::handler::{Handler, SharedHandler};
use crate::listener::{Listener, ListenerConfig, ListenerStatus, Sleeper};
use crate::maintenance::vacuum::VacuumAfter;
use crate::maintenance::Maintenance;
use crate::metrics::QueueMetrics;
use crate::schema;
use crate::store;
use crate::submit::Submitter;
use crate::wakeup::Wakeups;
use crate::worker::completer::Completer;
use crate::worker::{QueueStats, QueueWorker};

/// How long the completer keeps retrying unwritten outcomes after the grace
/// period when the database is unreachable.
const ACK_FLUSH_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("applying schema.sql: {0}")]
    Migrate(tokio_postgres::Error),
    #[error("creating queues from config: {0}")]
    SyncQueues(tokio_postgres::Error),
    #[error("reading the schema version: {0}")]
    SchemaCheck(tokio_postgres::Error),
    #[error(
        "the database's pgtasks schema is at step {found}, this build needs step {needed}: \
         run `pgtasks migrate` (or set `database.migrate = true`)"
    )]
    SchemaBehind { found: i32, needed: i32 },
    #[error("{0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("cannot listen on {addr} (config key `api.port` / PORT, `api.host`): {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("handler for queue `{queue}`: {reason}")]
    BadQueue { queue: String, reason: String },
}

/// What to run, built before [`Runtime::start`].
pub struct Runtime {
    config: Config,
    handlers: BTreeMap<String, SharedHandler>,
    run_workers: bool,
    run_maintenance: bool,
    run_api: bool,
}

impl Runtime {
    pub fn new(config: Config) -> Self {
        Runtime {
            config,
            handlers: BTreeMap::new(),
            run_workers: true,
            run_maintenance: true,
            run_api: false,
        }
    }

    /// Runs `handler` for every job of `queue`. A queue missing from the
    /// config is added with the default policy.
    pub fn handler(mut self, queue: &str, handler: impl Handler) -> Self {
        self.config.queues.entry(queue.to_string()).or_default();
        self.handlers.insert(queue.to_string(), Arc::new(handler));
        self
    }

    /// Declares a queue with its policy and handler.
    pub fn queue(mut self, queue: &str, policy: QueueConfig, handler: impl Handler) -> Self {
        self.config.queues.insert(queue.to_string(), policy);
        self.handler(queue, handler)
    }

    /// Whether to run queue workers (default true). Off for an API-only process.
    pub fn workers(mut self, on: bool) -> Self {
        self.run_workers = on;
        self
    }

    /// Whether to serve the HTTP API on `api.host:api.port` (default false).
    pub fn api(mut self, on: bool) -> Self {
        self.run_api = on;
        self
    }

    /// Whether to take part in maintenance (default true).
    pub fn maintenance(mut self, on: bool) -> Self {
        self.run_maintenance = on;
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Connects, migrates, creates the configured queues and starts every
    /// task. Returns once all of them run; they stop when `shutdown` fires.
    pub async fn start(self, shutdown: CancellationToken) -> Result<Running, StartError> {
        for queue in self.handlers.keys() {
            validate_queue_name(queue).map_err(|reason| StartError::BadQueue {
                queue: queue.clone(),
                reason,
            })?;
        }
        self.config.validate()?;
        if self.run_api {
            // Before the workers register their metric handles.
            crate::metrics::install();
        }
        let config = self.config;
        let pool = db::create_pool(&config.database)?;

        // Instances may start before the database does (compose, k8s): wait
        // for it, up to database.startup_timeout, instead of exiting at once.
        let deadline = tokio::time::Instant::now() + config.database.startup_timeout;
        let mut delay = Duration::from_millis(250);
        loop {
            match prepare_database(&pool, &config).await {
                Ok(()) => break,
                Err(e) if e.is_unreachable() && tokio::time::Instant::now() + delay < deadline => {
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not reachable yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(e),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        warm_pool(&pool, config.queues.len() + 2).await;

        let tasks = TaskTracker::new();
        let status = Arc::new(ListenerStatus::default());
        let handlers = if self.run_workers {
            self.handlers
        } else {
            BTreeMap::new()
        };
        let wakeups = Wakeups::new(handlers.keys().map(String::as_str));
        let mut stats = BTreeMap::new();
        let (sleeper, sleep_requests) = Sleeper::channel();
        // Workers and `?wait=` requests use it only with the listener: in
        // poll-only mode nothing is notified.
        let sleeper = config.worker.listen.then_some(sleeper);

        if self.run_maintenance {
            let maintenance = Maintenance::new(pool.clone(), config.maintenance.intervals());
            tasks.spawn(maintenance.run(shutdown.clone()));
        }

        // The listener wakes this process's workers, stops cancelled jobs,
        // and ends `?wait=` requests; an API-only process needs it too. Its
        // session lasts until the attempts have ended and their outcomes
        // are written: jobs handed to it meanwhile stay this process's
        // (schema step 9), and cancels still reach running attempts. With
        // no workers it ends with the shutdown.
        let stop_listening = if handlers.is_empty() {
            shutdown.clone()
        } else {
            CancellationToken::new()
        };
        if !handlers.is_empty() || self.run_api {
            if config.worker.listen {
                let url = config
                    .database
                    .listener_url
                    .as_deref()
                    .unwrap_or(&config.database.url);
                let key = if config.database.listener_url.is_some() {
                    "database.listener_url"
                } else {
                    "database.url"
                };
                let pg = db::pg_config(
                    url,
                    key,
                    config.database.connect_timeout,
                    "pgtasks-listener",
                )?;
                let listener_config = ListenerConfig {
                    pg,
                    check_interval: config.worker.listener_check_interval,
                    reconnect_max_delay: config.worker.reconnect_max_delay,
                };
                // Workers sleep on it; `?wait=` requests make finishing
                // statements notify through it.
                let mut pg = listener_config.pg.clone();
                pg.application_name("pgtasks-sleeper");
                let sleeping = Listener::sleeping(
                    ListenerConfig {
                        pg,
                        ..listener_config.clone()
                    },
                    wakeups.clone(),
                    sleep_requests,
                );
                tasks.spawn(sleeping.run(shutdown.clone()));
                let listener = Listener::new(
                    listener_config,
                    wakeups.clone(),
                    status.clone(),
                    shutdown.clone(),
                );
                tasks.spawn(listener.run(stop_listening.clone()));
            } else {
                info!(
                    "listener disabled: polling every {:?}",
                    config.worker.poll_interval
                );
            }
        }

        if !handlers.is_empty() {
            let work_pool = db::create_worker_pool(&config.database)?;
            warm_pool(&work_pool, handlers.len() + 1).await;
            // Room for several claims' worth of outcomes: a finished attempt
            // frees its slot once its outcome is queued, so a completer busy
            // writing one batch must not hold the slots of the next.
            let capacity = handlers
                .keys()
                .map(|q| config.queues[q].concurrency)
                .sum::<usize>()
                .max(64)
                * 4;
            let queues_where = |test: fn(&QueueConfig) -> bool| {
                config
                    .queues
                    .iter()
                    .filter(|(_, q)| test(q))
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            let discard = queues_where(|q| q.retention.is_zero());
            let wake_after_finish = queues_where(|q| q.policy.one_active_per_key());
            let (completer, acks) = Completer::new(
                work_pool.clone(),
                wakeups.clone(),
                discard,
                wake_after_finish,
                VacuumAfter::new(pool.clone(), config.maintenance.vacuum_after_jobs),
                capacity,
            );
            let give_up = CancellationToken::new();
            let completer_done = tasks.spawn(completer.run(give_up.clone()));

            let attempts = TaskTracker::new();
            let abort = CancellationToken::new();
            let workers = TaskTracker::new();
            for (queue, handler) in &handlers {
                let queue_stats = Arc::new(QueueStats::default());
                stats.insert(queue.clone(), queue_stats.clone());
                let worker = QueueWorker {
                    queue: Arc::from(queue.as_str()),
                    metrics: Arc::new(QueueMetrics::new(queue)),
                    concurrency: config.queues[queue].concurrency,
                    poll_interval: config.worker.poll_interval,
                    pool: work_pool.clone(),
                    handler: handler.clone(),
                    wakeup: wakeups.get(queue).cloned().unwrap_or_default(),
                    acks: acks.clone(),
                    stats: queue_stats,
                    attempts: attempts.clone(),
                    abort: abort.clone(),
                    running: wakeups.running().clone(),
                    sleeper: sleeper.clone(),
                    one_per_claim: config.queues[queue].policy.one_active_per_key(),
                    claim_ahead: config.queues[queue].claim_ahead,
                };
                workers.spawn(worker.run(shutdown.clone()));
            }
            workers.close();
            info!(queues = handlers.len(), "workers started");

            let grace = config.worker.shutdown_grace;
            let stopping = shutdown.clone();
            tasks.spawn(async move {
                stopping.cancelled().await;
                workers.wait().await;
                attempts.close();
                let running = attempts.len();
                if running > 0 {
                    info!(
                        running,
                        grace_ms = grace.as_millis() as u64,
                        "waiting for running jobs"
                    );
                }
                if tokio::time::timeout(grace, attempts.wait()).await.is_err() {
                    warn!(
                        running = attempts.len(),
                        "grace period over; releasing running jobs back to their queues"
                    );
                    abort.cancel();
                    attempts.wait().await;
                }
                drop(acks);
                if tokio::time::timeout(ACK_FLUSH_LIMIT, completer_done)
                    .await
                    .is_err()
                {
                    give_up.cancel();
                }
                stop_listening.cancel();
            });
        }
        let mut api_addr = None;
        if self.run_api {
            let listener_status =
                (!handlers.is_empty() && config.worker.listen).then(|| status.clone());
            let submitter = Submitter::start(pool.clone(), config.api.submit_max_in_flight, &tasks);
            let state = ApiState::new(
                &config,
                pool.clone(),
                submitter,
                listener_status,
                shutdown.clone(),
            )
            .with_finished(wakeups.finished().clone(), sleeper.clone());
            let addr = (config.api.host.clone(), config.api.port);
            let server = Server::bind(addr.clone(), api::routes(state))
                .await
                .map_err(|source| StartError::Bind {
                    addr: format!("{}:{}", addr.0, addr.1),
                    source,
                })?;
            api_addr = server.local_addr().ok();
            tasks.spawn(server.run(shutdown.clone(), config.api.shutdown_timeout));
        }
        tasks.close();

        Ok(Running {
            api_addr,
            pool,
            wakeups,
            stats,
            listener: status,
            tasks,
        })
    }
}

/// Applies the schema (when configured) and creates the configured queues.
async fn prepare_database(pool: &Pool, config: &Config) -> Result<(), StartError> {
    if config.database.migrate {
        let pg = db::pg_config(
            &config.database.url,
            "database.url",
            config.database.connect_timeout,
            "pgtasks-migrate",
        )?;
        let client = db::connect(&pg).await?;
        let version = schema::migrate(&client)
            .await
            .map_err(StartError::Migrate)?;
        info!(version, "schema up to date");
    } else {
        // Not migrating: the functions and triggers this build calls must
        // be there already, or its connections would fail one by one.
        let client = pool.get().await?;
        let found = schema::installed_version(&client)
            .await
            .map_err(StartError::SchemaCheck)?;
        if found < schema::SCHEMA_VERSION {
            return Err(StartError::SchemaBehind {
                found,
                needed: schema::SCHEMA_VERSION,
            });
        }
    }
    sync_queues(pool, config).await
}

impl StartError {
    /// The database could not be reached (as opposed to refusing what we sent).
    fn is_unreachable(&self) -> bool {
        match self {
            StartError::Db(DbError::Connect(e)) => e.as_db_error().is_none(),
            StartError::Db(DbError::ConnectTimeout(_)) | StartError::Pool(_) => true,
            StartError::Migrate(e) | StartError::SchemaCheck(e) | StartError::SyncQueues(e) => {
                e.as_db_error().is_none()
            }
            _ => false,
        }
    }
}

/// Creates or updates every configured queue and schedule in one transaction.
async fn sync_queues(pool: &Pool, config: &Config) -> Result<(), StartError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.map_err(StartError::SyncQueues)?;
    for (name, policy) in &config.queues {
        store::upsert_queue(&tx, name, policy)
            .await
            .map_err(StartError::SyncQueues)?;
    }
    for (name, s) in &config.schedules {
        let record = store::ScheduleRecord {
            name: name.clone(),
            cron: s.cron.clone(),
            timezone: s.timezone.clone(),
            queue: s.queue.clone(),
            data: s.data.clone(),
            priority: s.priority,
            max_attempts: s.max_attempts,
            enabled: true,
            next_run_at: None,
            last_run_at: None,
            last_job_id: None,
            last_error: None,
        };
        store::upsert_schedule(&tx, &record)
            .await
            .map_err(StartError::SyncQueues)?;
    }
    tx.commit().await.map_err(StartError::SyncQueues)
}

/// Opens connections up front, so the first claims after an idle start do
/// not pay for a TCP connect and authentication.
async fn warm_pool(pool: &Pool, n: usize) {
    let n = n.min(pool.status().max_size);
    let clients = futures::future::join_all((0..n).map(|_| pool.get())).await;
    drop(clients);
}

/// A started runtime.
pub struct Running {
    api_addr: Option<std::net::SocketAddr>,
    pool: Pool,
    wakeups: Wakeups,
    stats: BTreeMap<String, Arc<QueueStats>>,
    listener: Arc<ListenerStatus>,
    tasks: TaskTracker,
}

impl Running {
    /// Where the HTTP API listens, when it runs (useful with port 0).
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api_addr
    }

    /// The shared connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A queue worker's counters (None when this process runs no worker for it).
    pub fn stats(&self, queue: &str) -> Option<Arc<QueueStats>> {
        self.stats.get(queue).cloned()
    }

    /// A queue's wakeup line (None when this process runs no worker for it).
    pub fn wakeup(&self, queue: &str) -> Option<Arc<crate::wakeup::QueueWakeup>> {
        self.wakeups.get(queue).cloned()
    }

    pub fn listener(&self) -> &Arc<ListenerStatus> {
        &self.listener
    }

    /// True when the listener is connected and every queue worker sleeps
    /// armed: a job inserted now is notified.
    pub fn idle_and_listening(&self) -> bool {
        self.listener.is_connected() && self.stats.values().all(|s| s.waiting())
    }

    /// Waits until shutdown has completed: every task stopped, every outcome
    /// written (or handed to lease expiry if the database stayed away).
    pub async fn stopped(self) {
        self.tasks.wait().await;
    }
}
