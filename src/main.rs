//! The `pgtasks` command line: parse, set up logging, load config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use pgtasks::config::{Config, Sources};
use pgtasks::{db, handlers, schema, shutdown, Runtime};

/// A PostgreSQL job queue service. Submit jobs with SQL
/// (`INSERT INTO pgtasks.job (queue, data) VALUES ('readme-queue', '{}')`);
/// workers pick them up within milliseconds.
///
/// Configuration: config/default.toml, then --config FILE, then PGTASKS_*
/// environment variables (nested keys joined by `__`), then DATABASE_URL and
/// PORT. A `.env` file in the working directory is read first.
#[derive(Parser)]
#[command(name = "pgtasks", version)]
struct Cli {
    /// An extra TOML config file, layered over config/default.toml.
    #[arg(long, global = true, env = "PGTASKS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API, the workers and maintenance in one process (recommended).
    /// Workers run every queue with a handler: those that declare
    /// `[queues.<name>.handler]` (webhook, command, log), and readme-queue,
    /// which logs its jobs unless it declares another.
    Serve,
    /// Run the HTTP API only: it submits and inspects jobs, runs none.
    Api,
    /// Run workers and maintenance only (split deployments).
    Worker,
    /// Apply schema.sql to the database (idempotent, under an advisory lock) and exit.
    Migrate,
    /// Exit 0 when the local instance answers GET /health (for Docker's HEALTHCHECK).
    Healthcheck {
        /// Base URL of the instance. Default: http://127.0.0.1:<api.port>.
        #[arg(long)]
        url: Option<String>,
    },
    /// Submit one job and print its id.
    Send(SendArgs),
}

#[derive(clap::Args)]
struct SendArgs {
    /// Queue name.
    queue: String,
    /// The job's data: a JSON object.
    #[arg(default_value = "{}")]
    data: String,
    /// Higher runs first.
    #[arg(long)]
    priority: Option<i32>,
    /// Seconds until the job becomes due.
    #[arg(long, conflicts_with = "run_at")]
    delay: Option<f64>,
    /// When the job becomes due (RFC 3339).
    #[arg(long)]
    run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Overrides the queue's retry_limit + 1.
    #[arg(long)]
    max_attempts: Option<i32>,
    /// At most one queued job per key (a duplicate prints the existing id).
    #[arg(long)]
    singleton_key: Option<String>,
    /// With --singleton-key: at most one job per key per slot of this many seconds.
    #[arg(long, requires = "singleton_key")]
    singleton_seconds: Option<i32>,
}

fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgtasks: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("pgtasks: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let sources = Sources {
        default_file: Some(PathBuf::from("config/default.toml")),
        file: cli.config,
    };
    let config = Config::load(&sources)?;
    match cli.command {
        Command::Migrate => migrate(&config).await,
        Command::Serve => serve(config, Mode::Combined).await,
        Command::Api => serve(config, Mode::Api).await,
        Command::Worker => serve(config, Mode::Worker).await,
        Command::Healthcheck { url } => healthcheck(&config, url).await,
        Command::Send(args) => send(&config, args).await,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Combined,
    Api,
    Worker,
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let pg = db::pg_config(
        &config.database.url,
        "database.url",
        config.database.connect_timeout,
        "pgtasks-migrate",
    )?;
    let client = db::connect(&pg).await?;
    let version = schema::migrate(&client)
        .await
        .context("applying schema.sql")?;
    info!(version, "schema up to date");
    println!("schema version {version}");
    Ok(())
}

async fn serve(config: Config, mode: Mode) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    let mut runtime = Runtime::new(config.clone())
        .api(mode != Mode::Worker)
        .workers(mode != Mode::Api)
        .maintenance(mode != Mode::Api);
    for (queue, handler) in handlers::configured(&config)? {
        runtime = runtime.handler(&queue, handler);
    }
    let running = runtime.start(shutdown).await?;
    running.stopped().await;
    info!("stopped");
    Ok(())
}

async fn healthcheck(config: &Config, url: Option<String>) -> anyhow::Result<()> {
    let base = url.unwrap_or_else(|| format!("http://127.0.0.1:{}", config.api.port));
    let url = format!("{}/health", base.trim_end_matches('/'));
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    println!("ok");
    Ok(())
}

async fn send(config: &Config, args: SendArgs) -> anyhow::Result<()> {
    let data: serde_json::Value =
        serde_json::from_str(&args.data).context("data: not valid JSON")?;
    anyhow::ensure!(data.is_object(), "data: must be a JSON object");
    let client = pgtasks::Client::new(db::create_pool(&config.database)?);
    let job = pgtasks::store::NewJob {
        queue: args.queue,
        data,
        priority: args.priority,
        run_at: args.run_at,
        delay: args
            .delay
            .map(std::time::Duration::try_from_secs_f64)
            .transpose()
            .context("--delay: must be a number of seconds, 0 or more")?,
        max_attempts: args.max_attempts,
        singleton_key: args.singleton_key,
        singleton_seconds: args.singleton_seconds,
    };
    // A refusal reads as the database's own message (`ClientError`'s Display).
    let pgtasks::store::Sent { id, duplicate } = client
        .send_job(&job)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{id}");
    if duplicate {
        eprintln!("duplicate: job {id} with this singleton key was already queued");
    }
    Ok(())
}
