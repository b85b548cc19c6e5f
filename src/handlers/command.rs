//! The command handler: runs a program per job, without a shell.
//!
//! The program gets the [`job_document`] on stdin and `PGTASKS_JOB_ID`,
//! `PGTASKS_QUEUE` and `PGTASKS_ATTEMPT` added to the environment it inherits
//! (plus the configured `env`). It runs in a process group of its own; that
//! group is the unit of cleanup:
//!
//! - exit 0: completed. Stdout that parses as JSON is the job's output;
//!   other non-empty stdout is stored as a JSON string (at most
//!   [`OUTPUT_LIMIT`] bytes, marked when cut);
//! - any other exit: a failed attempt (queue's retry policy) whose message
//!   holds the exit code or signal and the tail of stderr;
//! - timeout, lease expiry, shutdown: the group gets SIGTERM, then SIGKILL
//!   after [`KILL_GRACE`]; the attempt fails (timeout, lease) or is released
//!   (shutdown);
//! - when the program exits, whatever it left running in its group is
//!   killed, and so is the whole group if the attempt is dropped.
//!
//! Stdout, stderr and stdin are serviced concurrently, so a program that
//! writes a lot or never reads its input cannot block on a full pipe; only
//! the first [`OUTPUT_LIMIT`] bytes of stdout and the last [`ERROR_EXCERPT`]
//! bytes of stderr are kept.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::{excerpt, job_document, ERROR_EXCERPT, OUTPUT_LIMIT};
use crate::config::CommandConfig;
use crate::handler::{Handler, HandlerResult, JobContext, JobError};
use crate::job::Job;

/// Time between SIGTERM and SIGKILL when a run is stopped. Shorter than the
/// second a cancelled handler gets, so the outcome is still reported.
pub const KILL_GRACE: Duration = Duration::from_millis(500);

/// After SIGKILL, how long to wait for the pipes to close. A process that
/// left the group (`setsid`) may hold them open forever.
const PIPE_GRACE: Duration = Duration::from_millis(200);

/// Runs one program per job. Cheap to clone.
#[derive(Clone)]
pub struct Command {
    config: Arc<CommandConfig>,
}

/// Why a run was stopped before the program exited.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Timeout(Duration),
    Cancelled,
}

/// What a run collected.
struct Finished {
    status: std::io::Result<ExitStatus>,
    stdout: Captured,
    stderr: Captured,
}

/// Bytes kept from a pipe, and how many it carried in all.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    total: usize,
}

impl Command {
    pub fn new(config: &CommandConfig) -> Command {
        Command {
            config: Arc::new(config.clone()),
        }
    }

    fn program(&self) -> PathBuf {
        let program = PathBuf::from(&self.config.program);
        match &self.config.working_dir {
            // Resolved here rather than by the OS, which may look a
            // relative path up before or after changing directory.
            Some(dir) if self.config.program.contains('/') && program.is_relative() => {
                dir.join(program)
            }
            _ => program,
        }
    }

