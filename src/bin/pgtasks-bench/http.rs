//! HTTP submit and footprint, as the seed app was measured: `pgtasks serve`
//! (the release binary, as deployed: API + workers + maintenance, `RUST_LOG`
//! info so every job is logged) on a scratch database; idle resident memory
//! after it settles; `wrk` POSTs the seed's body to `/api/jobs/readme`
//! (`bench/submit.lua` counts the 2xx answers and prints percentiles);
//! resident memory right after the load and 2 s later; then every
//! acknowledged request must have its row. Also the binary's size.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use pgtasks::config::README_QUEUE;

use crate::report::{merged, Report};
use crate::scratch::{with_scratch, Scratch};

#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub duration_s: u64,
    pub connections: usize,
    pub threads: usize,
    /// The wrk script; default `bench/submit.lua`.
    pub lua: PathBuf,
    /// The `pgtasks` binary; default: next to this one.
    pub pgtasks_bin: PathBuf,
    /// Seconds the service idles before the first RSS reading.
    pub settle_s: u64,
}

impl HttpSpec {
    pub fn default_lua() -> PathBuf {
        let local = PathBuf::from("bench/submit.lua");
        if local.exists() {
            local
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/submit.lua")
        }
    }

    pub fn default_pgtasks_bin() -> PathBuf {
        std::env::current_exe()
            .map(|exe| exe.with_file_name("pgtasks"))
            .unwrap_or_else(|_| PathBuf::from("target/release/pgtasks"))
    }
}

pub async fn run(report: &mut Report, admin_url: &str, spec: &HttpSpec) -> anyhow::Result<()> {
    if !spec.pgtasks_bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --bin pgtasks)",
            spec.pgtasks_bin.display()
        );
    }
    if !spec.lua.exists() {
        bail!("wrk script {} not found", spec.lua.display());
    }
    with_scratch(admin_url, "http", |db| async move {
        measure(report, &db, spec).await
    })
    .await
}

/// `pgtasks serve` as a child process, stopped with SIGTERM (killed on drop).
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(spec: &HttpSpec, db: &Scratch, port: u16) -> anyhow::Result<Service> {
        let log =
            std::env::temp_dir().join(format!("pgtasks-bench-serve-{}.log", std::process::id()));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&spec.pgtasks_bin);
        command
            .arg("serve")
            .env("DATABASE_URL", &db.url)
            .env("PORT", port.to_string())
            .env("PGTASKS_API__HOST", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} serve", spec.pgtasks_bin.display()))?;
        Ok(Service { child, log })
    }

    fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading /proc/<pid>/status")?;
        rss_kib(&status)
            .map(|kib| kib as f64 / 1024.0)
            .context("no VmRSS line")
    }

    /// SIGTERM, then waits up to 20 s for a clean exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "pgtasks serve exited with {status} (log: {})",
                        self.log.display()
                    );
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("pgtasks serve did not stop within 20 s of SIGTERM")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The VmRSS line of /proc/<pid>/status, in KiB.
fn rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

