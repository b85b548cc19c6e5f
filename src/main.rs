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
    /// Run workers and maintenance for every queue with a handler: those that
    /// declare `[queues.<name>.handler]` (webhook, command, log), and
    /// readme-queue, which logs its jobs unless it declares another.
    Serve,
    /// Run workers and maintenance (for split deployments).
    Worker,
    /// Apply schema.sql to the database (idempotent, under an advisory lock) and exit.
    Migrate,
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
        Command::Serve | Command::Worker => serve(config).await,
    }
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signal(shutdown.clone());
    let mut runtime = Runtime::new(config.clone());
    for (queue, handler) in handlers::configured(&config)? {
        runtime = runtime.handler(&queue, handler);
    }
    let running = runtime.start(shutdown).await?;
    running.stopped().await;
    info!("stopped");
    Ok(())
}
