//! pgtasks: a PostgreSQL job queue service.
//!
//! Jobs are rows in `pgtasks.job`. Other services submit them over HTTP or
//! with a plain SQL `INSERT`; an insert trigger sends a `NOTIFY` (one per
//! queue per transaction) only while a worker sleeps on the queue; one
//! dedicated listener connection turns notifications into
//! per-queue wakeups; each queue's worker claims due jobs with
//! `FOR UPDATE SKIP LOCKED` and runs them under a lease; the completer writes
//! outcomes in batches; maintenance rescues jobs whose worker died.
//!
//! The flow of one job:
//!
//! ```text
//! INSERT ─► trigger ─► pg_notify('pgtasks.<queue>') ─► listener ─► wakeup(queue)
//!        ─► worker claims (UPDATE … SKIP LOCKED) ─► handler ─► completer (batched ack)
//! ```
//!
//! Nothing depends on the notification arriving: a slow poll, a timer for
//! the next future `run_at`, and a reconnecting listener that wakes every
//! queue make a lost notification cost latency, never a job.

pub mod api;
pub mod client;
pub mod config;
pub mod db;
pub mod handler;
pub mod handlers;
pub mod job;
pub mod listener;
pub mod maintenance;
pub mod metrics;
pub mod runtime;
pub mod schedule;
pub mod schema;
pub mod shutdown;
pub mod store;
pub mod submit;
pub mod wakeup;
pub mod worker;

pub use client::Client;
pub use config::Config;
pub use handler::{BoxError, Handler, HandlerResult, JobContext, JobError, Retry};
pub use job::{Job, JobState};
pub use runtime::{Running, Runtime};
