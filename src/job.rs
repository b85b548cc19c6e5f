//! The job as handlers and API clients see it, and its state machine:
//!
//! ```text
//! created ─┐            ┌─► completed
//!          ├─► active ──┼─► retry ──► active …
//! retry ───┘            ├─► failed   (attempts exhausted; copy to dead letter)
//!                       └─► created/retry (released on shutdown, rescued)
//! created/retry ──► cancelled
//! ```

use chrono::{DateTime, Utc};
use postgres_types::{FromSql, ToSql};
use serde::Serialize;
use serde_json::Value;

/// Mirrors the Postgres enum `pgtasks.job_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSql, FromSql)]
#[postgres(name = "job_state")]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    #[postgres(name = "created")]
    Created,
    #[postgres(name = "retry")]
    Retry,
    #[postgres(name = "active")]
    Active,
    #[postgres(name = "completed")]
    Completed,
    #[postgres(name = "failed")]
    Failed,
    #[postgres(name = "cancelled")]
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Retry => "retry",
            JobState::Active => "active",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A claimed job, handed to a handler for one attempt.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub queue: String,
    pub data: Value,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
    /// NULL in the row means the queue's `retry_limit + 1`, resolved here.
    pub max_attempts: i32,
    pub priority: i32,
    pub created_at: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    /// When this attempt's lease ends; the handler is cancelled then.
    pub lease_until: DateTime<Utc>,
}

/// A job row as the API shows it. Ids are strings in JSON: opaque, and safe
/// for JavaScript clients whatever their size.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobRecord {
    #[serde(serialize_with = "id_as_string")]
    #[schema(value_type = String, example = "42")]
    pub id: i64,
    pub queue: String,
    #[schema(value_type = String, example = "completed")]
    pub state: JobState,
    pub priority: i32,
    #[schema(value_type = Object)]
    pub data: Value,
    pub attempt: i32,
    pub max_attempts: i32,
    pub singleton_key: Option<String>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub lease_until: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub last_error: Option<String>,
    /// `[{"attempt", "at", "error"}]`, oldest first.
    #[schema(value_type = Option<Vec<Object>>)]
    pub errors: Option<Value>,
    /// `{"percent", "message", "at"}` as last reported by the handler.
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Value>,
    /// For a dead letter: the id of the job that exhausted its attempts.
    #[serde(serialize_with = "optional_id_as_string")]
    #[schema(value_type = Option<String>)]
    pub dead_letter_of: Option<i64>,
}

impl JobState {
    /// Completed, failed or cancelled: nothing more will happen on its own.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

fn optional_id_as_string<S: serde::Serializer>(
    id: &Option<i64>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => serializer.collect_str(id),
        None => serializer.serialize_none(),
    }
}

fn id_as_string<S: serde::Serializer>(id: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(id)
}
