//! A client for Rust services that submit and manage jobs without running
//! workers: the operations of the HTTP API and the `pgtasks.*` SQL functions,
//! over a connection pool. Queue policies, singleton keys and throttles are
//! decided by the database, so any number of clients and instances agree.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pgtasks::client::Client;
//! use pgtasks::store::NewJob;
//! use serde_json::json;
//!
//! let client = Client::connect("postgres://postgres@127.0.0.1:5432/postgres")?;
//! let id = client.send("emails", json!({"to": "a@example.com"})).await?;
//! let sent = client
//!     .send_job(&NewJob::new("emails", json!({"to": "b@example.com"}))
//!         .singleton_key("user-42")
//!         .delay(std::time::Duration::from_secs(30)))
//!     .await?;
//! assert!(!sent.duplicate || sent.id != id);
//! client.cancel(sent.id).await?;
//! # Ok(()) }
//! ```

use deadpool_postgres::Pool;
use serde_json::Value;

use crate::config::DatabaseConfig;
use crate::db::{self, DbError};
use crate::job::JobRecord;
pub use crate::store::Sent;
use crate::store::{self, NewJob, ScheduleRecord, Transition};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Refused by the database (unknown queue, bad row, policy conflict on a
    /// plain batch insert: see the SQL state) or a lost connection.
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

impl ClientError {
    /// The SQL state, when the database refused the call.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            ClientError::Db(e) => e.code(),
            ClientError::Pool(_) => None,
        }
    }
}

/// The database's own message (the driver's Display says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// Submits and manages jobs. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Client {
    pool: Pool,
}

impl Client {
    /// Over an existing pool (a runtime's `Running::pool()`, say).
    pub fn new(pool: Pool) -> Client {
        Client { pool }
    }

    /// A pool of its own with the default settings (10 connections).
    pub fn connect(url: &str) -> Result<Client, DbError> {
        let config = DatabaseConfig {
            url: url.to_string(),
            ..DatabaseConfig::default()
        };
        Ok(Client::new(db::create_pool(&config)?))
    }

    /// Submits one job with default options; returns its id.
    pub async fn send(&self, queue: &str, data: Value) -> Result<i64, ClientError> {
        Ok(self.send_job(&NewJob::new(queue, data)).await?.id)
    }

    /// Submits one job with options (`pgtasks.send`).
    pub async fn send_job(&self, job: &NewJob) -> Result<Sent, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::send_job(&client, job).await?)
    }

    /// Submits many jobs in one statement (one notification per queue);
    /// ids in input order. All or none: a refused row fails the batch.
    pub async fn send_batch(&self, jobs: &[NewJob]) -> Result<Vec<i64>, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::insert_jobs(&client, jobs).await?)
    }

    /// A job as `GET /api/jobs/{id}` shows it.
    pub async fn job(&self, id: i64) -> Result<Option<JobRecord>, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::get_job(&client, id).await?)
    }

    /// Cancels a waiting or running job (a running handler's token fires).
    pub async fn cancel(&self, id: i64) -> Result<Transition, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::cancel_job(&client, id).await?)
    }

    /// Makes a cancelled job wait again.
    pub async fn resume(&self, id: i64) -> Result<Transition, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::resume_job(&client, id).await?)
    }

    /// Gives a failed job another attempt.
    pub async fn retry(&self, id: i64) -> Result<Transition, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::retry_job(&client, id).await?)
    }

    /// Pauses a queue on every instance; false when there is no such queue.
    pub async fn pause_queue(&self, queue: &str) -> Result<bool, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::set_queue_paused(&client, queue, true).await?)
    }

    /// Resumes a paused queue and wakes its workers.
    pub async fn resume_queue(&self, queue: &str) -> Result<bool, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::set_queue_paused(&client, queue, false).await?)
    }

    /// Moves up to `max` waiting dead letters back to their queues.
    pub async fn redrive(&self, dead_letter_queue: &str, max: i32) -> Result<i32, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::redrive(&client, dead_letter_queue, max).await?)
    }

    /// Creates or replaces a cron schedule.
    pub async fn schedule(&self, schedule: &ScheduleRecord) -> Result<ScheduleRecord, ClientError> {
        let client = self.pool.get().await?;
        Ok(store::upsert_schedule(&client, schedule).await?)
    }
}
