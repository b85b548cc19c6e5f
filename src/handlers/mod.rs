//! Handlers that ship with the binary, and building a queue's handler from
//! its `[queues.<name>.handler]` config:
//!
//! - [`readme`] logs each job (`kind = "log"`, the seed's `readme-queue`);
//! - [`webhook`] POSTs each job as JSON to a URL (`kind = "webhook"`);
//! - [`command`] runs a program with the job as JSON on stdin (`kind = "command"`).
//!
//! Webhook and command receive the same document, [`job_document`]. What
//! they read back (a response body, stdout) is kept up to [`OUTPUT_LIMIT`].

pub mod command;
pub mod readme;
pub mod webhook;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use crate::config::{Config, HandlerConfig, README_QUEUE};
use crate::handler::{Handler, HandlerResult, JobContext};
use crate::job::Job;

pub use command::Command;
pub use webhook::Webhook;

/// The most of a webhook's response body or a command's stdout that is
/// read; the rest is discarded (and a command's stored text output marked
/// as cut).
pub const OUTPUT_LIMIT: usize = 1024 * 1024;

/// The longest excerpt of a response body or of stderr kept in an error.
pub const ERROR_EXCERPT: usize = 1024;

/// A configured handler could not be built.
#[derive(Debug, thiserror::Error)]
#[error("config key `queues.{queue}.handler`: {reason}")]
pub struct SetupError {
    pub queue: String,
    pub reason: String,
}

/// A handler built from config.
pub enum Configured {
    Webhook(Webhook),
    Command(Command),
    /// The readme logger.
    Log,
}

impl Handler for Configured {
    fn handle(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, HandlerResult> {
        match self {
            Configured::Webhook(webhook) => webhook.handle(job, ctx),
            Configured::Command(command) => command.handle(job, ctx),
            Configured::Log => Box::pin(readme::handle(job, ctx)),
        }
    }
}

/// Builds `queue`'s handler from its (validated) config.
pub fn from_config(queue: &str, config: &HandlerConfig) -> Result<Configured, SetupError> {
    let setup_error = |reason: String| SetupError {
        queue: queue.to_string(),
        reason,
    };
    Ok(match config {
        HandlerConfig::Webhook(webhook) => {
            Configured::Webhook(Webhook::new(webhook).map_err(setup_error)?)
        }
        HandlerConfig::Command(command) => Configured::Command(Command::new(command)),
        HandlerConfig::Log => Configured::Log,
    })
}

/// What the `pgtasks` binary runs: the configured handler of every queue
/// that declares one, and the logger for `readme-queue` when it declares none.
pub fn configured(config: &Config) -> Result<Vec<(String, Configured)>, SetupError> {
    let mut handlers = Vec::new();
    for (queue, policy) in &config.queues {
        match &policy.handler {
            Some(handler) => handlers.push((queue.clone(), from_config(queue, handler)?)),
            None if queue == README_QUEUE => handlers.push((queue.clone(), Configured::Log)),
            None => {}
        }
    }
    Ok(handlers)
}

/// The JSON a webhook receives as its body and a command on its stdin:
/// `{"id", "queue", "data", "attempt", "max_attempts", "created_at"}`.
pub fn job_document(job: &Job) -> Value {
    json!({
        "id": job.id,
        "queue": job.queue,
        "data": job.data,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "created_at": job.created_at,
    })
}

/// `bytes` as text for an error message: lossy UTF-8, trimmed, at most
/// [`ERROR_EXCERPT`] bytes from the start (`from_end`: from the end).
pub(crate) fn excerpt(bytes: &[u8], from_end: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= ERROR_EXCERPT {
        return text.to_string();
    }
    if from_end {
        let mut start = text.len() - ERROR_EXCERPT;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("…{}", &text[start..])
    } else {
        let mut end = ERROR_EXCERPT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::excerpt;

    #[test]
    fn excerpts_are_trimmed_and_cut_on_char_boundaries() {
        assert_eq!(excerpt(b"  short \n", false), "short");
        let long = "é".repeat(2000);
        let head = excerpt(long.as_bytes(), false);
        let tail = excerpt(long.as_bytes(), true);
        assert!(head.ends_with('…') && head.len() <= super::ERROR_EXCERPT + 3);
        assert!(tail.starts_with('…') && tail.len() <= super::ERROR_EXCERPT + 3);
    }
}
