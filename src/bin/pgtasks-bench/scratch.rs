//! Scratch databases: `pgtasks_bench_<name>` on the admin server, created
//! fresh (a copy left by a crashed run is dropped first), migrated with
//! `pgtasks::schema::migrate`, and dropped when the benchmark is done.
//!
//! The harness changes no server setting and applies no session setting of
//! its own; the only session setting it uses is the schema's documented
//! `SET LOCAL pgtasks.skip_notify = on` when it pre-fills finished or delayed
//! jobs (rows no worker should be woken for).

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

/// A migrated database of one benchmark.
#[derive(Debug, Clone)]
pub struct Scratch {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl Scratch {
    /// Creates `pgtasks_bench_<name>` and applies the schema.
    pub async fn create(admin_url: &str, name: &str) -> anyhow::Result<Scratch> {
        let name = format!("pgtasks_bench_{name}");
        let admin = connect(admin_url).await?;
        // Two calls: a multi-statement string would be one implicit transaction.
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .with_context(|| format!("creating database {name}"))?;
        }
        let scratch = Scratch {
            url: database_url(admin_url, &name),
            name,
            admin_url: admin_url.to_string(),
        };
        let client = scratch.connect().await?;
        pgtasks::schema::migrate(&client)
            .await
            .with_context(|| format!("applying schema.sql to {}", scratch.name))?;
        Ok(scratch)
    }

    /// A connection of its own to this database.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }

    /// Drops the database, whatever is still connected to it.
    pub async fn drop_db(self) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))
    }
}

/// Runs `body` on a fresh scratch database and drops it afterwards, also
/// when `body` fails.
pub async fn with_scratch<T, F, Fut>(admin_url: &str, name: &str, body: F) -> anyhow::Result<T>
where
    F: FnOnce(Scratch) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let db = Scratch::create(admin_url, name).await?;
    let result = body(db.clone()).await;
    let dropped = db.drop_db().await;
    let value = result?;
    dropped?;
    Ok(value)
}

/// Drops every `pgtasks_bench_*` database (after an interrupted run).
pub async fn drop_all(admin_url: &str) -> anyhow::Result<Vec<String>> {
    let admin = connect(admin_url).await?;
    let names: Vec<String> = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'pgtasks\\_bench\\_%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for name in &names {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping database {name}"))?;
    }
    Ok(names)
}

/// One connection, driven by a spawned task that ends with the client.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The admin URL with its database replaced by `database`.
pub fn database_url(admin_url: &str, database: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let prefix = match base.find("://") {
        Some(scheme_end) => match base[scheme_end + 3..].find('/') {
            Some(slash) => &base[..scheme_end + 3 + slash],
            None => base,
        },
        None => base,
    };
    match query {
        Some(query) => format!("{prefix}/{database}?{query}"),
        None => format!("{prefix}/{database}"),
    }
}

/// The URL without a password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Adds a queue row (the insert trigger refuses jobs of unknown queues).
/// A paused queue is not claimed from: drain pre-fills with it paused.
pub async fn add_queues(client: &Client, names: &[String], paused: bool) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO pgtasks.queue (name, paused) SELECT unnest($1::text[]), $2
             ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused",
            &[&names, &paused],
        )
        .await
        .context("adding queues")?;
    Ok(())
}

/// `VACUUM ANALYZE` of the whole database, outside any timing, as the peers'
/// harness does before each run: every run starts with fresh planner
/// statistics and no dead tuples.
pub async fn vacuum_analyze(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .context("VACUUM ANALYZE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_the_path() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            database_url("postgres://u:p@h/postgres?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }

    #[test]
    fn redact_hides_the_password() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
