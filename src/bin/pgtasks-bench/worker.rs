//! The worker side of the benchmarks, in a process of its own as in the
//! peers' method: the harness spawns `pgtasks-bench worker …` (this same
//! binary), which runs a pgtasks [`Runtime`] and reports over stdout, one
//! line per event:
//!
//! ```text
//! ready [api=127.0.0.1:PORT]     the runtime started (and its API listens)
//! job <id> <wall µs>             a handler started (--report jobs)
//! handled <count>                handlers started so far, every 5 ms (--report count)
//! stopped                        shutdown complete
//! ```
//!
//! The worker stops when its stdin closes (the harness closes it, or died).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use pgtasks::config::Config;
use pgtasks::{HandlerResult, Job, JobContext, Runtime};

use crate::report::wall_us;

/// What the worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportMode {
    /// One line per job: its id and the wall clock at handler start.
    Jobs,
    /// A running count of handled jobs (drain).
    Count,
}

/// `pgtasks-bench worker`: internal, spawned by the harness.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Database URL (already migrated).
    #[arg(long)]
    pub url: String,
    /// Queues to work (repeat the flag).
    #[arg(long = "queue", required = true)]
    pub queues: Vec<String>,
    /// `concurrency` of every queue.
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Also serve the HTTP API on 127.0.0.1, on an ephemeral port.
    #[arg(long)]
    pub api: bool,
    #[arg(long, value_enum, default_value = "jobs")]
    pub report: ReportMode,
    /// Delete completed jobs (`retention = 0`) instead of keeping them for
    /// the default retention.
    #[arg(long)]
    pub discard_completed: bool,
}

impl WorkerArgs {
    /// The worker's config: `Config::default()` with the scratch database, no
    /// migration (the harness migrated), and `concurrency` on every queue.
    /// Everything else stays at its default: pool 10, LISTEN on, poll 2 s,
    /// completed jobs kept 7 days (unless `discard_completed`).
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.database.url = self.url.clone();
        config.database.migrate = false;
        config.api.host = "127.0.0.1".to_string();
        config.api.port = 0;
        for queue in &self.queues {
            let policy = config.queues.entry(queue.clone()).or_default();
            policy.concurrency = self.concurrency;
            if self.discard_completed {
                policy.retention = Duration::ZERO;
            }
        }
        config
    }
}

enum Out {
    Line(String),
    Job(i64, i64),
}

/// Runs the worker process until its stdin closes.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let (out, out_rx) = std_mpsc::channel::<Out>();
    let handled = Arc::new(AtomicU64::new(0));
    let writer = {
        let handled = (args.report == ReportMode::Count).then(|| handled.clone());
        std::thread::spawn(move || write_stdout(out_rx, handled))
    };
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            shutdown.cancel();
        });
    }

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let config = args.config();
        let mut pgtasks = Runtime::new(config.clone()).api(args.api);
        for queue in &args.queues {
            let policy = config.queues.get(queue).cloned().unwrap_or_default();
            pgtasks = match args.report {
                ReportMode::Jobs => pgtasks.queue(queue, policy, recording_handler(out.clone())),
                ReportMode::Count => pgtasks.queue(queue, policy, counting_handler(&handled)),
            };
        }
        let running = pgtasks.start(shutdown.clone()).await?;
        let ready = match running.api_addr() {
            Some(addr) => format!("ready api={addr}"),
            None => "ready".to_string(),
        };
        let _ = out.send(Out::Line(ready));
        let stats: Vec<_> = args
            .queues
            .iter()
            .filter_map(|q| running.stats(q).map(|s| (q.clone(), s)))
            .collect();
        running.stopped().await;
        for (queue, stats) in stats {
            // Claim sizes explain drain figures; stderr is the harness's log.
            eprintln!(
                "worker {queue}: {} claims took {} jobs",
                stats.claims(),
                stats.claimed()
            );
        }
        anyhow::Ok(())
    });
    let _ = out.send(Out::Line("stopped".to_string()));
    drop(out);
    let _ = writer.join();
    result
}

fn recording_handler(
    out: std_mpsc::Sender<Out>,
) -> impl Fn(Job, JobContext) -> std::future::Ready<HandlerResult> + Send + Sync + 'static {
    move |job: Job, _ctx| {
        let _ = out.send(Out::Job(job.id, wall_us()));
        std::future::ready(Ok(None))
    }
}

fn counting_handler(
    handled: &Arc<AtomicU64>,
) -> impl Fn(Job, JobContext) -> std::future::Ready<HandlerResult> + Send + Sync + 'static {
    let handled = handled.clone();
    move |_job: Job, _ctx| {
        handled.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(None))
    }
}

/// How often the handled count is written when it changed: a drain of
/// 20,000 jobs takes a third of a second, and at 50 ms its end was known
/// only to a seventh.
const REPORT_EVERY: Duration = Duration::from_millis(5);

/// Owns stdout: writes lines as they come, flushing when idle, and the
/// handled count every [`REPORT_EVERY`] when it changed.
fn write_stdout(rx: std_mpsc::Receiver<Out>, handled: Option<Arc<AtomicU64>>) {
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut last_count = 0;
    loop {
        let message = rx.recv_timeout(REPORT_EVERY);
        let disconnected = matches!(message, Err(std_mpsc::RecvTimeoutError::Disconnected));
        let mut next = message.ok();
        while let Some(message) = next {
            let _ = match message {
                Out::Line(line) => writeln!(stdout, "{line}"),
                Out::Job(id, at) => writeln!(stdout, "job {id} {at}"),
            };
            next = rx.try_recv().ok();
        }
        if let Some(handled) = &handled {
            let count = handled.load(Ordering::Relaxed);
            if count != last_count || disconnected {
                let _ = writeln!(stdout, "handled {count}");
                last_count = count;
            }
        }
        if stdout.flush().is_err() || disconnected {
            return;
        }
    }
}

