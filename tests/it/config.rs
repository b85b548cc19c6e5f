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
        // The test suite's and the bench's own variables are not config keys.
        jail.set_env(
            "PGTASKS_TEST_ADMIN_URL",
            "postgres://postgres@127.0.0.1/postgres",
        );
        jail.set_env(
            "PGTASKS_BENCH_ADMIN_URL",
            "postgres://postgres@127.0.0.1/postgres",
        );
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

#[test]
fn handler_errors_name_the_handler_key() {
    Jail::expect_with(|jail| {
        jail.create_file("notes.txt", "not a program")?;
        let cases = [
            (
                "[queues.hooks.handler]\nkind = \"webhook\"",
                "`queues.hooks.handler.url`",
            ),
            (
                "[queues.hooks.handler]\nkind = \"webhook\"\nurl = \"ftp://example.com/x\"",
                "`queues.hooks.handler.url`",
            ),
            (
                "[queues.hooks.handler]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\ntimeout = \"0s\"",
                "`queues.hooks.handler.timeout`",
            ),
            (
                "[queues.hooks.handler]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nheaders = { \"bad name\" = \"x\" }",
                "`queues.hooks.handler.headers.bad name`",
            ),
            (
                "[queues.hooks.handler]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nsecrett = \"x\"",
                "queues.hooks.handler.secrett",
            ),
            (
                "[queues.jobs.handler]\nkind = \"command\"",
                "`queues.jobs.handler.program`",
            ),
            (
                "[queues.jobs.handler]\nkind = \"command\"\nprogram = \"/nonexistent/make-report\"",
                "`queues.jobs.handler.program`",
            ),
            (
                "[queues.jobs.handler]\nkind = \"command\"\nprogram = \"pgtasks-no-such-program\"",
                "`queues.jobs.handler.program`",
            ),
            (
                "[queues.jobs.handler]\nkind = \"command\"\nprogram = \"./notes.txt\"",
                "`queues.jobs.handler.program`",
            ),
            (
                "[queues.jobs.handler]\nkind = \"command\"\nprogram = \"sh\"\nworking_dir = \"/nonexistent\"",
                "`queues.jobs.handler.working_dir`",
            ),
            (
                "[queues.jobs.handler]\nkind = \"command\"\nprogram = \"sh\"\ntimeout = \"later\"",
                "queues.jobs.handler.timeout",
            ),
            (
                "[queues.jobs.handler]\nkind = \"teleport\"",
                "queues.jobs.handler",
            ),
            (
                "[queues.jobs.handler]\nprogram = \"sh\"",
                "`kind` is missing",
            ),
            (
                "[queues.jobs.handler]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nprogram = \"sh\"",
                "a webhook handler takes no `program`",
            ),
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
fn handlers_load_from_files_and_env_with_lenient_values_and_hidden_secrets() {
    use pgtasks::config::{CommandConfig, HandlerConfig};
    Jail::expect_with(|jail| {
        jail.create_file(
            "extra.toml",
            r#"
            [queues.reports.handler]
            kind = "command"
            program = "sh"
            args = ["-c", "exit 0", 3]
            env = { LEVEL = 2 }
            timeout = "90s"

            [queues.readme-queue.handler]
            kind = "log"
            "#,
        )?;
        jail.set_env("PGTASKS_QUEUES__HOOKS__HANDLER__KIND", "webhook");
        jail.set_env(
            "PGTASKS_QUEUES__HOOKS__HANDLER__URL",
            "http://127.0.0.1:9/jobs",
        );
        jail.set_env("PGTASKS_QUEUES__HOOKS__HANDLER__SECRET", "12345");
        jail.set_env("PGTASKS_QUEUES__HOOKS__HANDLER__HEADERS__X-API-KEY", "777");
        let config = Config::load(&Sources {
            default_file: None,
            file: Some("extra.toml".into()),
        })
        .expect("config loads");
        assert_eq!(
            config.queues["reports"].handler,
            Some(HandlerConfig::Command(CommandConfig {
                program: "sh".into(),
                args: vec!["-c".into(), "exit 0".into(), "3".into()],
                env: [("LEVEL".to_string(), "2".to_string())].into(),
                working_dir: None,
                timeout: Some(Duration::from_secs(90)),
            }))
        );
        assert_eq!(
            config.queues["readme-queue"].handler,
            Some(HandlerConfig::Log)
        );
        let Some(HandlerConfig::Webhook(hook)) = &config.queues["hooks"].handler else {
            panic!("hooks has a webhook: {:?}", config.queues["hooks"]);
        };
        assert_eq!(hook.url, "http://127.0.0.1:9/jobs");
        assert_eq!(hook.timeout, Duration::from_secs(30));
        assert_eq!(hook.headers["x-api-key"], "777");
        assert_eq!(hook.secret.as_ref().map(|s| s.expose()), Some("12345"));
        assert!(
            !format!("{config:?}").contains("12345"),
            "Debug hides the secret"
        );
        Ok(())
    });
}

#[test]
fn the_shipped_default_file_loads() {
    // In a jail: other tests set PGTASKS_* variables inside theirs.
    Jail::expect_with(|_| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
        let config = Config::load(&Sources {
            default_file: Some(path.into()),
            file: None,
        })
        .expect("config/default.toml loads");
        assert!(config.queues.contains_key("readme-queue"));
        Ok(())
    });
}
