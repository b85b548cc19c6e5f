//! Configuration: compiled defaults < `config/default.toml` < an optional file
//! (`--config` or `PGTASKS_CONFIG`) < `PGTASKS_*` environment variables (nested
//! keys joined by `__`, e.g. `PGTASKS_WORKER__POLL_INTERVAL=5s`) < the seed's
//! `DATABASE_URL` and `PORT`.
//!
//! Every error names the key it is about. Durations are written like `250ms`,
//! `5s`, `15m`, `7d` (a bare number means seconds). A queue's handler table
//! (webhook, command, log) lives in [`handler`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub mod handler;

pub use handler::{CommandConfig, HandlerConfig, Secret, WebhookConfig};

/// The name of the queue the seed's `POST /api/jobs/readme` submits to.
pub const README_QUEUE: &str = "readme-queue";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: not found")]
    MissingFile { path: PathBuf },
    /// figment's message already names the key and the source of the value.
    #[error("config: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration of one pgtasks process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub worker: WorkerConfig,
    pub maintenance: MaintenanceConfig,
    pub api: ApiConfig,
    /// Queues by name, with their policies. Created or updated at startup.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Cron schedules by name. Created or updated at startup.
    pub schedules: BTreeMap<String, ScheduleConfig>,
}

/// A cron schedule: enqueue a job into `queue` at each time `cron` names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Five fields (`minute hour day month weekday`) or six with seconds first.
    #[serde(deserialize_with = "lenient::string")]
    pub cron: String,
    /// IANA zone the expression is read in. Default UTC.
    #[serde(default = "utc", deserialize_with = "lenient::string")]
    pub timezone: String,
    #[serde(deserialize_with = "lenient::string")]
    pub queue: String,
    /// The job's data. Default `{}`.
    #[serde(default = "empty_object")]
    pub data: serde_json::Value,
    #[serde(default)]
    pub priority: i32,
    pub max_attempts: Option<i32>,
}

fn utc() -> String {
    "UTC".to_string()
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: DatabaseConfig::default(),
            worker: WorkerConfig::default(),
            maintenance: MaintenanceConfig::default(),
            api: ApiConfig::default(),
            queues: BTreeMap::from([(
                README_QUEUE.to_string(),
                QueueConfig {
                    route: Some("readme".to_string()),
                    ..QueueConfig::default()
                },
            )]),
            schedules: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection URL (`DATABASE_URL` overrides). Default
    /// `postgres://postgres@127.0.0.1:5432/postgres`.
    #[serde(deserialize_with = "lenient::string")]
    pub url: String,
    /// A separate URL for the LISTEN and sleep connections (both need a
    /// session of their own), for deployments where `url` points at
    /// PgBouncer in transaction mode. Default: `url`.
    #[serde(deserialize_with = "lenient::optional_string")]
    pub listener_url: Option<String>,
    /// Pooled connections for claims, acks, submits and the API. Default 10.
    pub pool_size: usize,
    /// Time allowed to open a connection. Default 5s.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Apply `schema.sql` at startup (under an advisory lock). Default true.
    pub migrate: bool,
    /// How long startup waits for an unreachable database before giving up.
    /// Default 60s.
    #[serde(with = "duration")]
    pub startup_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".to_string(),
            listener_url: None,
            pool_size: 10,
            connect_timeout: Duration::from_secs(5),
            migrate: true,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Wake on NOTIFY through the listener. `false` polls only (for PgBouncer
    /// transaction pooling). Default true.
    pub listen: bool,
    /// The safety-net poll: each queue looks for due jobs at least this often.
    /// Default 2s (with `listen = false`, choose something smaller).
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// On shutdown, running jobs get this long to finish before they are
    /// cancelled and released back to their queue. Default 10s.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// How often the listener checks that its connection still answers.
    /// Default 15s.
    #[serde(with = "duration")]
    pub listener_check_interval: Duration,
    /// Longest wait between listener reconnect attempts. Default 5s.
    #[serde(with = "duration")]
    pub reconnect_max_delay: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            listen: true,
            poll_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            listener_check_interval: Duration::from_secs(15),
            reconnect_max_delay: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// How often the maintenance leader rescues jobs whose lease expired.
    /// Default 5s.
    #[serde(with = "duration")]
    pub rescue_interval: Duration,
    /// How often finished jobs past their queue's retention are deleted.
    /// Default 30s.
    #[serde(with = "duration")]
    pub clean_interval: Duration,
    /// How often due cron schedules are enqueued. Default 1s.
    #[serde(with = "duration")]
    pub schedule_interval: Duration,
    /// `VACUUM pgtasks.job` after this many jobs finished by this instance
    /// since its last one; 0 leaves the table to autovacuum. Default 20000.
    pub vacuum_after_jobs: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            rescue_interval: Duration::from_secs(5),
            clean_interval: Duration::from_secs(30),
            schedule_interval: Duration::from_secs(1),
            vacuum_after_jobs: 20_000,
        }
    }
}