    /// Runs one attempt: start the program, feed it the job, wait for it to
    /// exit (or the timeout, or cancellation), map the result to an outcome.
    pub async fn call(&self, job: Job, ctx: JobContext) -> HandlerResult {
        let config = &*self.config;
        let input = serde_json::to_vec(&job_document(&job))?;
        let mut command = tokio::process::Command::new(self.program());
        command
            .args(&config.args)
            .envs(&config.env)
            .env("PGTASKS_JOB_ID", job.id.to_string())
            .env("PGTASKS_QUEUE", &job.queue)
            .env("PGTASKS_ATTEMPT", job.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &config.working_dir {
            command.current_dir(dir);
        }
        let mut child = command
            .spawn()
            .map_err(|e| JobError::new(format!("could not start `{}`: {e}", config.program)))?;
        let group = ProcessGroup::new(child.id());
        debug!(job_id = job.id, pid = child.id(), program = %config.program, "command started");

        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let feed = async {
            if let Some(mut stdin) = stdin {
                // A program that does not read its input is not an error.
                let _ = stdin.write_all(&input).await;
            }
        };
        let exited = async {
            let status = child.wait().await;
            group.kill_leftovers();
            status
        };
        let mut run = pin!(async {
            let (status, (), stdout, stderr) = tokio::join!(
                exited,
                feed,
                read_head(stdout, OUTPUT_LIMIT),
                read_tail(stderr, ERROR_EXCERPT)
            );
            Finished {
                status,
                stdout,
                stderr,
            }
        });

        let timeout = async {
            match config.timeout {
                Some(limit) => {
                    tokio::time::sleep(limit).await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        // Cancel safety: `run` is polled again below; the other arms are
        // plain timers.
        let stop = tokio::select! {
            finished = &mut run => return self.outcome(&job, finished),
            limit = timeout => Stop::Timeout(limit),
            _ = ctx.cancelled().cancelled() => Stop::Cancelled,
        };

        group.signal(libc::SIGTERM);
        let finished = match tokio::time::timeout(KILL_GRACE, &mut run).await {
            Ok(finished) => Some(finished),
            Err(_) => {
                group.signal(libc::SIGKILL);
                tokio::time::timeout(PIPE_GRACE, &mut run).await.ok()
            }
        };
        debug!(job_id = job.id, reason = ?stop, "command stopped; process group killed");
        let mut message = match stop {
            Stop::Timeout(limit) => format!(
                "`{}` timed out after {limit:?}; its process group was killed",
                config.program
            ),
            Stop::Cancelled => format!(
                "`{}` was cancelled (lease expired or shutdown); its process group was killed",
                config.program
            ),
        };
        if let Some(stderr) = finished.map(|f| excerpt(&f.stderr.kept, true)) {
            if !stderr.is_empty() {
                message.push_str("; stderr: ");
                message.push_str(&stderr);
            }
        }
        Err(JobError::new(message).into())
    }

    fn outcome(&self, job: &Job, finished: Finished) -> HandlerResult {
        let program = &self.config.program;
        let status = finished
            .status
            .map_err(|e| JobError::new(format!("waiting for `{program}`: {e}")))?;
        debug!(job_id = job.id, status = %status, "command exited");
        if status.success() {
            return Ok(output_of(finished.stdout));
        }
        let mut message = match (status.code(), status.signal()) {
            (Some(code), _) => format!("`{program}` exited with code {code}"),
            (None, Some(signal)) => format!("`{program}` was killed by signal {signal}"),
            (None, None) => format!("`{program}` failed: {status}"),
        };
        let stderr = excerpt(&finished.stderr.kept, true);
        if !stderr.is_empty() {
            message.push_str("; stderr: ");
            message.push_str(&stderr);
        }
        Err(JobError::new(message).into())
    }
}

impl Handler for Command {
    fn handle(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, HandlerResult> {
        let this = self.clone();
        Box::pin(async move { this.call(job, ctx).await })
    }
}

/// Stdout as the job's output: JSON when it parses, else text.
fn output_of(stdout: Captured) -> Option<Value> {
    let cut = stdout.total > stdout.kept.len();
    if !cut {
        if let Ok(value) = serde_json::from_slice::<Value>(&stdout.kept) {
            return Some(value);
        }
    }
    let text = String::from_utf8_lossy(&stdout.kept);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut text = text.to_string();
    if cut {
        text.push_str(&format!(
            "… [output cut: {} of {} bytes kept]",
            stdout.kept.len(),
            stdout.total
        ));
    }
    Some(Value::String(text))
}

/// Reads the pipe to its end, keeping the first `limit` bytes.
async fn read_head(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut buf = vec![0u8; 16 * 1024];
    // A read error ends the output like EOF does.
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        captured.total += n;
        let room = limit.saturating_sub(captured.kept.len());
        captured.kept.extend_from_slice(&buf[..n.min(room)]);
    }
    captured
}

/// Reads the pipe to its end, keeping the last `limit` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        captured.total += n;
        captured.kept.extend_from_slice(&buf[..n]);
        if captured.kept.len() > limit {
            let excess = captured.kept.len() - limit;
            captured.kept.drain(..excess);
        }
    }
    captured
}

/// The process group of a started program (its id is the program's pid).
/// Dropping it kills the group unless the program exited and its leftovers
/// were already killed.
struct ProcessGroup {
    id: Option<libc::pid_t>,
    done: AtomicBool,
}

impl ProcessGroup {
    fn new(pid: Option<u32>) -> Self {
        ProcessGroup {
            id: pid.and_then(|p| libc::pid_t::try_from(p).ok()),
            done: AtomicBool::new(false),
        }
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(id) = self.id {
            // SAFETY: killpg has no memory effects; at worst it fails with
            // ESRCH once the group is empty, which is fine.
            unsafe {
                libc::killpg(id, signal);
            }
        }
    }

    /// Right after the program exited: nothing it started outlives it.
    fn kill_leftovers(&self) {
        self.signal(libc::SIGKILL);
        self.done.store(true, Ordering::Relaxed);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Relaxed) {
            self.signal(libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captured(bytes: &[u8], total: usize) -> Captured {
        Captured {
            kept: bytes.to_vec(),
            total,
        }
    }

    #[test]
    fn stdout_is_json_when_it_parses_and_text_otherwise() {
        assert_eq!(
            output_of(captured(b" {\"a\": 1}\n", 10)),
            Some(serde_json::json!({"a": 1}))
        );
        assert_eq!(
            output_of(captured(b"done\n", 5)),
            Some(Value::String("done".into()))
        );
        assert_eq!(output_of(captured(b"\n", 1)), None);
        let cut = output_of(captured(b"{\"a\":", 100)).unwrap();
        assert!(cut.as_str().unwrap().contains("output cut: 5 of 100"));
    }
}