async fn measure(report: &mut Report, db: &Scratch, spec: &HttpSpec) -> anyhow::Result<()> {
    let wrk_args = format!(
        "-t{} -c{} -d{}s",
        spec.threads, spec.connections, spec.duration_s
    );
    report.step(&format!("http submit: pgtasks serve + wrk {wrk_args}"));
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let service = Service::start(spec, db, port)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut up = false;
    for _ in 0..200 {
        if http
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !up {
        bail!(
            "pgtasks serve did not answer /health within 20 s (log: {})",
            service.log.display()
        );
    }
    tokio::time::sleep(Duration::from_secs(spec.settle_s)).await;
    let rss_idle = service.rss_mib()?;

    let output = {
        let (lua, threads, connections, duration) = (
            spec.lua.clone(),
            spec.threads,
            spec.connections,
            spec.duration_s,
        );
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("wrk")
                .arg(format!("-t{threads}"))
                .arg(format!("-c{connections}"))
                .arg(format!("-d{duration}s"))
                .arg("--latency")
                .arg("-s")
                .arg(lua)
                .arg(base)
                .output()
        })
        .await?
        .context("running wrk (apt-get install wrk)")?
    };
    let rss_after = service.rss_mib()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_2s = service.rss_mib()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: Value = stdout
        .lines()
        .find(|l| l.starts_with(r#"{"metric":"http_submit""#))
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "wrk printed no summary line:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;

    let client = db.connect().await?;
    let rows = count_jobs(&client, None).await?;
    let completed = count_jobs(&client, Some("completed")).await?;
    service.stop().await?;

    let acknowledged = summary["acknowledged"].as_i64().unwrap_or(-1);
    let every_ack_has_its_row = acknowledged >= 0 && rows >= acknowledged;
    let mut line = summary.clone();
    if let Value::Object(map) = &mut line {
        map.remove("metric");
    }
    report.emit(
        "http_submit",
        merged(
            line,
            &json!({
                "config": {
                    "wrk": wrk_args,
                    "endpoint": "POST /api/jobs/readme",
                    "body": crate::pickup::README_BODY,
                    "service": "pgtasks serve (API + workers + maintenance), RUST_LOG=info",
                    "submit_max_in_flight": pgtasks::Config::default().api.submit_max_in_flight,
                    "submit_batch_max": pgtasks::submit::MAX_BATCH,
                },
            }),
        ),
    );
    report.emit(
        "http_submit_rows",
        json!({
            "acknowledged": acknowledged,
            "rows": rows,
            "every_ack_has_its_row": every_ack_has_its_row,
            "in_flight_when_wrk_stopped": rows - acknowledged,
            "completed_by_worker": completed,
        }),
    );
    report.emit(
        "rss",
        json!({
            "process": "pgtasks serve",
            "idle_mib": (rss_idle * 10.0).round() / 10.0,
            "after_load_mib": (rss_after * 10.0).round() / 10.0,
            "after_load_plus2s_mib": (rss_after_2s * 10.0).round() / 10.0,
            "idle_after_s": spec.settle_s,
        }),
    );
    let bytes = std::fs::metadata(&spec.pgtasks_bin)?.len();
    report.emit(
        "binary_size",
        json!({
            "path": spec.pgtasks_bin.display().to_string(),
            "bytes": bytes,
            "mib": (bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
        }),
    );
    report.note(format!(
        "http submit ({wrk_args}): {} req/s, p50 {} p90 {} p99 {} max {} ms, {} errors",
        summary["req_per_s"],
        summary["p50_ms"],
        summary["p90_ms"],
        summary["p99_ms"],
        summary["max_ms"],
        summary["errors"]
    ));
    report.note(format!(
        "    rows: {rows} for {acknowledged} acknowledged ({}); worker completed {completed} during the run",
        if every_ack_has_its_row { "every ack has its row" } else { "MISSING ROWS" }
    ));
    report.note(format!(
        "footprint: RSS idle {rss_idle:.1} MiB, after load {rss_after:.1} MiB (+2 s: {rss_after_2s:.1}); binary {:.1} MiB",
        bytes as f64 / 1048576.0
    ));
    if !every_ack_has_its_row {
        bail!("{acknowledged} requests were acknowledged but only {rows} rows exist");
    }
    Ok(())
}

/// Jobs of the readme queue, in `state` when given.
async fn count_jobs(client: &tokio_postgres::Client, state: Option<&str>) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pgtasks.job
              WHERE queue = $1 AND ($2::text IS NULL OR state::text = $2)",
            &[&README_QUEUE, &state],
        )
        .await
        .context("counting jobs")?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tpgtasks\nVmPeak:\t  100 kB\nVmRSS:\t   20480 kB\nThreads: 3\n";
        assert_eq!(rss_kib(status), Some(20480));
        assert_eq!(rss_kib("Name: x\n"), None);
    }
}