impl MaintenanceConfig {
    pub fn intervals(&self) -> crate::maintenance::Intervals {
        crate::maintenance::Intervals {
            rescue: self.rescue_interval,
            clean: self.clean_interval,
            schedule: self.schedule_interval,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address to bind. Default `0.0.0.0`.
    #[serde(deserialize_with = "lenient::string")]
    pub host: String,
    /// Port (`PORT` overrides). Default 3001.
    pub port: u16,
    /// When set, every `/api/*` route requires `Authorization: Bearer <token>`.
    #[serde(deserialize_with = "lenient::optional_string")]
    pub token: Option<String>,
    /// Whether `/metrics` requires the token too (when one is set). Default false.
    pub metrics_require_token: bool,
    /// Largest accepted request body, in bytes. Default 1048576 (1 MiB).
    pub max_body_bytes: u64,
    /// Submit INSERTs in flight at once; more requests wait and are coalesced
    /// into the next multi-row INSERT. Default 2.
    pub submit_max_in_flight: usize,
    /// On shutdown, in-flight requests get this long to finish. Default 10s.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            host: "0.0.0.0".to_string(),
            port: 3001,
            token: None,
            metrics_require_token: false,
            max_body_bytes: 1024 * 1024,
            submit_max_in_flight: 2,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// pg-boss's queue policies; "per key" is per `singleton_key`, jobs without
/// one sharing a key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// No limit.
    #[default]
    Standard,
    /// At most one job queued per key.
    Short,
    /// At most one job running per key.
    Singleton,
    /// At most one job per key in each of queued, retrying and running.
    Stately,
    /// At most one job queued or running per key.
    Exclusive,
}

impl QueuePolicy {
    /// The name stored in `pgtasks.queue.policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueuePolicy::Standard => "standard",
            QueuePolicy::Short => "short",
            QueuePolicy::Singleton => "singleton",
            QueuePolicy::Stately => "stately",
            QueuePolicy::Exclusive => "exclusive",
        }
    }

    /// Claims take one job at a time (so a batch cannot take a key twice).
    pub fn one_active_per_key(self) -> bool {
        matches!(self, QueuePolicy::Singleton | QueuePolicy::Stately)
    }
}

/// A queue's policy. Stored in `pgtasks.queue` at startup, where every
/// instance (and SQL users) read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Jobs of this queue run at once in this process. Default 10.
    pub concurrency: usize,
    /// While the queue is saturated and its handlers are quick (5 ms or
    /// less on average), claims take up to this many jobs beyond the free
    /// slots, to start as slots free up. 0: strict priority order, at the
    /// price of a claim's round trip between batches. Default 100.
    pub claim_ahead: usize,
    /// Retries after the first attempt (max attempts = retry_limit + 1).
    /// Default 2.
    pub retry_limit: u32,
    /// Delay before the first retry. Default 1s.
    #[serde(with = "duration")]
    pub retry_delay: Duration,
    /// Double the delay on each further retry. Default true.
    pub retry_backoff: bool,
    /// Cap on the retry delay. Default 1h.
    #[serde(with = "duration")]
    pub retry_delay_max: Duration,
    /// How long one attempt may run before it is cancelled and counted as
    /// failed; also how long a crashed worker's job waits to be rescued.
    /// Default 15m.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// How long finished jobs are kept. Default 7d.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Queue that receives a copy of each job that exhausts its attempts.
    #[serde(deserialize_with = "lenient::optional_string")]
    pub dead_letter: Option<String>,
    /// Limits on the queue's jobs, enforced by the database (README "Queue
    /// policies"). Default standard (none).
    pub policy: QueuePolicy,
    /// The `<name>` in `POST /api/jobs/<name>`, as in the seed's routes.
    #[serde(deserialize_with = "lenient::optional_string")]
    pub route: Option<String>,
    /// What runs the queue's jobs in the `pgtasks` binary: a webhook, a
    /// command or the logger (`[queues.<name>.handler]`). Default none: the
    /// binary logs `readme-queue` jobs and runs no worker for other queues.
    pub handler: Option<HandlerConfig>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            concurrency: 10,
            claim_ahead: 100,
            retry_limit: 2,
            retry_delay: Duration::from_secs(1),
            retry_backoff: true,
            retry_delay_max: Duration::from_secs(3600),
            lease: Duration::from_secs(15 * 60),
            retention: Duration::from_secs(7 * 24 * 3600),
            dead_letter: None,
            policy: QueuePolicy::Standard,
            route: None,
            handler: None,
        }
    }
}

