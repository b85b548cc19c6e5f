//! `pgtasks-bench`: the benchmark harness (README, "Benchmarks").
//!
//! Every benchmark runs against a scratch database (`pgtasks_bench_*`,
//! created, migrated and dropped by the harness) on the server of
//! `--admin-url`. The worker side runs in a separate process (this binary's
//! hidden `worker` command), like the peers' harness. One JSON line per figure
//! goes to stdout; readable lines and a final summary go to stderr.

mod compare;
mod drain;
mod enqueue;
mod http;
mod pickup;
mod report;
mod scale;
mod scratch;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use drain::{CompletedJobs, DrainSpec};
use enqueue::EnqueueSpec;
use http::HttpSpec;
use pickup::{PickupSpec, Via};
use report::Report;
use scale::ScaleSpec;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Benchmarks of pgtasks: pickup latency, drain throughput, enqueue rates,
/// HTTP submit, footprint and scale. JSON lines on stdout, a readable summary
/// on stderr.
#[derive(Parser)]
#[command(name = "pgtasks-bench", version)]
struct Cli {
    /// Server for the scratch databases (`pgtasks_bench_*` are created and
    /// dropped there).
    #[arg(
        long,
        global = true,
        env = "PGTASKS_BENCH_ADMIN_URL",
        default_value = DEFAULT_ADMIN_URL
    )]
    admin_url: String,
    /// Small default sizes: everything finishes in a couple of minutes.
    /// Explicit sizes still win.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every benchmark below, in order, with its default sizes.
    All,
    /// Pickup latency with the worker idle (figure 1).
    Pickup(PickupArgs),
    /// Drain throughput of pre-filled queues (figure 2).
    Drain(DrainArgs),
    /// Single-row enqueue with and without the trigger, and batch enqueue (figure 3).
    Enqueue(EnqueueArgs),
    /// HTTP submit with wrk, resident memory and binary size (figures 4 and 5).
    Http(HttpArgs),
    /// Pickup on a loaded table and drain across many queues (figure 6).
    Scale(ScaleArgs),
    /// pgtasks/peer ratios from the JSON lines of one run (see bench/compare.sh).
    Compare {
        /// JSON-lines files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Drop every pgtasks_bench_* database (after an interrupted run).
    Cleanup,
    /// Internal: the worker process the benchmarks spawn.
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

#[derive(Args, Default)]
struct PickupArgs {
    /// Submit paths: sql, http. Default both.
    #[arg(long, value_enum, value_delimiter = ',')]
    via: Vec<Via>,
    /// Rates (jobs/s), each paired with the --n at the same position.
    /// Default 20,1000.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Jobs per rate. Default 500,10000 (quick: 100,2000).
    #[arg(long, value_delimiter = ',')]
    n: Vec<usize>,
    /// Producers (connections, or concurrent HTTP callers) for rates above
    /// 50/s; slower rates use one. Default 8.
    #[arg(long)]
    producers: Option<usize>,
    /// The queue's concurrency in the worker. Default 10 (pgtasks' default).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Seconds the worker idles before the first job. Default 3.
    #[arg(long)]
    settle: Option<f64>,
}

#[derive(Args, Default)]
struct DrainArgs {
    /// Jobs to pre-fill, one run each. Default 20000,200000 (quick: 5000).
    #[arg(long, value_delimiter = ',')]
    n: Vec<usize>,
    /// Concurrency per queue, one run each. Default 10,100.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Queues the jobs are spread over. Default 1.
    #[arg(long)]
    queues: Option<usize>,
    /// Give up after this many seconds. Default 600.
    #[arg(long)]
    max_seconds: Option<u64>,
    /// What happens to completed jobs, one run each: `kept` (the default
    /// retention, 7 days) and/or `deleted` (`retention = 0`). Default
    /// kept,deleted.
    #[arg(long, value_delimiter = ',')]
    completed: Vec<CompletedJobs>,
}

#[derive(Args, Default)]
struct EnqueueArgs {
    /// Concurrent single-row clients. Default 8.
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds of single-row inserts, per table. Default 10 (quick: 3).
    #[arg(long)]
    seconds: Option<f64>,
    /// Jobs for the batch figure. Default 20000 (quick: 5000).
    #[arg(long)]
    batch_n: Option<usize>,
    /// Jobs per batch. Default 1000.
    #[arg(long)]
    chunk: Option<usize>,
}

#[derive(Args, Default)]
struct HttpArgs {
    /// wrk duration in seconds. Default 15 (quick: 5).
    #[arg(long)]
    duration: Option<u64>,
    /// wrk connections. Default 32.
    #[arg(long)]
    connections: Option<usize>,
    /// wrk threads. Default 2.
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds `pgtasks serve` idles before the idle RSS reading. Default 5.
    #[arg(long)]
    settle: Option<u64>,
    /// The wrk script. Default bench/submit.lua.
    #[arg(long)]
    lua: Option<PathBuf>,
    /// The pgtasks binary. Default: next to pgtasks-bench.
    #[arg(long)]
    pgtasks_bin: Option<PathBuf>,
}

#[derive(Args, Default)]
struct ScaleArgs {
    /// Completed jobs already in the table. Default 1000000 (quick: 100000).
    #[arg(long)]
    finished: Option<usize>,
    /// Jobs due in a day already in the table. Default 100000 (quick: 10000).
    #[arg(long)]
    delayed: Option<usize>,
    /// Pickup jobs per second. Default 20.
    #[arg(long)]
    rate: Option<f64>,
    /// Pickup jobs. Default 500 (quick: 100).
    #[arg(long)]
    n: Option<usize>,
    /// Drain jobs, in total. Default 20000 (quick: 5000).
    #[arg(long)]
    drain_n: Option<usize>,
    /// Queues for the spread drain. Default 10.
    #[arg(long)]
    queues: Option<usize>,
    /// Concurrency per queue. Default 10.
    #[arg(long)]
    concurrency: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Worker(args) = cli.command {
        init_tracing("warn");
        return match worker::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pgtasks-bench worker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing("warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgtasks-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut report = Report::default();
    let result = runtime.block_on(run(cli, &mut report));
    report.print_summary();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgtasks-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}

async fn run(cli: Cli, report: &mut Report) -> anyhow::Result<()> {
    let admin = cli.admin_url.as_str();
    let quick = cli.quick;
    match cli.command {
        Command::All => {
            pickup(report, admin, quick, PickupArgs::default()).await?;
            drain(report, admin, quick, DrainArgs::default()).await?;
            enqueue::run(report, admin, &enqueue_spec(quick, EnqueueArgs::default())).await?;
            http::run(report, admin, &http_spec(quick, HttpArgs::default())).await?;
            scale::run(report, admin, &scale_spec(quick, ScaleArgs::default())).await
        }
        Command::Pickup(args) => pickup(report, admin, quick, args).await,
        Command::Drain(args) => drain(report, admin, quick, args).await,
        Command::Enqueue(args) => enqueue::run(report, admin, &enqueue_spec(quick, args)).await,
        Command::Http(args) => http::run(report, admin, &http_spec(quick, args)).await,
        Command::Scale(args) => scale::run(report, admin, &scale_spec(quick, args)).await,
        Command::Compare { files } => compare::run(&files),
        Command::Cleanup => {
            for name in scratch::drop_all(admin).await? {
                eprintln!("dropped {name}");
            }
            Ok(())
        }
        Command::Worker(_) => unreachable!("handled in main"),
    }
}

/// `values` when given, else the full or quick default.
fn or<T: Clone>(values: Vec<T>, quick: bool, full: &[T], small: &[T]) -> Vec<T> {
    if !values.is_empty() {
        values
    } else if quick {
        small.to_vec()
    } else {
        full.to_vec()
    }
}

fn pick<T>(value: Option<T>, quick: bool, full: T, small: T) -> T {
    value.unwrap_or(if quick { small } else { full })
}

async fn pickup(
    report: &mut Report,
    admin: &str,
    quick: bool,
    args: PickupArgs,
) -> anyhow::Result<()> {
    let vias = or(
        args.via,
        quick,
        &[Via::Sql, Via::Http],
        &[Via::Sql, Via::Http],
    );
    let rates = or(args.rate, quick, &[20.0, 1000.0], &[20.0, 1000.0]);
    let ns = or(args.n, quick, &[500, 10_000], &[100, 2_000]);
    anyhow::ensure!(
        rates.len() == ns.len(),
        "--rate and --n pair up: give as many of each"
    );
    for via in vias {
        for (&rate, &n) in rates.iter().zip(&ns) {
            let spec = PickupSpec {
                via,
                rate,
                n,
                producers: if rate > 50.0 {
                    args.producers.unwrap_or(8)
                } else {
                    1
                },
                concurrency: args.concurrency.unwrap_or(10),
                settle: Duration::from_secs_f64(args.settle.unwrap_or(3.0)),
                scenario: "fresh".to_string(),
            };
            pickup::run(report, admin, &spec).await?;
        }
    }
    Ok(())
}

async fn drain(
    report: &mut Report,
    admin: &str,
    quick: bool,
    args: DrainArgs,
) -> anyhow::Result<()> {
    let ns = or(args.n, quick, &[20_000, 200_000], &[5_000]);
    let concurrencies = or(args.concurrency, quick, &[10, 100], &[10, 100]);
    let completed = or(
        args.completed,
        quick,
        &[CompletedJobs::Kept, CompletedJobs::Deleted],
        &[CompletedJobs::Kept, CompletedJobs::Deleted],
    );
    for &n in &ns {
        for &concurrency in &concurrencies {
            for &completed in &completed {
                let spec = DrainSpec {
                    n,
                    queues: args.queues.unwrap_or(1),
                    concurrency,
                    max_seconds: args.max_seconds.unwrap_or(600),
                    scenario: "fresh".to_string(),
                    completed,
                };
                drain::run(report, admin, &spec).await?;
            }
        }
    }
    Ok(())
}

fn enqueue_spec(quick: bool, args: EnqueueArgs) -> EnqueueSpec {
    EnqueueSpec {
        clients: args.clients.unwrap_or(8),
        seconds: pick(args.seconds, quick, 10.0, 3.0),
        batch_n: pick(args.batch_n, quick, 20_000, 5_000),
        chunk: args.chunk.unwrap_or(1000),
    }
}

fn http_spec(quick: bool, args: HttpArgs) -> HttpSpec {
    HttpSpec {
        duration_s: pick(args.duration, quick, 15, 5),
        connections: args.connections.unwrap_or(32),
        threads: args.threads.unwrap_or(2),
        lua: args.lua.unwrap_or_else(HttpSpec::default_lua),
        pgtasks_bin: args
            .pgtasks_bin
            .unwrap_or_else(HttpSpec::default_pgtasks_bin),
        settle_s: args.settle.unwrap_or(5),
    }
}

fn scale_spec(quick: bool, args: ScaleArgs) -> ScaleSpec {
    ScaleSpec {
        finished: pick(args.finished, quick, 1_000_000, 100_000),
        delayed: pick(args.delayed, quick, 100_000, 10_000),
        rate: args.rate.unwrap_or(20.0),
        n: pick(args.n, quick, 500, 100),
        concurrency: args.concurrency.unwrap_or(10),
        settle: Duration::from_secs(3),
        drain_n: pick(args.drain_n, quick, 20_000, 5_000),
        queues: args.queues.unwrap_or(10),
        max_seconds: 600,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn quick_shrinks_defaults_but_explicit_sizes_win() {
        assert_eq!(enqueue_spec(true, EnqueueArgs::default()).batch_n, 5_000);
        assert_eq!(enqueue_spec(false, EnqueueArgs::default()).batch_n, 20_000);
        let args = EnqueueArgs {
            batch_n: Some(7),
            ..Default::default()
        };
        assert_eq!(enqueue_spec(true, args).batch_n, 7);
        assert_eq!(or(vec![], true, &[1, 2], &[3]), vec![3]);
        assert_eq!(or(vec![9], true, &[1, 2], &[3]), vec![9]);
    }
}