/// An event reported by a worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ready { api: Option<SocketAddr> },
    Job { id: i64, at_us: i64 },
    Handled(u64),
    Stopped,
    Other(String),
}

impl Event {
    pub fn parse(line: &str) -> Event {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ready"), api, None) => Event::Ready {
                api: api
                    .and_then(|a| a.strip_prefix("api="))
                    .and_then(|a| a.parse().ok()),
            },
            (Some("job"), Some(id), Some(at)) => match (id.parse(), at.parse()) {
                (Ok(id), Ok(at_us)) => Event::Job { id, at_us },
                _ => Event::Other(line.to_string()),
            },
            (Some("handled"), Some(n), None) => n
                .parse()
                .map_or_else(|_| Event::Other(line.to_string()), Event::Handled),
            (Some("stopped"), None, None) => Event::Stopped,
            _ => Event::Other(line.to_string()),
        }
    }
}

/// The harness's handle on a running worker process. Killed when dropped
/// (error paths); [`WorkerProcess::stop`] stops it cleanly.
pub struct WorkerProcess {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pub api_addr: Option<SocketAddr>,
}

impl WorkerProcess {
    /// Spawns `pgtasks-bench worker` and waits until it reports `ready`.
    /// Returns the events that follow.
    pub async fn start(
        args: &WorkerArgs,
    ) -> anyhow::Result<(WorkerProcess, mpsc::UnboundedReceiver<Event>)> {
        let exe = std::env::current_exe().context("locating pgtasks-bench")?;
        let mut command = Command::new(exe);
        command
            .arg("worker")
            .arg("--url")
            .arg(&args.url)
            .arg("--concurrency")
            .arg(args.concurrency.to_string())
            .arg("--report")
            .arg(match args.report {
                ReportMode::Jobs => "jobs",
                ReportMode::Count => "count",
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for queue in &args.queues {
            command.arg("--queue").arg(queue);
        }
        if args.api {
            command.arg("--api");
        }
        if args.discard_completed {
            command.arg("--discard-completed");
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command.spawn().context("spawning the worker process")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, mut events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::parse(&line)).is_err() {
                    break;
                }
            }
        });
        let mut worker = WorkerProcess {
            child: Some(child),
            stdin,
            api_addr: None,
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(event) = events.recv().await {
                if let Event::Ready { api } = event {
                    return Some(api);
                }
            }
            None
        })
        .await;
        match ready {
            Ok(Some(api)) => worker.api_addr = api,
            Ok(None) => bail!("the worker process exited before it was ready (see its log above)"),
            Err(_) => bail!("the worker process was not ready within 60 s"),
        }
        if args.api && worker.api_addr.is_none() {
            bail!("the worker process did not report its API address");
        }
        Ok((worker, events))
    }

    /// Closes the worker's stdin and waits for it to exit (killed after 30 s).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => return Ok(status),
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => {
                        let _ = child.kill();
                        return child.wait();
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .context("waiting for the worker process")??;
        if !status.success() {
            bail!("the worker process exited with {status}");
        }
        Ok(())
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Collects `job` events into id → handler start (wall µs) until the
/// channel closes, publishing the count as it grows.
pub async fn collect_jobs(
    mut events: mpsc::UnboundedReceiver<Event>,
    count: tokio::sync::watch::Sender<usize>,
) -> HashMap<i64, i64> {
    let mut started = HashMap::new();
    while let Some(event) = events.recv().await {
        if let Event::Job { id, at_us } = event {
            started.entry(id).or_insert(at_us);
            count.send_replace(started.len());
        }
    }
    started
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        assert_eq!(Event::parse("ready"), Event::Ready { api: None });
        assert_eq!(
            Event::parse("ready api=127.0.0.1:4000"),
            Event::Ready {
                api: Some("127.0.0.1:4000".parse().unwrap())
            }
        );
        assert_eq!(
            Event::parse("job 12 1700000000000001"),
            Event::Job {
                id: 12,
                at_us: 1_700_000_000_000_001
            }
        );
        assert_eq!(Event::parse("handled 5"), Event::Handled(5));
        assert_eq!(Event::parse("stopped"), Event::Stopped);
        assert_eq!(Event::parse("job x"), Event::Other("job x".into()));
    }

    #[test]
    fn config_sets_concurrency_on_every_queue_and_keeps_readme_route() {
        let args = WorkerArgs {
            url: "postgres://x@h/db".into(),
            queues: vec!["bench".into(), "readme-queue".into()],
            concurrency: 3,
            api: true,
            report: ReportMode::Jobs,
            discard_completed: false,
        };
        let config = args.config();
        assert_eq!(config.queues["bench"].concurrency, 3);
        assert_eq!(config.queues["readme-queue"].concurrency, 3);
        assert_eq!(
            config.queues["readme-queue"].route.as_deref(),
            Some("readme")
        );
        assert!(!config.database.migrate);
        assert_eq!(config.api.port, 0);
    }
}