/// Where to look for configuration besides the environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The project's default file; skipped when absent. Usually
    /// `config/default.toml`.
    pub default_file: Option<PathBuf>,
    /// An extra file that must exist (`--config` / `PGTASKS_CONFIG`).
    pub file: Option<PathBuf>,
}

impl Config {
    /// Loads the layered configuration from files and the process environment.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment(sources)?)
    }

    /// The layered figment, before extraction; tests add their own layers.
    pub fn figment(sources: &Sources) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = sources.default_file.as_deref().filter(|p| p.exists()) {
            figment = figment.merge(Toml::file_exact(path));
        }
        if let Some(path) = &sources.file {
            if !Path::new(path).exists() {
                return Err(ConfigError::MissingFile { path: path.clone() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Ok(figment
            // PGTASKS_CONFIG names the file; the test suite's and the bench's
            // server URLs share the prefix but configure those programs.
            .merge(Env::prefixed("PGTASKS_").split("__").ignore(&[
                "config",
                "test_admin_url",
                "bench_admin_url",
            ]))
            .merge(
                Env::raw()
                    .only(&["database_url"])
                    .map(|_| "database.url".into()),
            )
            .merge(Env::raw().only(&["port"]).map(|_| "api.port".into())))
    }

    /// Extracts and validates.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: names, ranges and cross-references.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database.pool_size < 2 {
            return Err(ConfigError::invalid(
                "database.pool_size",
                "must be at least 2",
            ));
        }
        if self.worker.poll_interval.is_zero() {
            return Err(ConfigError::invalid(
                "worker.poll_interval",
                "must be greater than zero",
            ));
        }
        if self.api.token.as_deref() == Some("") {
            return Err(ConfigError::invalid(
                "api.token",
                "must not be empty (leave it unset to disable authentication)",
            ));
        }
        if self.api.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "api.max_body_bytes",
                "must be greater than zero",
            ));
        }
        if self.api.submit_max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "api.submit_max_in_flight",
                "must be at least 1",
            ));
        }
        for (name, schedule) in &self.schedules {
            let key = |field: &str| format!("schedules.{name}.{field}");
            if let Err(reason) =
                crate::schedule::CronSchedule::parse(&schedule.cron, &schedule.timezone)
            {
                let field = if reason.contains("time zone") {
                    "timezone"
                } else {
                    "cron"
                };
                return Err(ConfigError::invalid(key(field), reason));
            }
            if !self.queues.contains_key(&schedule.queue) {
                return Err(ConfigError::invalid(
                    key("queue"),
                    format!("names queue `{}`, which is not configured", schedule.queue),
                ));
            }
            if !schedule.data.is_object() {
                return Err(ConfigError::invalid(
                    key("data"),
                    "must be a table (a JSON object)",
                ));
            }
        }
        let mut routes = BTreeMap::new();
        for (name, queue) in &self.queues {
            let key = |field: &str| format!("queues.{name}.{field}");
            if let Err(reason) = validate_queue_name(name) {
                return Err(ConfigError::invalid(format!("queues.{name}"), reason));
            }
            if queue.concurrency == 0 {
                return Err(ConfigError::invalid(
                    key("concurrency"),
                    "must be at least 1",
                ));
            }
            if queue.lease.is_zero() {
                return Err(ConfigError::invalid(
                    key("lease"),
                    "must be greater than zero",
                ));
            }
            if queue.retry_delay_max < queue.retry_delay {
                return Err(ConfigError::invalid(
                    key("retry_delay_max"),
                    "must not be less than retry_delay",
                ));
            }
            if let Some(dead_letter) = &queue.dead_letter {
                if dead_letter == name {
                    return Err(ConfigError::invalid(
                        key("dead_letter"),
                        "a queue cannot be its own dead-letter queue",
                    ));
                }
                if !self.queues.contains_key(dead_letter) {
                    return Err(ConfigError::invalid(
                        key("dead_letter"),
                        format!("names queue `{dead_letter}`, which is not configured"),
                    ));
                }
            }
            if let Some(route) = &queue.route {
                if route.is_empty() || !route.bytes().all(is_name_byte) {
                    return Err(ConfigError::invalid(
                        key("route"),
                        "must be non-empty and use only A-Z a-z 0-9 _ . -",
                    ));
                }
                if let Some(other) = routes.insert(route.clone(), name.clone()) {
                    return Err(ConfigError::invalid(
                        key("route"),
                        format!("`{route}` is already the route of queue `{other}`"),
                    ));
                }
            }
            if let Some(handler) = &queue.handler {
                handler.validate().map_err(|invalid| {
                    ConfigError::invalid(key(&format!("handler.{}", invalid.field)), invalid.reason)
                })?;
            }
        }
        Ok(())
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// The rule `pgtasks.queue` enforces: `[A-Za-z0-9_.-]{1,48}`, so that the
/// channel `pgtasks.<name>` fits in Postgres's 63-byte identifier limit.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 48 {
        return Err(format!(
            "queue name `{name}` must be 1 to 48 characters long"
        ));
    }
    if !name.bytes().all(is_name_byte) {
        return Err(format!(
            "queue name `{name}` may use only A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(())
}

/// Parses `250ms`, `30s`, `5m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("`{text}` is not a duration"));
    }
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration ({e})"))
}

