//! Applies `schema.sql`, the one source of the database schema. The file
//! takes its own advisory lock and records each numbered step it applies, so
//! any number of instances may migrate at once and re-running is harmless.

use tokio_postgres::Client;

/// The text of `schema.sql`, compiled into the binary.
pub const SCHEMA_SQL: &str = include_str!("../schema.sql");

/// The newest schema step this build knows.
pub const SCHEMA_VERSION: i32 = 9;

/// Applies `schema.sql` and returns the installed schema version.
pub async fn migrate(client: &Client) -> Result<i32, tokio_postgres::Error> {
    client.batch_execute(SCHEMA_SQL).await?;
    installed_version(client).await
}

/// The newest step applied to the database; 0 when none was.
pub async fn installed_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let installed: bool = client
        .query_one(
            "SELECT to_regclass('pgtasks.schema_version') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !installed {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT max(version) FROM pgtasks.schema_version", &[])
        .await?;
    Ok(row.get::<_, Option<i32>>(0).unwrap_or(0))
}
