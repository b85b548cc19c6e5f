//! Test support: one fresh database per test, cloned from a migrated
//! template, dropped afterwards; waiting on conditions with deadlines.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use pgtasks::config::Config;
use pgtasks::{HandlerResult, Job, JobContext, Running, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

/// The server tests connect to; every database they make is on it.
pub fn admin_url() -> String {
    std::env::var("PGTASKS_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn url_for(database: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{database}")
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The template's name carries a hash of schema.sql, so a schema change
/// builds a new one.
fn template_name() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pgtasks::schema::SCHEMA_SQL.hash(&mut h);
    format!("pgtasks_tpl_{:016x}", h.finish())
}

async fn ensure_template(admin: &Client) -> String {
    let name = template_name();
    // Serialises template creation across test processes.
    admin
        .execute("SELECT pg_advisory_lock(738211)", &[])
        .await
        .unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some();
    if !exists {
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {building}"))
            .await
            .unwrap();
        {
            let client = connect(&url_for(&building)).await;
            pgtasks::schema::migrate(&client)
                .await
                .expect("migrate template");
        }
        // The connection above must be gone before the rename.
        let mut tries = 0;
        while let Err(e) = admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}"))
            .await
        {
            tries += 1;
            assert!(tries < 100, "rename template: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    admin
        .execute("SELECT pg_advisory_unlock(738211)", &[])
        .await
        .unwrap();
    name
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A database of the test's own, migrated, dropped when this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = connect(&admin_url()).await;
        let template = ensure_template(&admin).await;
        let name = format!(
            "pgtasks_t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut tries = 0;
        // CREATE DATABASE fails while another session is copying the same
        // template ("source database is being accessed"); retry briefly.
        while let Err(e) = admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
        {
            tries += 1;
            assert!(tries < 200, "create test database: {e}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        TestDb {
            url: url_for(&name),
            name,
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A config for this database: no migration (the template has it), a
    /// slow poll so tests prove the notification path, short grace.
    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.database.url = self.url.clone();
        config.database.migrate = false;
        config.worker.poll_interval = Duration::from_secs(60);
        config.worker.shutdown_grace = Duration::from_secs(5);
        config.worker.reconnect_max_delay = Duration::from_millis(200);
        config
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await; use a private runtime on a plain thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let admin = connect(&admin_url()).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `count(*)` (or any bigint) a one-row query returns.
pub async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Ends this database's listener session from the server side, as a
/// network failure or a restart would; returns how many it ended.
pub async fn kill_listener(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE application_name = 'pgtasks-listener' AND datname = current_database()",
    )
    .await
}

/// Counts jobs by state in one query.
pub async fn count_state(client: &Client, state: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pgtasks.job WHERE state::text = $1",
            &[&state],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until `n` jobs are in `state`.
pub async fn wait_for_state(client: &Client, state: &str, n: i64, timeout: Duration) {
    wait_for(&format!("{n} jobs in state {state}"), timeout, || async {
        (count_state(client, state).await == n).then_some(())
    })
    .await
}

/// A handler that records how many times each job ran.
#[derive(Clone, Default)]
pub struct Recorder {
    runs: Arc<Mutex<HashMap<i64, u32>>>,
}

impl Recorder {
    pub fn handler(
        &self,
    ) -> impl Fn(Job, JobContext) -> futures::future::BoxFuture<'static, HandlerResult>
           + Send
           + Sync
           + 'static {
        let runs = self.runs.clone();
        move |job: Job, _ctx| {
            let runs = runs.clone();
            Box::pin(async move {
                *runs.lock().unwrap().entry(job.id).or_default() += 1;
                Ok(None)
            })
        }
    }

    pub fn runs(&self) -> HashMap<i64, u32> {
        self.runs.lock().unwrap().clone()
    }

    pub fn total(&self) -> usize {
        self.runs
            .lock()
            .unwrap()
            .values()
            .map(|&n| n as usize)
            .sum()
    }
}

/// Inserts `n` jobs into `queue` in one plain SQL statement, as psql would.
pub async fn insert_jobs(client: &Client, queue: &str, n: i32) {
    client
        .execute(
            "INSERT INTO pgtasks.job (queue, data)
             SELECT $1, jsonb_build_object('n', i) FROM generate_series(1, $2) i",
            &[&queue, &n],
        )
        .await
        .unwrap();
}

/// Starts a runtime the way the `pgtasks` binary does: the configured
/// handler of every queue (and the logger for `readme-queue`).
pub async fn serve_configured(config: Config) -> (Running, CancellationToken) {
    config.validate().expect("valid config");
    let mut runtime = Runtime::new(config.clone());
    for (queue, handler) in pgtasks::handlers::configured(&config).expect("handlers build") {
        runtime = runtime.handler(&queue, handler);
    }
    let shutdown = CancellationToken::new();
    let running = runtime.start(shutdown.clone()).await.unwrap();
    (running, shutdown)
}

/// Inserts one job as psql would and returns its id.
pub async fn insert_job(client: &Client, queue: &str, data: serde_json::Value) -> i64 {
    client
        .query_one(
            "INSERT INTO pgtasks.job (queue, data) VALUES ($1, $2) RETURNING id",
            &[&queue, &data],
        )
        .await
        .unwrap()
        .get(0)
}

pub const SECS_10: Duration = Duration::from_secs(10);

/// Waits until the runtime's listener is connected and its workers sleep as
/// armed, so a job inserted next is notified and heard.
pub async fn listening(running: &pgtasks::Running) {
    wait_for("listener and idle workers", SECS_10, || async {
        running.idle_and_listening().then_some(())
    })
    .await
}

/// A runtime whose `readme-queue` worker records every run, started and
/// listening (its worker asleep and armed).
pub async fn start_recording(db: &TestDb, recorder: &Recorder) -> (Running, CancellationToken) {
    start_recording_with(db.config(), recorder).await
}

/// [`start_recording`] with a config of the caller's; waits until it
/// listens unless the config polls only.
pub async fn start_recording_with(
    config: Config,
    recorder: &Recorder,
) -> (Running, CancellationToken) {
    let listen = config.worker.listen;
    let shutdown = CancellationToken::new();
    let running = Runtime::new(config)
        .handler("readme-queue", recorder.handler())
        .start(shutdown.clone())
        .await
        .unwrap();
    if listen {
        listening(&running).await;
    }
    (running, shutdown)
}

/// A LISTEN connection that forwards (channel, payload) pairs.
pub async fn listen(
    url: &str,
    channels: &[&str],
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<(String, String)>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    for channel in channels {
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .unwrap();
    }
    (client, rx)
}

/// Everything sent before the sentinel (committed later by the same test)
/// has arrived once the sentinel does: notifications are delivered in commit
/// order.
pub async fn drain_until_sentinel(
    sender: &tokio_postgres::Client,
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
) -> Vec<(String, String)> {
    sender
        .execute("SELECT pg_notify('sentinel', 'end')", &[])
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("sentinel notification")
            .expect("listener alive");
        if item.0 == "sentinel" {
            return got;
        }
        got.push(item);
    }
}

/// How many advisory locks this database's sleep connection holds that match
/// `filter`, a condition on `pg_locks l`.
pub async fn sleeper_locks(client: &Client, filter: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE a.application_name = 'pgtasks-sleeper' AND a.datname = current_database()
            AND l.locktype = 'advisory' AND l.granted AND ({filter})"
    );
    client.query_one(&sql, &[]).await.unwrap().get(0)
}