/// Durations as humantime strings (`250ms`, `5s`, `7d`) or a number of seconds.
pub mod duration {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Fractional(f64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(s) => Ok(Duration::from_secs(s)),
            Raw::Fractional(s) if s >= 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            Raw::Fractional(s) => Err(de::Error::custom(format!("{s} is not a valid duration"))),
            Raw::Text(text) => humantime::parse_duration(text.trim()).map_err(|e| {
                de::Error::custom(format!(
                    "`{text}` is not a duration ({e}); write e.g. 250ms, 5s, 15m, 7d"
                ))
            }),
        }
    }
}

/// Optional durations, written as [`duration`]s; absent means `None`.
pub mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::duration::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::duration")] Duration);
        Option::<Wrapped>::deserialize(deserializer).map(|v| v.map(|Wrapped(d)| d))
    }
}

/// Strings that may arrive as numbers or booleans: the env provider parses
/// `PGTASKS_QUEUES__A__ROUTE=2024` as an integer, which a plain `String`
/// field would refuse.
mod lenient {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Uint(u64),
        Float(f64),
        Bool(bool),
    }

    impl Scalar {
        fn into_string(self) -> String {
            match self {
                Scalar::Text(s) => s,
                Scalar::Int(n) => n.to_string(),
                Scalar::Uint(n) => n.to_string(),
                Scalar::Float(n) => n.to_string(),
                Scalar::Bool(b) => b.to_string(),
            }
        }
    }

    pub fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
        Scalar::deserialize(deserializer).map(Scalar::into_string)
    }

    pub fn optional_string<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<String>, D::Error> {
        Option::<Scalar>::deserialize(deserializer).map(|v| v.map(Scalar::into_string))
    }

    pub fn optional_string_list<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<String>>, D::Error> {
        Option::<Vec<Scalar>>::deserialize(deserializer)
            .map(|v| v.map(|v| v.into_iter().map(Scalar::into_string).collect()))
    }

    pub fn optional_string_map<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<BTreeMap<String, String>>, D::Error> {
        Option::<BTreeMap<String, Scalar>>::deserialize(deserializer)
            .map(|m| m.map(|m| m.into_iter().map(|(k, v)| (k, v.into_string())).collect()))
    }
}
