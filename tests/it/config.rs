//! Configuration layering and errors that name the key.

// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use figment::Jail;
use pgtasks::config::{Config, Sources};

fn load_in_jail(jail: &Jail, toml: &str) -> Result<Config, String> {
    jail.create_file("extra.toml", toml)
        .map_err(|e| e.to_string())?;
    Config::load(&Sources {
        default_file: None,
        file: Some("extra.toml".into()),
    })
    .map_err(|e| e.to_string())
}

#[test]
fn errors_name_the_key() {
    Jail::expect_with(|jail| {
        let cases = [
            ("[queues.x]\nconcurrency = \"lots\"", "queues.x.concurrency"),
            ("[worker]\npoll_interval = \"soon\"", "worker.poll_interval"),
            ("[queues.x]\nconcurrency = 0", "queues.x.concurrency"),
            (
                "[queues.x]\ndead_letter = \"ghost\"",
                "queues.x.dead_letter",
            ),
            ("[queues.\"bad name\"]", "queues.bad name"),
            (
                "[queues.a]\nroute = \"r\"\n[queues.b]\nroute = \"r\"",
                "queues.b.route",
            ),
            ("[worker]\nlisten_harder = true", "listen_harder"),
            ("[database]\npool_size = 1", "database.pool_size"),
        ];
        for (toml, key) in cases {
            let err = load_in_jail(jail, toml).expect_err(toml);
            assert!(
                err.contains(key),
                "error for {toml:?} should name {key}: {err}"
            );
        }
        Ok(())
    });
}

#[test]
fn layers_apply_in_order_and_env_values_are_lenient() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "default.toml",
            "[worker]\npoll_interval = \"3s\"\n[api]\nport = 4000",
        )?;
        jail.create_file("extra.toml", "[worker]\nshutdown_grace = \"1m\"")?;
        jail.set_env("PGTASKS_WORKER__POLL_INTERVAL", "5");
        jail.set_env("PGTASKS_QUEUES__READme-QUEUE__ROUTE", "2024");
        jail.set_env("PGTASKS_QUEUES__EMAILS__CONCURRENCY", "3");
        jail.set_env("DATABASE_URL", "postgres://u@db:5432/app");
        jail.set_env("PORT", "8080");
        let config = Config::load(&Sources {
            default_file: Some("default.toml".into()),
            file: Some("extra.toml".into()),
        })
        .expect("config loads");
        assert_eq!(config.worker.poll_interval, Duration::from_secs(5));
        assert_eq!(config.worker.shutdown_grace, Duration::from_secs(60));
        assert_eq!(config.api.port, 8080);
        assert_eq!(config.database.url, "postgres://u@db:5432/app");
        assert_eq!(config.queues["readme-queue"].route.as_deref(), Some("2024"));
        assert_eq!(config.queues["emails"].concurrency, 3);
        Ok(())
    });
}

#[test]
fn a_missing_config_file_is_an_error() {
    let err = Config::load(&Sources {
        default_file: None,
        file: Some("/nonexistent/pgtasks.toml".into()),
    })
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/pgtasks.toml"));
}
